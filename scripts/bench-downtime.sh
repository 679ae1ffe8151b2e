#!/usr/bin/env bash
# bench-downtime.sh: the downtime of an idle guest and of each of its
# phases over repeated runs (p50, p99), next to the floors of this machine
# (a signal stop, a futex wake, a loopback round trip: `livemig floors`),
# and what a pre-copy round costs with 1 and with 4 streams, measured in
# one run of this script, alternating.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [--runs N] [--mem SIZE] [--stream-runs N] [--json FILE]
  --runs N         idle migrations to time (default 20)
  --mem SIZE       their guest memory (default 256M)
  --stream-runs N  migrations per stream count for the round cost (default 5; 0: skip)
  --json FILE      also write every figure as one JSON object to FILE
  --help           print this help
Set LIVEMIG=PATH to measure that binary instead of a fresh release build.
EOF
}
say() { echo "bench-downtime: $*" >&2; }
die() { say "$*"; exit 1; }
bad_arg() { say "$*"; usage >&2; exit 2; }

runs=20 mem=256M stream_runs=5 json_out=""
while (($#)); do
  case "$1" in
    --runs|--mem|--stream-runs|--json)
      (($# >= 2)) || bad_arg "$1 needs a value"
      case "$1" in
        --runs) runs=$2 ;;
        --mem) mem=$2 ;;
        --stream-runs) stream_runs=$2 ;;
        --json) json_out=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_arg "unknown argument: $1" ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || bad_arg "--runs must be a positive integer, not '$runs'"
[[ $stream_runs =~ ^[0-9]+$ ]] || bad_arg "--stream-runs must be a whole number, not '$stream_runs'"
[[ $mem =~ ^[0-9]+(\.[0-9]+)?[KMGTkmgt]?(i?B)?$ ]] || bad_arg "--mem must be a size like 256M, not '$mem'"
if [[ -n $json_out ]]; then
  [[ -d $(dirname -- "$json_out") ]] || bad_arg "--json: no directory $(dirname -- "$json_out")"
fi
command -v python3 >/dev/null || die "needs python3"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir bench-downtime
livemig=$(private_livemig)

say "floors (1000 samples each)"
run_fg "$livemig" floors --samples 1000 >"$tmp/floors.json"

for ((i = 1; i <= runs; i++)); do
  say "idle $mem guest, run $i of $runs"
  run_fg "$livemig" migrate --mem "$mem" --workload idle --warmup 200ms --quiet \
    --json "$tmp/idle-$i.json" >/dev/null
done

# A small hot set, a fixed number of rounds: each round carries a few
# pages, so its time is what a round costs besides its pages (harvest,
# round trips, the streams' hand-offs).
for ((i = 1; i <= stream_runs; i++)); do
  for streams in 1 4; do
    say "round cost with $streams stream(s), run $i of $stream_runs"
    run_fg "$livemig" migrate --mem 64M --workload hotset:wws=256K,rate=2k --warmup 200ms \
      --policy fixed:40 --streams "$streams" --quiet --json "$tmp/streams-$streams-$i.json" >/dev/null
  done
done

python3 - "$tmp" "$runs" "$stream_runs" "$mem" "$json_out" <<'PY'
import json, os, statistics, sys
tmp, runs, stream_runs, mem, json_out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def pct(v, q):
    v = sorted(v)
    return v[round((len(v) - 1) * q)]
floors = json.load(open(os.path.join(tmp, "floors.json")))
reps = [json.load(open(os.path.join(tmp, f"idle-{i}.json"))) for i in range(1, runs + 1)]
phases = ["pause", "final_harvest", "last_pages", "device_state", "resume"]
out = {"mem": mem, "runs": runs, "floors_us": floors, "phases_ms": {}}
d = [r["downtime_ms"] for r in reps]
out["downtime_ms"] = {"p50": pct(d, 0.5), "p99": pct(d, 0.99), "max": max(d)}
print(f"idle {mem} guest, {runs} runs (the machine is shared with other builds)")
print(f"{'':16}{'p50 ms':>9}{'p99 ms':>9}")
print(f"{'downtime':16}{pct(d, .5):9.3f}{pct(d, .99):9.3f}")
for p in phases:
    v = [r["downtime_breakdown_ms"][p] for r in reps]
    out["phases_ms"][p] = {"p50": pct(v, 0.5), "p99": pct(v, 0.99)}
    print(f"{'  ' + p:16}{pct(v, .5):9.3f}{pct(v, .99):9.3f}")
sw = [r["downtime_sleeps"] for r in reps if r.get("downtime_sleeps")]
if sw:
    out["sleeps_p50"] = {p: pct([s[p] for s in sw], 0.5) for p in sw[0]}
    print("times the sender slept in each phase (p50):",
          ", ".join(f"{k} {v}" for k, v in out["sleeps_p50"].items()))
print("floors (us, p50/p99): " + ", ".join(
    f"{k} {v['p50_us']:.1f}/{v['p99_us']:.1f}" for k, v in floors.items()))
if stream_runs:
    per = {}
    for s in (1, 4):
        med = []
        for i in range(1, stream_runs + 1):
            r = json.load(open(os.path.join(tmp, f"streams-{s}-{i}.json")))
            rounds = [x["duration_ms"] for x in r["rounds"][1:] if not x.get("stop_and_copy")]
            med.append(statistics.median(rounds))
        per[s] = statistics.median(med)
    out["round_ms"] = {"streams_1": per[1], "streams_4": per[4], "extra_4_vs_1": per[4] - per[1]}
    print(f"pre-copy round (median of run medians): 1 stream {per[1]:.3f} ms, "
          f"4 streams {per[4]:.3f} ms, {per[4] - per[1]:+.3f} ms with 4")
# The figures scripts/bench.sh lifts into its headline.
out["headline"] = {"p50_ms": out["downtime_ms"]["p50"], "p99_ms": out["downtime_ms"]["p99"]}
if "round_ms" in out:
    out["headline"]["streams_4_extra_ms"] = out["round_ms"]["extra_4_vs_1"]
if json_out:
    with open(json_out, "w") as f:
        json.dump(out, f, indent=1)
PY
