#!/usr/bin/env bash
# bench-throughput.sh: livemig's goodput next to a raw TCP baseline, in one
# run. iperf3 with one and N streams, and livemig migrating an idle guest with
# --streams 1 and N, first on loopback, then (as root) between two network
# namespaces joined by a veth link shaped with tbf (scripts/testbed.sh).
# Prints the ratios against the targets: livemig >= 0.9 x iperf3 on loopback
# (same stream count), livemig >= 0.95 x the rate on the shaped link.
# Then the CPU time per GiB moved at each end (a `cpu per GiB` line): livemig
# send and receive as separate processes over loopback, each timing its own
# CPU (/proc) over round 0, against the CPU iperf3's client and server report
# in the same series; target <= 1.2 x iperf3's, sender and receiver each.
# Supersedes bench-loopback.sh.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]
  --mem SIZE         guest memory on loopback (default 1G)
  --shaped-mem SIZE  guest memory on the shaped link (default 256M: 1 GiB at
                     1 Gbit/s takes 9 s a run)
  --streams N        the second stream count, for iperf3 -P and livemig
                     --streams (default 4; 1 measures one stream only)
  --rate RATE        the shaped link's rate, tc syntax (default 1gbit)
  --runs N           repeat every measurement N times; report the medians
                     (default 1)
  --json FILE        also write the figures as JSON to FILE
  --help             print this help
The shaped link needs root (network namespaces); without it only loopback is
measured. LIVEMIG=/path/to/livemig uses that binary instead of building one.
Each iperf3 measurement lasts 5 s. The exit status is 0 whether or not the
targets are met, 1 when a measurement fails, 2 on a bad argument.
EOF
}

die() { echo "bench-throughput: $*" >&2; exit 1; }
bad_arg() { echo "bench-throughput: $*" >&2; usage >&2; exit 2; }
say() { echo "bench-throughput: $*" >&2; }

mem=1G shaped_mem=256M streams=4 rate=1gbit runs=1 json_out=""
while (($#)); do
  case "$1" in
    --mem|--shaped-mem|--streams|--rate|--runs|--json)
      if (($# < 2)) || [[ -z $2 ]]; then bad_arg "$1 needs a value"; fi
      case "$1" in
        --mem) mem=$2 ;;
        --shaped-mem) shaped_mem=$2 ;;
        --streams) streams=$2 ;;
        --rate) rate=$2 ;;
        --runs) runs=$2 ;;
        --json) json_out=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_arg "unknown argument: $1" ;;
  esac
done
size_re='^[0-9]+(\.[0-9]+)?[KMGTkmgt]?(i?B)?$'
[[ $mem =~ $size_re ]] || bad_arg "--mem must be a size like 256M or 1G, not '$mem'"
[[ $shaped_mem =~ $size_re ]] || bad_arg "--shaped-mem must be a size like 256M or 1G, not '$shaped_mem'"
[[ $runs =~ ^[1-9][0-9]*$ ]] || bad_arg "--runs must be a positive integer, not '$runs'"
if ! [[ $streams =~ ^[1-9][0-9]{0,2}$ ]] || ((streams > 64)); then
  bad_arg "--streams must be between 1 and 64, not '$streams'"
fi
if [[ -n $json_out ]]; then
  [[ -d $(dirname -- "$json_out") ]] || bad_arg "--json: no directory $(dirname -- "$json_out")"
fi
command -v python3 >/dev/null || die "needs python3"

# The shaped rate in bits/s, read the way tc reads it (SI and IEC units,
# bit or byte based; 'mbps' is megabytes/s to tc). A unit is required.
rate_bps=$(python3 - "$rate" <<'PY'
import re, sys
m = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Za-z]+)", sys.argv[1].strip())
units = {}
for i, p in enumerate(["", "k", "m", "g", "t"]):
    units[p + "bit"], units[p + "bps"] = 1000**i, 8 * 1000**i
    if p:
        units[p + "ibit"], units[p + "ibps"] = 1024**i, 8 * 1024**i
if not m or m[2].lower() not in units or float(m[1]) <= 0:
    sys.exit(1)
