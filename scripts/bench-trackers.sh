#!/usr/bin/env bash
# bench-trackers.sh: what each dirty tracker costs the guest and the sender.
# For every tracker the kernel has, `livemig dirtyrate` on the same guest
# (untracked warm-up, then a harvest every 10 ms) with two workloads:
#   - hotset:wws=32M,rate=50k   the target: at most 5% slower when tracked
#   - uniform:rate=max          the worst case: every write a first write
# and one default migration, for the harvest times inside a real run.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [--mem SIZE] [--duration D] [--json FILE]
  --mem SIZE    guest memory (default 1G)
  --duration D  tracked measurement per run (default 3s)
  --json FILE   also write every report as one JSON array to FILE
  --help        print this help
EOF
}

mem=1G duration=3s json_out=""
while (($#)); do
  case "$1" in
    --mem) mem=${2:?--mem needs a value}; shift 2 ;;
    --duration) duration=${2:?--duration needs a value}; shift 2 ;;
    --json) json_out=${2:?--json needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A private copy: livemig re-executes itself to start guests, so a
# concurrent rebuild of target/release would otherwise break a run mid-way.
(cd "$root" && cargo build --release --quiet)
cp "$root/target/release/livemig" "$tmp/livemig"
livemig=$tmp/livemig

trackers=()
for t in uffd-wp bitmap mprotect soft-dirty; do
  if err=$("$livemig" dirtyrate --quiet --mem 4M --workload idle --warmup 0s --duration 0s --tracker "$t" 2>&1 >/dev/null); then
    trackers+=("$t")
  else
    echo "skipping $t: ${err#Error: }" >&2
  fi
done

n=0
for t in "${trackers[@]}"; do
  for w in hotset:wws=32M,rate=50k uniform:rate=max; do
    n=$((n + 1))
    echo "dirtyrate --tracker $t --workload $w ..." >&2
    "$livemig" dirtyrate --quiet --mem "$mem" --workload "$w" --tracker "$t" \
      --duration "$duration" --json "$tmp/d$n.json" >/dev/null
  done
  echo "migrate --tracker $t ..." >&2
  "$livemig" migrate --quiet --mem "$mem" --tracker "$t" --json "$tmp/m-$t.json" >/dev/null
done

python3 - "$tmp" "$json_out" <<'EOF'
import glob, json, sys
tmp, out = sys.argv[1], sys.argv[2]
d = [json.load(open(f)) for f in sorted(glob.glob(f"{tmp}/d*.json"), key=lambda f: int(f.split("/d")[-1][:-5]))]
m = [json.load(open(f)) for f in sorted(glob.glob(f"{tmp}/m-*.json"))]
print(f"guest memory {d[0]['memory_bytes'] >> 20} MiB, harvest every 10 ms\n")
print("| tracker | workload | pages/s untracked | pages/s tracked | slowdown | guest CPU ns/write untracked | tracked | harvest mean ms | max ms | 1 s WWS pages |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in d:
    w1s = r["windows"][2]["wws_pages_mean"]
    print(f"| {r['tracker']} | {r['workload']} | {r['guest_rate_untracked_pps']:.0f} | {r['guest_rate_tracked_pps']:.0f} "
          f"| {r['tracked_slowdown_pct']:.1f}% | {r['guest_cpu_ns_per_write_untracked']:.0f} | {r['guest_cpu_ns_per_write_tracked']:.0f} "
          f"| {r['harvest_mean_ms']:.3f} | {r['harvest_max_ms']:.3f} | {w1s if w1s is None else round(w1s)} |")
print("\n| tracker | migration (default workload) | rounds | total ms | downtime ms | final harvest ms | harvests | harvest total ms | max ms | verified | mismatched |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in m:
    print(f"| {r['tracker']} | {r['workload']} | {len(r['rounds'])} | {r['total_time_ms']:.0f} | {r['downtime_ms']:.2f} "
          f"| {r['downtime_breakdown_ms']['final_harvest']:.3f} | {r['dirty_sync_count']} | {r['harvest_total_ms']:.2f} "
          f"| {r['harvest_max_ms']:.3f} | {r['verified_pages']} | {r['mismatched_pages']} |")
if out:
    json.dump({"dirtyrate": d, "migrate": m}, open(out, "w"), indent=2)
EOF
