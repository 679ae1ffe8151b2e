#!/usr/bin/env bash
# compare-cpucap.sh: a CPU-bound guest (compute:ops=10000,wws=1M) migrated
# under --cpu-cap 25, 50 and 100 with each method this machine offers, and
# uncapped: the median over --runs of its operations/s and CPU use (percent
# of one CPU, from the migration's start to its pause), and each as a ratio
# to the uncapped runs, which are interleaved with the capped ones so they
# meet the same load.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [--runs N] [--mem SIZE] [--bandwidth RATE]
  --runs N          migrations per row; the table has medians (default 3)
  --mem SIZE        guest memory (default 16M)
  --bandwidth RATE  rate limit, so each migration lasts a while (default 100mbit)
LIVEMIG=/path/to/livemig uses that binary instead of building one.
EOF
}

runs=3 mem=16M bandwidth=100mbit
while (($#)); do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --bandwidth) bandwidth=$2; shift 2 ;;
    --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "compare-cpucap: $*" >&2; }
die() { say "$*"; exit 1; }
# shellcheck source=lib.sh
source "$root/scripts/lib.sh"
scratch_dir compare-cpucap
livemig=$(private_livemig)

rows=(none 25:auto 25:duty-cycle 50:auto 50:duty-cycle 100:auto)
for ((i = 0; i < runs; i++)); do
  for row in "${rows[@]}"; do
    args=(migrate --quiet --mem "$mem" --bandwidth "$bandwidth"
      --workload compute:ops=10000,wws=1M --json "$tmp/$row.$i.json")
    [[ $row == none ]] || args+=(--cpu-cap "${row%%:*}" --cpu-cap-method "${row#*:}")
    run_fg "$livemig" "${args[@]}" >/dev/null || die "migration $row failed"
  done
done

python3 - "$tmp" "$runs" "${rows[@]}" <<'PY'
import json, statistics, sys
tmp, runs, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def med(row, key):
    return statistics.median(json.load(open(f"{tmp}/{row}.{i}.json"))[key] for i in range(runs))
free = med("none", "guest_ops_rate")
print("| cap | method used | ops/s (median) | vs uncapped | guest CPU % |")
print("|---|---|---|---|---|")
for row in rows:
    method = json.load(open(f"{tmp}/{row}.0.json")).get("cpu_cap_method", "-")
    ops, cpu = med(row, "guest_ops_rate"), med(row, "guest_cpu_pct")
    cap = row.split(":")[0]
    print(f"| {cap} | {method} | {ops / 1e6:.1f} M | {ops / free:.2f} | {cpu:.0f} |")
PY
