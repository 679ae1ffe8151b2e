#!/usr/bin/env bash
# Fuzz livemig's wire decoding, coverage-guided, with libFuzzer through
# cargo-fuzz: the frame decoder and data path (target `frame`) and the
# destination's handling of a whole session (target `session`), each for
# DURATION. Seeds: fuzz/seeds/ (committed) and sessions recorded now from a
# real `send` (fuzz/corpus/fresh/), so they always speak this build's
# protocol. What the fuzzer finds is kept in fuzz/corpus/TARGET; crashes
# land in fuzz/artifacts/TARGET/ (reproduce one with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run -a TARGET FILE` in fuzz/).
#
# Usage: scripts/fuzz.sh DURATION [TARGET...]
#   DURATION  per target: seconds, or 30s, 15m, 2h
#   TARGET    frame, session (default: both)
#
# Stable toolchain: cargo-fuzz passes rustc the -Z flags of the sanitizer
# and coverage instrumentation, which RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept; libFuzzer itself is built with the machine's C++ compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  ''|-h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
dur=$1; shift
case "$dur" in
  *h) secs=$(( ${dur%h} * 3600 )) ;;
  *m) secs=$(( ${dur%m} * 60 )) ;;
  *s) secs=${dur%s} ;;
  *) secs=$dur ;;
esac
[[ "$secs" =~ ^[0-9]+$ && "$secs" -gt 0 ]] || { echo "bad DURATION \"$dur\" (e.g. 900, 15m, 1h)" >&2; exit 2; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame session)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1

echo "== recording fresh seed sessions"
LIVEMIG_SEEDS="$PWD/fuzz/corpus/fresh" \
  cargo test --release --test misbehave -- --ignored record_fuzz_seeds --quiet

cd fuzz
mkdir -p artifacts
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="artifacts/$t.log"
  echo "== $t for ${secs}s (log: fuzz/$log)"
  # -a: debug assertions, so an arithmetic overflow is a crash too.
  # One process, so the stats below are the run's; at most 10 s an
  # input; one allocation over 64 MiB is a crash (the protocol's caps
  # allow a few MiB at most).
  status=0
  cargo fuzz run -a "$t" "corpus/$t" "seeds/$t" "corpus/fresh/$t" -- \
    -max_total_time="$secs" -timeout=10 -malloc_limit_mb=64 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  crashes=$(find "artifacts/$t" -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' | wc -l)
  summary+=("$t: ${execs:-?} executions, ${cov:-?} edges (cov), ${ft:-?} features (ft), corpus $(ls "corpus/$t" | wc -l) inputs, $crashes crash/timeout/oom files, exit $status")
  if [ "$status" -ne 0 ]; then
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5 || true
  fi
done
echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
