#!/usr/bin/env bash
# big-guest.sh: one big local migration (default 8 GiB, default workload)
# and where its wall time goes: the source guest's start (spawned, its
# memory filled, mapped by the sender), the destination's preallocation,
# the warm-up, the migration itself (rounds, downtime, verification), and
# what is left: both guests' memory freed as the processes end.
# Needs twice the guest's memory free.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--mem SIZE] [--json FILE]
  --mem SIZE    guest memory (default 8G)
  --json FILE   also keep the migration's report in FILE
  --help        print this help
USAGE
}

mem=8G json_out=""
while (($#)); do
  case "$1" in
    --mem) mem=${2:?--mem needs a value}; shift 2 ;;
    --json) json_out=${2:?--json needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d)
fg_pid=""
trap '[[ -n $fg_pid ]] && kill -INT "$fg_pid" 2>/dev/null; rm -rf "$tmp"' EXIT
say() { echo "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
livemig=$(private_livemig)

say "migrate --mem $mem (default workload) ..."
start=$(date +%s.%N)
run_fg "$livemig" migrate --quiet --mem "$mem" --json "$tmp/report.json" >/dev/null
end=$(date +%s.%N)
[[ -n $json_out ]] && cp "$tmp/report.json" "$json_out"

python3 - "$tmp/report.json" "$start" "$end" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
wall = (float(sys.argv[3]) - float(sys.argv[2])) * 1e3
start, prealloc = r["source_start_ms"] or 0, r["receiver_prealloc_ms"] or 0
# The warm-up measures the guest's rate untracked: 1 s by default.
warmup = 1000.0
total = r["total_time_ms"]
rest = wall - start - prealloc - warmup - total
d = r["downtime_breakdown_ms"]
print(f"guest {r['memory_bytes'] >> 30} GiB, {r['workload']}, {len(r['rounds'])} rounds "
      f"({r['stop_reason']}), {r['verified_pages']} pages verified, {r['mismatched_pages']} mismatched\n")
print("| part of the wall time | ms | share |")
print("|---|---:|---:|")
for name, ms in [("source guest start (spawn, fill, map)", start),
                 ("destination preallocation", prealloc),
                 ("warm-up", warmup),
                 ("migration: setup, rounds, downtime, verification", total),
                 ("the rest: processes ending, memory freed", rest)]:
    print(f"| {name} | {ms:.0f} | {100 * ms / wall:.0f}% |")
print(f"| **wall time** | **{wall:.0f}** | |\n")
print(f"migration time {r['migration_time_ms']:.0f} ms (round 0: {r['rounds'][0]['duration_ms']:.0f} ms "
      f"at {r['rounds'][0]['throughput_mbps']:.0f} Mbit/s), verification {total - r['migration_time_ms']:.0f} ms")
print(f"downtime {r['downtime_ms']:.2f} ms = pause {d['pause']:.2f} + final harvest {d['final_harvest']:.2f} "
      f"+ last pages {d['last_pages']:.2f} + device state {d['device_state']:.2f} + resume {d['resume']:.2f}")
print(f"harvests {r['dirty_sync_count']}, {r['harvest_total_ms']:.0f} ms in all, longest {r['harvest_max_ms']:.0f} ms")
PY
