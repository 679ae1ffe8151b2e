#!/usr/bin/env bash
# testbed.sh: hosts for livemig on one machine. Network namespaces joined
# by veth pairs to a bridge (in a namespace of its own), each host's link
# shaped with tc tbf, so `livemig receive` and `livemig send` talk over a
# real, rate-limited network path. Only addresses inside the namespaces it
# creates are used. Needs root. This kernel has no netem (no added delay or
# loss); where netem exists, add it under the tbf qdisc by hand.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") up|down|status [options]
  up       create the hosts (a clear message if they exist already)
  down     remove everything 'up' made
  status   show the hosts, their addresses and their shaping
Options:
  --hosts N        hosts to create (default 2)
  --rate RATE      each host's egress rate, tc syntax (default 1gbit)
  --burst SIZE     tbf bucket size (default 256kb)
  --prefix NAME    namespace name prefix (default lm)
  --subnet A.B.C   the hosts' /24 (default 10.77.0); host i is A.B.C.(i+1)
  --split K        two groups of hosts: 0..K-1 ("a") and K.. ("b"), each on a
                   bridge of its own, the bridges joined by one interlink;
                   each host's incoming traffic is shaped to --rate too
  --interlink RATE the interlink's rate each way, tc syntax (default 1gbit)
  --help           print this help
EOF
}

cmd=${1:-}
[[ $cmd == -h || $cmd == --help ]] && { usage; exit 0; }
[[ $cmd == up || $cmd == down || $cmd == status ]] || { usage >&2; exit 2; }
shift
hosts=2 rate=1gbit burst=256kb prefix=lm subnet=10.77.0 split=0 interlink=1gbit
while (($#)); do
  case "$1" in
    --hosts) hosts=${2:?--hosts needs a value}; shift 2 ;;
    --rate) rate=${2:?--rate needs a value}; shift 2 ;;
    --burst) burst=${2:?--burst needs a value}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a value}; shift 2 ;;
    --subnet) subnet=${2:?--subnet needs a value}; shift 2 ;;
    --split) split=${2:?--split needs a value}; shift 2 ;;
    --interlink) interlink=${2:?--interlink needs a value}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "testbed.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $hosts =~ ^[0-9]+$ ]] && ((hosts >= 2 && hosts <= 200)) ||
  { echo "testbed.sh: --hosts must be between 2 and 200" >&2; exit 2; }
[[ $split =~ ^[0-9]+$ ]] && ((split == 0 || split < hosts)) ||
  { echo "testbed.sh: --split K needs 1 <= K < --hosts (K hosts in group a, the rest in b)" >&2; exit 2; }
[[ $prefix =~ ^[a-z][a-z0-9]{0,7}$ ]] ||
  { echo "testbed.sh: --prefix must be 1-8 lower-case letters or digits, starting with a letter" >&2; exit 2; }
[[ $subnet =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] ||
  { echo "testbed.sh: --subnet must look like 10.77.0" >&2; exit 2; }
if ((EUID != 0)); then
  echo "testbed.sh: must run as root (it creates network namespaces and links)" >&2
  exit 1
fi
command -v ip >/dev/null && command -v tc >/dev/null ||
  { echo "testbed.sh: needs ip and tc (Debian: apt-get install iproute2)" >&2; exit 1; }

switch=$prefix-sw
host() { echo "$prefix-h$1"; }
ours() { ip netns list | awk '{print $1}' | grep -E "^$prefix-(sw|h[0-9]+)$" || true; }

down() {
  local ns
  for ns in $(ours); do ip netns del "$ns"; done
}

status() {
  local ns i=0
  if [[ -z $(ours) ]]; then
    echo "testbed $prefix: down"
    return
  fi
  echo "testbed $prefix: up"
  while ip netns list | awk '{print $1}' | grep -qx "$(host $i)"; do
    ns=$(host $i)
    local addr qdisc
    addr=$(ip -n "$ns" -4 -o addr show dev eth0 | awk '{print $4}')
    qdisc=$(tc -n "$ns" qdisc show dev eth0 | awk '/tbf/ {for (k = 1; k <= NF; k++) if ($k == "rate") print $(k + 1)}')
    local group=""
    ip -n "$switch" -o link show "p$i" | grep -q "master br1" && group="  group b"
    ip -n "$switch" link show br1 >/dev/null 2>&1 && [[ -z $group ]] && group="  group a"
    echo "  $ns  ${addr%/*}  egress ${qdisc:-unshaped}$group  (ip netns exec $ns COMMAND)"
    i=$((i + 1))
  done
  if ip -n "$switch" link show ia >/dev/null 2>&1; then
    qdisc=$(tc -n "$switch" qdisc show dev ia | awk '/tbf/ {for (k = 1; k <= NF; k++) if ($k == "rate") print $(k + 1)}')
    echo "  interlink a<->b  ${qdisc:-unshaped} each way"
  fi
}

up() {
  if [[ -n $(ours) ]]; then
    echo "testbed.sh: testbed '$prefix' is up already (run 'down' first to change it)" >&2
    status
    return 0
  fi
  # Whatever fails half-way, leave nothing behind.
  trap 'echo "testbed.sh: setting up failed; removing what was made" >&2; down' ERR
  ip netns add "$switch"
  ip -n "$switch" link add br0 type bridge
  ip -n "$switch" link set br0 up
  if ((split > 0)); then
    # Group b's bridge, joined to group a's by the interlink: a veth pair
    # whose two ends each shape the traffic leaving their bridge.
    ip -n "$switch" link add br1 type bridge
    ip -n "$switch" link set br1 up
    ip -n "$switch" link add ia type veth peer name ib
    ip -n "$switch" link set ia master br0 up
    ip -n "$switch" link set ib master br1 up
    tc -n "$switch" qdisc add dev ia root tbf rate "$interlink" burst "$burst" latency 50ms
    tc -n "$switch" qdisc add dev ib root tbf rate "$interlink" burst "$burst" latency 50ms
  fi
  for ((i = 0; i < hosts; i++)); do
    local ns
    ns=$(host $i)
    ip netns add "$ns"
    ip -n "$ns" link add eth0 type veth peer name "p$i" netns "$switch"
    local bridge=br0
    ((split > 0 && i >= split)) && bridge=br1
    ip -n "$switch" link set "p$i" master "$bridge" up
    # Grouped: a host's incoming traffic is shaped too (its NIC's other way).
    ((split > 0)) && tc -n "$switch" qdisc add dev "p$i" root tbf rate "$rate" burst "$burst" latency 50ms
    ip -n "$ns" addr add "$subnet.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    tc -n "$ns" qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 50ms
  done
  trap - ERR
  status
}

case $cmd in
  up) up ;;
  down) down; echo "testbed $prefix: down" ;;
  status) status ;;
esac
