#!/usr/bin/env bash
# Run the criterion benchmarks. Each bench checks its claims before it
# measures (the counts it benches are right; predictions take seconds), so a
# failed claim fails this script.
#
# Usage: scripts/bench-criterion.sh [--quick] [BENCH...]
#   --quick   criterion's quick mode: a few seconds a benchmark, to check the
#             claims and get rough figures (not for the README's tables)
#   BENCH     core, trackers, predict, reduce (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
benches=()
for a in "$@"; do
  case "$a" in
    --quick) quick=(--quick) ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) benches+=("$a") ;;
  esac
done
[ ${#benches[@]} -gt 0 ] || benches=(core trackers predict reduce)
for b in "${benches[@]}"; do
  echo "== cargo bench --bench $b ${quick[*]:-}"
  cargo bench --bench "$b" -- "${quick[@]}"
done
