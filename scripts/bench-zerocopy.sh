#!/usr/bin/env bash
# bench-zerocopy.sh: whether MSG_ZEROCOPY would cut the sender's CPU per GiB
# on the testbed's veth link (scripts/zerocopy-probe.py, a sender shaped like
# livemig's: 256 KiB sends from a populated memfd). Copy and zerocopy runs
# alternate; each line gives both ends' CPU seconds per GiB and how many
# zerocopy sends the kernel copied anyway. Needs root.
set -euo pipefail
usage() { echo "Usage: $(basename "$0") [--runs N] [--mib M]   (default 3 runs of 1024 MiB each way)"; }
runs=3 mib=1024
while (($#)); do
  case "$1" in
    --runs) runs=${2:?--runs needs a value}; shift 2 ;;
    --mib) mib=${2:?--mib needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
((EUID == 0)) || { echo "bench-zerocopy: needs root (network namespaces)" >&2; exit 1; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "$*" >&2; }
die() { echo "bench-zerocopy: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir bench-zerocopy
prefix=zc$(($$ % 100000)) subnet=10.77.$((20 + $$ % 80))
bash "$root/scripts/testbed.sh" up --prefix "$prefix" --subnet "$subnet" --rate 10gbit >/dev/null
trap 'bash "$root/scripts/testbed.sh" down --prefix "$prefix" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
probe=$root/scripts/zerocopy-probe.py
for ((r = 1; r <= runs; r++)); do
  for mode in copy zerocopy; do
    ip netns exec "$prefix-h1" python3 "$probe" server "$subnet.2" 5999 >"$tmp/srv.log" 2>&1 &
    pid=$!
    for ((i = 0; i < 100; i++)); do grep -qs ready "$tmp/srv.log" && break; sleep 0.05; done
    grep -qs ready "$tmp/srv.log" || die "probe server did not start: $(cat "$tmp/srv.log")"
    ip netns exec "$prefix-h0" python3 "$probe" client "$subnet.2" 5999 "$mib" "$mode"
    wait "$pid"
    tail -n 1 "$tmp/srv.log"
  done
done