print(int(float(m[1]) * units[m[2].lower()]))
PY
) || bad_arg "--rate must be a tc rate like 500mbit or 1gbit, not '$rate'"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-throughput.$$.XXXXXX")
server_pids=()  # iperf3 servers and livemig receivers still running
fg_pid=""       # the measurement running now
bed=""          # the testbed's prefix once it is up
bed_pids() {
  local ns
  for ns in "$bed-h0" "$bed-h1"; do ip netns pids "$ns" 2>/dev/null || true; done
}
cleanup() {
  local pid
  for pid in "${server_pids[@]}" $fg_pid; do
    kill "$pid" 2>/dev/null || true
  done
  if [[ -n $bed ]]; then
    # Processes left in our namespaces (a receiver, its guest, a server)
    # would outlive 'ip netns del': end them by id first.
    local i
    for pid in $(bed_pids); do kill "$pid" 2>/dev/null || true; done
    for ((i = 0; i < 30; i++)); do
      [[ -z $(bed_pids) ]] && break
      sleep 0.1
    done
    for pid in $(bed_pids); do kill -KILL "$pid" 2>/dev/null || true; done
    bash "$root/scripts/testbed.sh" down --prefix "$bed" >/dev/null 2>&1 ||
      echo "bench-throughput: testbed $bed did not come down; run: scripts/testbed.sh down --prefix $bed" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"

# Wait up to $2 seconds for server $1 to exit; its status, or 124.
wait_server() {
  local pid=$1 i rc=0
  for ((i = 0; i < $2 * 10; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" || rc=$?
      forget_server "$pid"
      return "$rc"
    fi
    sleep 0.1
  done
  return 124
}
forget_server() {
  local keep=() p
  for p in "${server_pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  server_pids=("${keep[@]}")
}

# 1. Tools: iperf3 from Debian's packages if missing; ss and ip from iproute2.
if ! command -v iperf3 >/dev/null; then
  ((EUID == 0)) || die "needs iperf3 (Debian: apt-get install iperf3)"
  say "installing iperf3"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
fi
command -v ss >/dev/null || die "needs ss (Debian: apt-get install iproute2)"

livemig=$(private_livemig)
# What this livemig can do: --streams (N > 1 needs it), and receive --mem
# (the destination preallocates its memory before it accepts).
migrate_help=$("$livemig" migrate --help)
send_help=$("$livemig" send --help)
receive_help=$("$livemig" receive --help)
if ((streams > 1)) && [[ $migrate_help != *--streams* || $send_help != *--streams* ]]; then
  die "this livemig has no --streams option, so it cannot measure $streams streams; use --streams 1"
fi
recv_prealloc=no
[[ $receive_help == *--mem* ]] && recv_prealloc=yes
# Plain TCP off loopback must be asked for by name where livemig knows --insecure.
insecure=()
[[ $receive_help == *--insecure* ]] && insecure=(--insecure)

counts=(1)
((streams > 1)) && counts+=("$streams")
# 'path<TAB>streams<TAB>tool<TAB>run<TAB>report[<TAB>receiver report]' for each measurement.
manifest=$tmp/manifest.tsv
: >"$manifest"

# Wait until something in namespace $1 ("" for this one) listens on TCP port
# $2, while process $3 lives.
wait_listen() {
  local ns=$1 port=$2 pid=$3 i pre=()
  [[ -n $ns ]] && pre=(ip netns exec "$ns")
  for ((i = 0; i < 100; i++)); do
    [[ -n $("${pre[@]}" ss -Hltn "sport = :$port") ]] && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# iperf3 for 5 s with $5 streams: server in namespace $2, client in $3 ("" for
# this one), to address $4. Report to $tmp/$1.json.
iperf() {
  local tag=$1 sns=$2 cns=$3 addr=$4 n=$5 port pid spre=() cpre=()
  [[ -n $sns ]] && spre=(ip netns exec "$sns")
  [[ -n $cns ]] && cpre=(ip netns exec "$cns")
  if [[ -z $sns ]]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  else
    port=$((5201 + $$ % 1000))  # any port: the namespace is ours alone
  fi
  "${spre[@]}" iperf3 -s -1 -B "$addr" -p "$port" >"$tmp/$tag.server.log" 2>&1 &
  pid=$!
  server_pids+=("$pid")
  wait_listen "$sns" "$port" "$pid" ||
    { cat "$tmp/$tag.server.log" >&2; die "iperf3 server did not start"; }
  run_fg "${cpre[@]}" iperf3 -c "$addr" -p "$port" -t 5 -P "$n" -J >"$tmp/$tag.json" 2>"$tmp/$tag.client.log" || true
  # iperf3 -J can exit 0 after an error: the report says so.
  python3 -c 'import json, sys; sys.exit("error" in json.load(open(sys.argv[1])))' "$tmp/$tag.json" 2>/dev/null ||
    { cat "$tmp/$tag.json" "$tmp/$tag.client.log" "$tmp/$tag.server.log" >&2; die "iperf3 $tag failed"; }
  wait_server "$pid" 10 || kill "$pid" 2>/dev/null || true
  forget_server "$pid"
}

# livemig's options for $1 streams, in sopts: --streams only when N > 1, so
# a livemig without that option measures one stream.
set_stream_opts() {
  sopts=()
  if (($1 > 1)); then sopts=(--streams "$1"); fi
}
idle_opts=(--workload idle --policy fixed:1 --warmup 0s --quiet)
lo_recv_opts=()
[[ $recv_prealloc == yes ]] && lo_recv_opts=(--mem "$mem")

# Wait until the receiver logging to $1 says it waits for a migration (after
# any preallocation, just before it accepts), while process $2 lives.
wait_ready() {
  local i
  for ((i = 0; i < 6000; i++)); do
    grep -qs "waiting for a migration" "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# 3. Loopback.
say "loopback: iperf3 and livemig migrate of an idle $mem guest, streams ${counts[*]}, $runs run(s)"
for ((r = 1; r <= runs; r++)); do
  for n in "${counts[@]}"; do
    say "  run $r: iperf3 -P $n"
    iperf "lo-iperf-$n-$r" "" "" 127.0.0.1 "$n"
    printf 'loopback\t%s\tiperf3\t%s\t%s\n' "$n" "$r" "$tmp/lo-iperf-$n-$r.json" >>"$manifest"
    say "  run $r: livemig migrate, $n stream(s)"
    out=$tmp/lo-livemig-$n-$r
    set_stream_opts "$n"
    run_fg "$livemig" migrate --mem "$mem" "${idle_opts[@]}" "${sopts[@]}" --json "$out.json" \
      >"$out.log" 2>&1 || { cat "$out.log" >&2; die "livemig migrate failed (run $r, $n streams)"; }
    printf 'loopback\t%s\tlivemig\t%s\t%s\n' "$n" "$r" "$out.json" >>"$manifest"
  done
  # CPU per byte: sender and receiver as processes of their own, as iperf3's
  # are, each timing its own CPU over round 0 (one stream).
  say "  run $r: livemig receive + send over loopback, for CPU time per GiB"
  out=$tmp/cpu-livemig-1-$r
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$livemig" receive --listen "127.0.0.1:$port" "${lo_recv_opts[@]}" --json "$out.recv.json" >"$out.recv.log" 2>&1 &
  pid=$!
  server_pids+=("$pid")
  wait_ready "$out.recv.log" "$pid" || { cat "$out.recv.log" >&2; die "livemig receive did not start"; }
  run_fg "$livemig" send --to "127.0.0.1:$port" --mem "$mem" "${idle_opts[@]}" --json "$out.json" >"$out.log" 2>&1 ||
    { cat "$out.log" "$out.recv.log" >&2; die "livemig send failed (run $r, CPU per GiB)"; }
  rc=0
  wait_server "$pid" 30 || rc=$?
  ((rc == 0)) || { cat "$out.recv.log" >&2; die "livemig receive failed with status $rc (run $r, CPU per GiB)"; }
  printf 'cpu\t1\tlivemig\t%s\t%s\t%s\n' "$r" "$out.json" "$out.recv.json" >>"$manifest"
done

# 4. The shaped veth link: hosts h0 (sender) and h1 (receiver).
shaped_skip=""
if ((EUID != 0)); then
  shaped_skip="needs root"
elif ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  shaped_skip="needs ip and tc (Debian: apt-get install iproute2)"
fi
if [[ -z $shaped_skip ]]; then
  # A prefix and subnet of this run's own: the pid in base 36 fits testbed.sh's
  # eight characters, so a concurrent run never shares a namespace.
  b36=0123456789abcdefghijklmnopqrstuvwxyz id="" p=$$
  while ((p > 0)); do id=${b36:p%36:1}$id; p=$((p / 36)); done
  prefix=tb$id subnet=10.77.$((100 + $$ % 150))
  say "shaped: testbed $prefix ($subnet.0/24, $rate), idle $shaped_mem guest, streams ${counts[*]}, $runs run(s)"
  bed=$prefix  # from here on the trap brings it down, whatever happens
  if ! bash "$root/scripts/testbed.sh" up --prefix "$prefix" --subnet "$subnet" --rate "$rate" >"$tmp/testbed.log" 2>&1; then
    sed 's/^/  /' "$tmp/testbed.log" >&2
    shaped_skip="testbed.sh up failed: $(tail -n 1 "$tmp/testbed.log")"
  fi
fi
if [[ -n $shaped_skip ]]; then
  say "shaped veth: skipped ($shaped_skip)"
else
  h0=$prefix-h0 h1=$prefix-h1 dst=$subnet.2
  lm_port=$((4444 + $$ % 1000))
  recv_opts=()
  [[ $recv_prealloc == yes ]] && recv_opts=(--mem "$shaped_mem")
  for ((r = 1; r <= runs; r++)); do
    for n in "${counts[@]}"; do
      say "  run $r: iperf3 -P $n"
      iperf "sh-iperf-$n-$r" "$h1" "$h0" "$dst" "$n"
      printf 'shaped\t%s\tiperf3\t%s\t%s\n' "$n" "$r" "$tmp/sh-iperf-$n-$r.json" >>"$manifest"

      say "  run $r: livemig receive + send, $n stream(s)"
      out=$tmp/sh-livemig-$n-$r
      ip netns exec "$h1" "$livemig" receive --listen "$dst:$lm_port" "${recv_opts[@]}" "${insecure[@]}" \
        --json "$out.recv.json" >"$out.recv.log" 2>&1 &
      pid=$!
      server_pids+=("$pid")
      # Ready once it says so: that is after any preallocation, just before
      # it accepts (a listening socket alone comes earlier).
      wait_ready "$out.recv.log" "$pid" || { cat "$out.recv.log" >&2; die "livemig receive did not start"; }
      set_stream_opts "$n"
      run_fg ip netns exec "$h0" "$livemig" send --to "$dst:$lm_port" --mem "$shaped_mem" "${idle_opts[@]}" \
        "${sopts[@]}" "${insecure[@]}" --json "$out.json" >"$out.log" 2>&1 ||
        { cat "$out.log" "$out.recv.log" >&2; die "livemig send failed (run $r, $n streams)"; }
      rc=0
      wait_server "$pid" 30 || rc=$?
      ((rc == 0)) || { cat "$out.recv.log" >&2; die "livemig receive failed with status $rc (run $r, $n streams)"; }
      printf 'shaped\t%s\tlivemig\t%s\t%s\t%s\n' "$n" "$r" "$out.json" "$out.recv.json" >>"$manifest"
    done
  done
fi

# 5. Check every report, take the medians, print the table (and the JSON).
python3 - "$manifest" "$json_out" "$mem" "$shaped_mem" "$streams" "$runs" "$rate" "$rate_bps" \
  "$shaped_skip" "$recv_prealloc" "$(iperf3 --version | head -n 1)" <<'PY'
import json, re, statistics, sys

(manifest, json_out, mem, shaped_mem, streams, runs, rate, rate_bps,
 shaped_skip, recv_prealloc, iperf_version) = sys.argv[1:]
streams, runs, rate_bps = int(streams), int(runs), int(rate_bps)
LOOPBACK_TARGET, SHAPED_TARGET = 0.9, 0.95

cells = {}  # (path, streams, tool) -> [per-run dicts]
for line in open(manifest):
    path, n, tool, run, report, *recv = line.rstrip("\n").split("\t")
    n, rep = int(n), json.load(open(report))
    where = f"{path}, {n} stream(s), run {run}"
    if tool == "iperf3":
        bps = rep["end"]["sum_received"]["bits_per_second"]
        # CPU seconds per GiB received: iperf3's utilisation is CPU time
        # over wall time, client (host) and server (remote) each.
        cpu, gib = rep["end"]["cpu_utilization_percent"], rep["end"]["sum_received"]["bytes"] / 2**30
        secs = rep["end"]["sum_received"]["seconds"]
        fig = {"gbps": bps / 1e9, "sender_cpu_s_per_gib": cpu["host_total"] / 100 * secs / gib,
               "receiver_cpu_s_per_gib": cpu["remote_total"] / 100 * secs / gib}
    else:
        if rep["status"] != "completed" or rep["mismatched_pages"] != 0:
            sys.exit(f"livemig {where}: status={rep['status']} "
                     f"mismatched_pages={rep['mismatched_pages']} error={rep.get('error')}")
        if rep.get("streams", n) != n:
            sys.exit(f"livemig {where}: asked for {n} streams, the report says {rep['streams']}")
        r0 = rep["rounds"][0]
        if r0["pages"] * rep["page_size"] != rep["memory_bytes"]:
            print(f"warning: livemig {where}: round 0 carried {r0['pages']} pages, "
                  f"not all {rep['memory_bytes'] // rep['page_size']}", file=sys.stderr)
        rr = {}
        if recv:
            rr = json.load(open(recv[0]))
            if rr["status"] != "completed" or rr["mismatched_pages"] != 0:
                sys.exit(f"livemig receive {where}: status={rr['status']} "
                         f"mismatched_pages={rr['mismatched_pages']} error={rr.get('error')}")
        fig = {
            "gbps": r0["bytes"] * 8 / (r0["duration_ms"] / 1e3) / 1e9,
            "round0_bytes": r0["bytes"], "round0_duration_ms": r0["duration_ms"],
            "setup_time_ms": rep["setup_time_ms"], "total_time_ms": rep["total_time_ms"],
            "transferred_bytes": rep["transferred_bytes"],
            # Every byte from round 0's start until the destination runs
            # (stop-and-copy, device state and resume included; the
            # verification that follows is not).
            "e2e_gbps": rep["transferred_bytes"] * 8
            / ((rep["migration_time_ms"] - rep["setup_time_ms"]) / 1e3) / 1e9,
        }
        # Round 0's CPU time at each end (livemig with the figures only).
        for end, ms in [("sender", rep.get("sender_round0_cpu_ms")), ("receiver", rr.get("round0_cpu_ms"))]:
            if ms is not None:
                fig[f"{end}_cpu_s_per_gib"] = ms / 1e3 / (r0["bytes"] / 2**30)
    cells.setdefault((path, n, tool), []).append(fig)

def gbit(bps):
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"

rows = []
for (path, n, tool) in sorted(cells, key=lambda k: (k[0] != "loopback", k[1])):
    if tool != "iperf3":
        continue
    ip = [c["gbps"] for c in cells[(path, n, "iperf3")]]
    lm = [c["gbps"] for c in cells[(path, n, "livemig")]]
    ip_med, lm_med = statistics.median(ip), statistics.median(lm)
    row = {
        "path": path, "streams": n, "mem": mem if path == "loopback" else shaped_mem,
        "iperf3_gbps": ip_med, "livemig_gbps": lm_med, "ratio_to_iperf3": lm_med / ip_med,
        "iperf3_gbps_runs": ip, "livemig_gbps_runs": lm,
        "livemig_runs": cells[(path, n, "livemig")],
        "livemig_e2e_gbps": statistics.median(c["e2e_gbps"] for c in cells[(path, n, "livemig")]),
    }
    if path == "loopback":
        row.update(target=f">= {LOOPBACK_TARGET:.2f} x iperf3", met=row["ratio_to_iperf3"] >= LOOPBACK_TARGET)
    else:
        row["ratio_to_rate"] = lm_med * 1e9 / rate_bps
        row.update(target=f">= {SHAPED_TARGET:.2f} x {gbit(rate_bps)}", met=row["ratio_to_rate"] >= SHAPED_TARGET)
    rows.append(row)

print(f"livemig goodput (round 0 of an idle guest, fixed:1) vs iperf3 (5 s), "
      f"median of {runs} run(s); iperf3 {iperf_version.split()[1]}, receive preallocation: {recv_prealloc}")
head = ("path", "streams", "iperf3 Gbit/s", "livemig Gbit/s", "ratio", "target", "met?")
table = [head]
for r in rows:
    met = "yes" if r["met"] else "no"
    if r["path"] == "shaped":
        met += f" ({r['ratio_to_rate']:.3f} x rate)"
    table.append((f"{r['path']} ({r['mem']})", str(r["streams"]), f"{r['iperf3_gbps']:.3f}",
                  f"{r['livemig_gbps']:.3f}", f"{r['ratio_to_iperf3']:.3f}", r["target"], met))
widths = [max(len(t[i]) for t in table) for i in range(len(head))]
for t in table:
    print("  " + " | ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
if runs > 1:
    print("spread over the runs (min..max Gbit/s):")
    for r in rows:
        print(f"  {r['path']:<8} {r['streams']:>2} stream{'s' if r['streams'] > 1 else ' '}: iperf3 {min(r['iperf3_gbps_runs']):.3f}.."
              f"{max(r['iperf3_gbps_runs']):.3f}, livemig {min(r['livemig_gbps_runs']):.3f}.."
              f"{max(r['livemig_gbps_runs']):.3f}")
print("notes:")
print("  livemig goodput = round 0 bytes x 8 / round 0 duration, timed by the sender; the ratio is livemig / iperf3")
if shaped_skip:
    print(f"  shaped veth: skipped ({shaped_skip})")
else:
    print(f"  shaped veth: {gbit(rate_bps)} tbf between two network namespaces; a {shaped_mem} guest there "
          f"(--shaped-mem), not {mem}: 1 GiB at 1 Gbit/s takes 9 s a run")
    print("  tbf counts Ethernet, IP and TCP headers: at MTU 1500 TCP goodput tops out near 0.956 x the rate")
    e2e = ", ".join(f"{r['livemig_e2e_gbps'] * 1e9 / rate_bps:.3f} x rate ({r['streams']} stream{'s' if r['streams'] > 1 else ''})"
                    for r in rows if r["path"] == "shaped")
    print(f"  round 0 ends when the receiver acknowledges it, so its time covers delivery; "
          f"end to end (all bytes / (migration time - setup), until the destination runs) livemig ran at {e2e}")
# CPU time per GiB moved, both ends, livemig's round 0 next to iperf3's
# one-stream loopback runs of the same series.
CPU_TARGET = 1.2
cpu = None
lm_cpu = cells.get(("cpu", 1, "livemig"), [])
ip_cpu = cells.get(("loopback", 1, "iperf3"), [])
if lm_cpu and all("sender_cpu_s_per_gib" in c and "receiver_cpu_s_per_gib" in c for c in lm_cpu):
    med = lambda cs, k: statistics.median(c[k] for c in cs)
    cpu = {k: {"livemig": med(lm_cpu, f"{k}_cpu_s_per_gib"), "iperf3": med(ip_cpu, f"{k}_cpu_s_per_gib"),
               "livemig_runs": [c[f"{k}_cpu_s_per_gib"] for c in lm_cpu],
               "iperf3_runs": [c[f"{k}_cpu_s_per_gib"] for c in ip_cpu]}
           for k in ("sender", "receiver")}
    for v in cpu.values():
        v["ratio_to_iperf3"] = v["livemig"] / v["iperf3"]
    s, r = cpu["sender"], cpu["receiver"]
    print(f"cpu per GiB (loopback, 1 stream, median of {runs} run(s); CPU seconds per GiB moved): "
          f"sender/iperf3 sender {s['ratio_to_iperf3']:.2f} ({s['livemig']:.3f} s vs {s['iperf3']:.3f} s), "
          f"receiver/iperf3 receiver {r['ratio_to_iperf3']:.2f} ({r['livemig']:.3f} s vs {r['iperf3']:.3f} s); "
          f"target <= {CPU_TARGET} each")
else:
    print("cpu per GiB: not measured (this livemig reports no round 0 CPU time)")
m = re.search(r"(\d+)\.(\d+)", iperf_version)
if streams > 1 and m and (int(m[1]), int(m[2])) < (3, 16):
    print(f"  iperf3 {iperf_version.split()[1]} runs all -P streams on one thread (3.16 made it multi-threaded)")

if json_out:
    out = {
        "mem": mem, "shaped_mem": shaped_mem, "streams": streams, "runs": runs,
        "rate": rate, "rate_bps": rate_bps, "shaped_skipped": shaped_skip or None,
        "receiver_prealloc": recv_prealloc == "yes", "iperf3_version": iperf_version,
        "targets": {"loopback_ratio_to_iperf3": LOOPBACK_TARGET, "shaped_ratio_to_rate": SHAPED_TARGET,
                    "cpu_ratio_to_iperf3": CPU_TARGET},
        "rows": rows, "cpu_per_gib": cpu,
    }
    with open(json_out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
PY
