#!/usr/bin/env bash
# What securing the connections costs: round 0 goodput of an idle guest
# (acknowledged by the receiver) with --transport plain, tls and psk, on
# loopback (livemig migrate) and, as root, over a veth link shaped to
# 1 Gbit/s (scripts/testbed.sh). Runs interleave the transports, so each
# run's ratios compare like with like; medians of --runs (default 3).
#
#   scripts/bench-tls.sh [--runs N] [--mem 1G] [--shaped-mem 256M] [--no-shaped]
set -euo pipefail
runs=3 mem=1G shaped_mem=256M shaped=yes
while (($#)); do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --mem) mem=$2; shift 2 ;;
    --shaped-mem) shaped_mem=$2; shift 2 ;;
    --no-shaped) shaped=no; shift ;;
    *) echo "usage: $0 [--runs N] [--mem SIZE] [--shaped-mem SIZE] [--no-shaped]" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
cargo build --release --quiet --manifest-path "$here/../Cargo.toml"
livemig=$here/../target/release/livemig
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$livemig" certs "$tmp/pki" --hosts 10.199.0.1,10.199.0.2 >/dev/null
head -c 32 /dev/urandom >"$tmp/psk"
# Flags of transport $1 for host $2 (an address the certificates name).
flags() {
  case $1 in
    plain) echo --insecure ;;
    psk) echo --psk "$tmp/psk" ;;
    tls) echo --tls-ca "$tmp/pki/ca.crt" --tls-cert "$tmp/pki/$2.crt" --tls-key "$tmp/pki/$2.key" ;;
  esac
}
goodput() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rounds"][0]["throughput_mbps"])' "$1"; }
results=$tmp/results.tsv
: >"$results"
for ((r = 1; r <= runs; r++)); do
  for n in 1 4; do
    for t in plain tls psk; do
      # shellcheck disable=SC2046
      "$livemig" migrate --mem "$mem" --workload idle --tracker bitmap --warmup 100ms --quiet \
        --streams "$n" $(flags "$t" 10.199.0.1) --json "$tmp/lo.json" >/dev/null
      printf 'loopback %s\t%s\t%s\t%s\n' "$mem" "$n" "$t" "$(goodput "$tmp/lo.json")" >>"$results"
    done
  done
done
if [[ $shaped == yes && $(id -u) == 0 ]]; then
  bed=(--prefix bt$$ --subnet 10.199.0)
  bash "$here/testbed.sh" up "${bed[@]}" --rate 1gbit >/dev/null
  trap 'bash "$here/testbed.sh" down "${bed[@]}" >/dev/null; rm -rf "$tmp"' EXIT
  dst=10.199.0.2:4444
  for ((r = 1; r <= runs; r++)); do
    for n in 1 4; do
      for t in plain tls psk; do
        # shellcheck disable=SC2046
        ip netns exec "bt$$-h1" "$livemig" receive --listen "$dst" --mem "$shaped_mem" \
          $(flags "$t" 10.199.0.2) >"$tmp/recv.log" 2>&1 &
        pid=$!
        until grep -qs "waiting for a migration" "$tmp/recv.log"; do
          kill -0 "$pid" 2>/dev/null || { cat "$tmp/recv.log" >&2; exit 1; }
          sleep 0.05
        done
        # shellcheck disable=SC2046
        ip netns exec "bt$$-h0" "$livemig" send --to "$dst" --mem "$shaped_mem" --workload idle \
          --tracker bitmap --warmup 100ms --quiet --streams "$n" $(flags "$t" 10.199.0.1) \
          --json "$tmp/sh.json" >/dev/null
        wait "$pid"
        printf 'veth 1 Gbit/s %s\t%s\t%s\t%s\n' "$shaped_mem" "$n" "$t" "$(goodput "$tmp/sh.json")" >>"$results"
      done
    done
  done
fi
python3 - "$results" "$runs" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    path, n, t, mbps = line.rstrip("\n").split("\t")
    rows[(path, int(n), t)].append(float(mbps))
print(f"round 0 goodput, Gbit/s, median of {sys.argv[2]} run(s)")
print("| path | streams | plain | tls | psk | tls/plain | psk/plain |")
print("|---|---:|---:|---:|---:|---:|---:|")
for path, n in dict.fromkeys((p, n) for p, n, _ in rows):
    m = {t: statistics.median(rows[(path, n, t)]) / 1000 for t in ("plain", "tls", "psk")}
    print(f"| {path} | {n} | {m['plain']:.2f} | {m['tls']:.2f} | {m['psk']:.2f} "
          f"| {m['tls'] / m['plain']:.2f} | {m['psk'] / m['plain']:.2f} |")
PY
