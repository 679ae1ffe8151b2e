#!/usr/bin/env bash
# compare-throttle.sh: one guest that outruns its link, migrated with no
# throttle, with QEMU's auto-converge and with a dirty limit; one table of
# medians: rounds, migration time, downtime, bytes sent, the final throttle
# and the guest's writes lost to throttling. Every run must complete with
# every page verified (an unthrottled run that does not converge still
# completes: --max-time ends its pre-copy).
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]
  --mem SIZE          guest memory (default 256M)
  --workload SPEC     (default uniform:rate=200k)
  --bandwidth RATE    the link's rate limit (default 500mbit)
  --dirty-limit RATE  the dirty limit's cap per vCPU, pages/s (default 10k)
  --max-time DUR      pre-copy's time limit (default 120s)
  --runs N            repeat each configuration N times; medians (default 1)
  --json FILE         also write the rows to FILE
  --help              print this help
Policy threshold (full passes) with its 300 ms downtime limit. LIVEMIG=/path/to/livemig uses
that binary instead of building one.
EOF
}

die() { echo "compare-throttle: $*" >&2; exit 1; }
bad_arg() { echo "compare-throttle: $*" >&2; usage >&2; exit 2; }
say() { echo "compare-throttle: $*" >&2; }

mem=256M workload=uniform:rate=200k bandwidth=500mbit limit=10k max_time=120s runs=1 json_out=""
while (($#)); do
  case "$1" in
    --mem|--workload|--bandwidth|--dirty-limit|--max-time|--runs|--json)
      if (($# < 2)) || [[ -z $2 ]]; then bad_arg "$1 needs a value"; fi
      case "$1" in
        --mem) mem=$2 ;;
        --workload) workload=$2 ;;
        --bandwidth) bandwidth=$2 ;;
        --dirty-limit) limit=$2 ;;
        --max-time) max_time=$2 ;;
        --runs) runs=$2 ;;
        --json) json_out=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_arg "unknown argument: $1" ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]{0,2}$ ]] || bad_arg "--runs must be a positive integer, not '$runs'"
command -v python3 >/dev/null || die "needs python3"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir compare-throttle

livemig=$(private_livemig)

common=(--mem "$mem" --workload "$workload" --bandwidth "$bandwidth" --policy threshold
  --max-time "$max_time" --quiet)
# Let livemig judge the flags before the first long run.
"$livemig" simulate "${common[@]}" --dirty-limit "$limit" --max-time 1s >/dev/null ||
  bad_arg "livemig refused these settings (above)"

configs=("none" "auto-converge" "dirty-limit $limit")
manifest=$tmp/manifest.tsv
: >"$manifest"
for ((r = 1; r <= runs; r++)); do
  for c in "${configs[@]}"; do
    case "$c" in
      none) opts=() ;;
      auto-converge) opts=(--auto-converge) ;;
      *) opts=(--dirty-limit "$limit") ;;
    esac
    say "run $r: $c"
    out=$tmp/$r-${c%% *}.json
    run_fg "$livemig" migrate "${common[@]}" "${opts[@]}" --json "$out" >/dev/null ||
      die "migration failed ($c, run $r): see above"
    printf '%s\t%s\n' "$c" "$out" >>"$manifest"
  done
done

python3 - "$manifest" "$json_out" "$mem" "$workload" "$bandwidth" <<'PY'
import json, statistics, sys

manifest, json_out, mem, workload, bandwidth = sys.argv[1:]
cells = {}
for line in open(manifest):
    c, path = line.rstrip("\n").split("\t")
    r = json.load(open(path))
    pages = r["memory_bytes"] // r["page_size"]
    if r["status"] != "completed" or r["verified_pages"] != pages or r["mismatched_pages"]:
        sys.exit(f"{c}: not verified: {r['status']} {r['error']}")
    cells.setdefault(c, []).append(r)

med = lambda xs: statistics.median(xs)
rows = []
for c, reps in cells.items():
    rows.append({
        "throttle": c, "runs": len(reps),
        "converged": sum(1 for r in reps if r["converged"]),
        "rounds": med([len(r["rounds"]) for r in reps]),
        "migration_time_ms": med([r["migration_time_ms"] for r in reps]),
        "downtime_ms": med([r["downtime_ms"] for r in reps]),
        "transferred_bytes": med([r["transferred_bytes"] for r in reps]),
        "cpu_throttle_percentage": med([r["cpu_throttle_percentage"] for r in reps]),
        "throttled_ms": med([r["throttled_ms"] for r in reps]),
        "guest_work_lost_writes": med([r["guest_work_lost_writes"] for r in reps]),
    })
print(f"{mem} guest, {workload}, {bandwidth}, policy threshold (300 ms); medians")
print("| throttle | converged | rounds | migration time | downtime | sent | final throttle | throttled | guest writes lost |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['throttle']} | {r['converged']}/{r['runs']} | {r['rounds']:.0f} | "
          f"{r['migration_time_ms'] / 1e3:.1f} s | {r['downtime_ms']:.0f} ms | "
          f"{r['transferred_bytes'] / 2**20:.0f} MiB | {r['cpu_throttle_percentage']:.0f}% | "
          f"{r['throttled_ms'] / 1e3:.1f} s | {r['guest_work_lost_writes'] / 1e6:.2f} M |")
if json_out:
    json.dump(rows, open(json_out, "w"), indent=1)
PY
