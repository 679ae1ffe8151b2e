#!/usr/bin/env bash
# bench.sh: the one benchmark entry point. Runs the throughput, tracker,
# downtime and scale measurements and writes one JSON with every headline
# figure and the machine's description, so that a regression shows as a diff
# between two files. The criterion benches are scripts/bench-criterion.sh
# (--criterion runs them too, quickly, to check their claims).
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--quick] [--criterion] --json FILE
  --quick       fewer runs and smaller guests: minutes, for a smoke check
                (the full run takes about an hour and needs 16 GiB free)
  --criterion   also run scripts/bench-criterion.sh --quick
  --json FILE   where the combined figures go (required)
  --help        print this help
Parts: bench-throughput.sh (goodput and CPU per GiB against iperf3),
bench-trackers.sh (tracker costs), bench-downtime.sh and bench-harvest.sh
--json (downtime distribution, harvest cost; each skipped with a message
where absent), bench-start.sh (guest start and destination preparation by
size). LIVEMIG=PATH uses that binary.
USAGE
}

quick=0 criterion=0 json_out=""
while (($#)); do
  case "$1" in
    --quick) quick=1; shift ;;
    --criterion) criterion=1; shift ;;
    --json) json_out=${2:?--json needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n $json_out ]] || { echo "bench: --json FILE is required" >&2; usage >&2; exit 2; }
[[ -d $(dirname -- "$json_out") ]] || { echo "bench: --json: no directory $(dirname -- "$json_out")" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir bench
# One binary for every part, built once.
LIVEMIG=$(private_livemig)
export LIVEMIG

load() { cut -d' ' -f1-3 /proc/loadavg; }
load_start=$(load) started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if ((quick)); then
  thr=(--runs 1 --mem 256M --shaped-mem 64M) trk=(--mem 256M --duration 1s) scale=(--sizes 1G --runs 1)
else
  thr=(--runs 5) trk=() scale=(--sizes "1G,4G,8G" --runs 5)
fi

say "throughput: bench-throughput.sh ${thr[*]}"
run_fg bash "$root/scripts/bench-throughput.sh" "${thr[@]}" --json "$tmp/throughput.json" >&2
say "trackers: bench-trackers.sh ${trk[*]}"
run_fg bash "$root/scripts/bench-trackers.sh" "${trk[@]}" --json "$tmp/trackers.json" >&2
# Part B of issue 16 adds these; a tree without them skips them.
for part in downtime harvest; do
  if [[ -f $root/scripts/bench-$part.sh ]]; then
    say "$part: bench-$part.sh --json"
    run_fg bash "$root/scripts/bench-$part.sh" --json "$tmp/$part.json" >&2
  else
    say "$part: skipped (scripts/bench-$part.sh is not in this tree)"
  fi
done
say "scale: bench-start.sh ${scale[*]}"
run_fg bash "$root/scripts/bench-start.sh" "${scale[@]}" --json "$tmp/scale.json" >&2
if ((criterion)); then
  say "criterion: bench-criterion.sh --quick"
  (cd "$root" && run_fg bash scripts/bench-criterion.sh --quick >&2)
fi

python3 - "$tmp" "$json_out" "$quick" "$started" "$load_start" "$(load)" \
  "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$("$LIVEMIG" --version)" <<'PY'
import json, os, platform, sys
tmp, out, quick, started, load0, load1, commit, version = sys.argv[1:]
part = lambda name: json.load(open(f"{tmp}/{name}.json")) if os.path.exists(f"{tmp}/{name}.json") else None
cpuinfo = open("/proc/cpuinfo").read().splitlines()
model = next((l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name")), platform.machine())
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
thr, trk, scale = part("throughput"), part("trackers"), part("scale")
down, harvest = part("downtime"), part("harvest")

head = {}
for r in thr["rows"]:
    key = f"{r['path']}_{r['streams']}_streams"
    head[f"{key}_ratio_to_iperf3"] = r["ratio_to_iperf3"]
    head[f"{key}_livemig_gbps"] = r["livemig_gbps"]
    if "ratio_to_rate" in r:
        head[f"{key}_ratio_to_rate"] = r["ratio_to_rate"]
if thr.get("cpu_per_gib"):
    for end, v in thr["cpu_per_gib"].items():
        head[f"cpu_per_gib_{end}_s"] = v["livemig"]
        head[f"cpu_per_gib_{end}_ratio_to_iperf3"] = v["ratio_to_iperf3"]
for m in trk["migrate"]:
    t = m["tracker"].replace("-", "_")
    head[f"tracker_{t}_harvest_max_ms"] = m["harvest_max_ms"]
    head[f"tracker_{t}_final_harvest_ms"] = m["downtime_breakdown_ms"]["final_harvest"]
    head[f"tracker_{t}_rounds"] = len(m["rounds"])
for d in trk["dirtyrate"]:
    if d["workload"].startswith("hotset"):
        head[f"tracker_{d['tracker'].replace('-', '_')}_hotset_slowdown_pct"] = d["tracked_slowdown_pct"]
for s in scale["sizes"]:
    gib = f"{s['memory_bytes'] / 2**30:g}gib"
    head[f"guest_start_{gib}_gbps"] = s["guest_start_gbps"]
    head[f"receiver_prealloc_{gib}_gbps"] = s["receiver_prealloc_gbps"]
for name, p in [("downtime", down), ("harvest", harvest)]:
    # Whatever part B's scripts call headline figures, under their names.
    for k, v in ((p or {}).get("headline") or {}).items():
        head[f"{name}_{k}"] = v

result = {
    "schema": 1, "quick": quick == "1", "started": started, "commit": commit, "livemig": version,
    "machine": {"nproc": os.cpu_count(), "model_name": model, "kernel": platform.release(),
                "memory_bytes": mem_kib * 1024, "load_average_start": load0, "load_average_end": load1},
    "headline": head,
    "throughput": thr, "trackers": trk, "downtime": down, "harvest": harvest, "scale": scale,
}
with open(out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
print(f"bench: wrote {out} ({len(head)} headline figures)", file=sys.stderr)
for k, v in head.items():
    print(f"  {k:<48} {v:.4g}" if isinstance(v, float) else f"  {k:<48} {v}")
PY
