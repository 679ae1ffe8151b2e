#!/usr/bin/env bash
# bench-start.sh: how fast a guest's memory is ready on both ends, by size.
# For each size, `livemig migrate` of an idle guest, RUNS times: the source
# guest's start (guest_start_ms: spawned, memory populated and stamped, its
# vCPUs running) and the destination's preallocation (receiver_prealloc_ms),
# as medians and as GB/s (10^9 bytes/s) of guest memory; every page must
# verify. Target (issue 16): >= 2 GB/s each. Needs twice the largest size
# free. Wall times: on a shared machine they swing with its load.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--sizes LIST] [--runs N] [--json FILE]
  --sizes LIST  comma-separated guest sizes (default 1G,4G,8G)
  --runs N      runs per size (default 5); medians are reported
  --json FILE   also write the figures as JSON to FILE
  --help        print this help
LIVEMIG=PATH runs that binary instead of building this tree's.
USAGE
}

sizes=1G,4G,8G runs=5 json_out=""
while (($#)); do
  case "$1" in
    --sizes) sizes=${2:?--sizes needs a value}; shift 2 ;;
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --json) json_out=${2:?--json needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "--runs: not a positive count: $runs" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir bench-start
livemig=$(private_livemig)

IFS=, read -r -a size_list <<<"$sizes"
for s in "${size_list[@]}"; do
  for ((r = 1; r <= runs; r++)); do
    say "migrate --mem $s --workload idle (run $r of $runs) ..."
    run_fg "$livemig" migrate --quiet --mem "$s" --workload idle --json "$tmp/$s-$r.json" >/dev/null
  done
done

python3 - "$tmp" "$json_out" "$runs" "${size_list[@]}" <<'PY'
import json, statistics, sys
tmp, out, runs, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rows = []
for s in sizes:
    reps = [json.load(open(f"{tmp}/{s}-{r}.json")) for r in range(1, runs + 1)]
    for r in reps:
        if r["mismatched_pages"] or r["verified_pages"] * r["page_size"] != r["memory_bytes"]:
            sys.exit(f"{s}: {r['verified_pages']} pages verified, {r['mismatched_pages']} mismatched")
    size = reps[0]["memory_bytes"]
    # Builds before guest_start_ms: the source's whole start (spawn, fill, map).
    start = [r.get("guest_start_ms") or r["source_start_ms"] for r in reps]
    source = [r["source_start_ms"] for r in reps]
    prealloc = [r["receiver_prealloc_ms"] for r in reps]
    med = lambda v: statistics.median(v)
    rows.append({
        "memory_bytes": size,
        "guest_start_ms": med(start), "guest_start_ms_runs": start,
        "guest_start_gbps": size / med(start) / 1e6,
        "source_start_ms": med(source),
        "receiver_prealloc_ms": med(prealloc), "receiver_prealloc_ms_runs": prealloc,
        "receiver_prealloc_gbps": size / med(prealloc) / 1e6,
        "verified_pages": reps[0]["verified_pages"],
    })
print(f"idle guest, medians of {runs} run(s); GB/s = 10^9 bytes of guest memory per second (target >= 2)")
print("| guest | guest start ms | GB/s | source start ms (with the sender's mapping) | destination prealloc ms | GB/s | pages verified |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['memory_bytes'] / 2**30:g} GiB | {r['guest_start_ms']:.0f} | {r['guest_start_gbps']:.2f} "
          f"| {r['source_start_ms']:.0f} | {r['receiver_prealloc_ms']:.0f} | {r['receiver_prealloc_gbps']:.2f} | {r['verified_pages']} |")
if out:
    with open(out, "w") as f:
        json.dump({"runs": runs, "workload": "idle", "sizes": rows}, f, indent=2)
PY
