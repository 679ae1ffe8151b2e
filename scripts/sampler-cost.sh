#!/usr/bin/env bash
# sampler-cost.sh: what the timeline's sampler costs the guest. Runs the
# same migration in pairs, sampled (--sample-every, default 10ms) and not
# (--sample-every 0), alternating so both see the same machine load, and
# compares the guest's write rate during pre-copy (guest_rate_precopy_pps):
# the median of the pairs' ratios, and each side's median. Also prints the
# sampler thread's CPU time per second of migration.
# The guest writes as fast as it can (uniform:rate=max), so any CPU the
# sampler takes from it shows; a fixed number of rounds at a rate limit
# makes pre-copy long enough to measure.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [--pairs N] [--every DUR] [--mem SIZE]
  --pairs N    sampled/unsampled pairs (default 5)
  --every DUR  the sampled runs' --sample-every (default 10ms)
  --mem SIZE   guest memory (default 32M)
LIVEMIG=/path/to/livemig uses that binary instead of building one.
EOF
}
die() { echo "sampler-cost: $*" >&2; exit 1; }
say() { echo "sampler-cost: $*" >&2; }

pairs=5 every=10ms mem=32M
while (($#)); do
  case "$1" in
    --pairs) pairs=${2:?}; shift 2 ;;
    --every) every=${2:?}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[[ $pairs =~ ^[1-9][0-9]?$ ]] || { usage >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir sampler-cost
livemig=$(private_livemig)

args=(migrate --quiet --mem "$mem" --workload uniform:rate=max --policy fixed:8
      --bandwidth 400mbit --warmup 500ms)
for ((i = 1; i <= pairs; i++)); do
  say "pair $i/$pairs"
  for s in "$every" 0; do
    run_fg "$livemig" "${args[@]}" --sample-every "$s" --json "$tmp/$i-$s.json" >/dev/null ||
      die "migration failed (--sample-every $s)"
  done
done

python3 - "$tmp" "$pairs" "$every" <<'PY'
import json, statistics, sys
tmp, pairs, every = sys.argv[1], int(sys.argv[2]), sys.argv[3]
load = lambda i, s: json.load(open(f"{tmp}/{i}-{s}.json"))
on = [load(i, every) for i in range(1, pairs + 1)]
off = [load(i, "0") for i in range(1, pairs + 1)]
rate = lambda r: r["guest_rate_precopy_pps"]
ratios = [rate(a) / rate(b) for a, b in zip(on, off)]
cpu = [r["sampler_cpu_ms"] / r["total_time_ms"] * 1e3 for r in on]
samples = [len(r["timeline"]) for r in on]
print(f"guest writes/s during pre-copy, {pairs} pairs, sampled every {every} vs not:")
print(f"  sampled   median {statistics.median(map(rate, on)):.0f}")
print(f"  unsampled median {statistics.median(map(rate, off)):.0f}")
print(f"  ratio sampled/unsampled: median {statistics.median(ratios):.3f} "
      f"(pairs {min(ratios):.3f}..{max(ratios):.3f})")
print(f"  sampler CPU: median {statistics.median(cpu):.2f} ms per second of migration, "
      f"{statistics.median(samples):.0f} samples a run")
PY
