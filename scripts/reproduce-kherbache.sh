#!/usr/bin/env bash
# reproduce-kherbache.sh: Kherbache et al.'s Tables 1 and 3 (Euro-Par 2014,
# "Planning Live-Migrations to Prepare Servers for Maintenance"), scaled
# down to this machine: real plans over the namespace testbed, the same
# plans simulated, each table printed beside the paper's figures, then the
# simulator's accuracy against the real runs.
#
# Table 3: one server's 4 VMs (256 MiB, a hot set) leave over its one
# shaped NIC, one at a time, 2 by 2, or all at once. The hot set's dirty
# rate is drained by a half of the link but not by a quarter, so parallel
# migrations do not converge and run to --max-time.
# Table 1: 6 light VMs (64 MiB) leave 3 servers whose NICs are slower than
# the interlink they share (100 Mbit/s each, 300 Mbit/s): sequential uses
# one NIC at a time, parallel fills the interlink.
#
# The simulator gets each link at its TCP goodput: tbf counts whole
# Ethernet frames, 1514 bytes for 1448 of payload (0.956 of the rate).
# Needs root (network namespaces); takes about 5 minutes per --runs.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]
  --runs N       repeat every real plan N times; tables show medians (default 1)
  --tables LIST  1, 3 or 1,3 (default 1,3)
  --json FILE    also write every figure to FILE
  --help         print this help
LIVEMIG=/path/to/livemig uses that binary instead of building one.
EOF
}

die() { echo "reproduce-kherbache: $*" >&2; exit 1; }
say() { echo "reproduce-kherbache: $*" >&2; }
bad_arg() { echo "reproduce-kherbache: $*" >&2; usage >&2; exit 2; }

runs=1 tables=1,3 json_out=""
while (($#)); do
  case "$1" in
    --runs|--tables|--json)
      if (($# < 2)) || [[ -z $2 ]]; then bad_arg "$1 needs a value"; fi
      case "$1" in
        --runs) runs=$2 ;;
        --tables) tables=$2 ;;
        --json) json_out=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_arg "unknown argument: $1" ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]?$ ]] || bad_arg "--runs must be 1-99"
[[ $tables =~ ^(1|3|1,3|3,1)$ ]] || bad_arg "--tables must be 1, 3 or 1,3"
((EUID == 0)) || die "must run as root (the testbed makes network namespaces)"

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir reproduce-kherbache
livemig=$(private_livemig)
prefix="kh$$"
prefix=${prefix:0:8}
subnet=10.131.$(($$ % 250))
testbed() { bash "$root/scripts/testbed.sh" "$@" --prefix "$prefix" --subnet "$subnet" >/dev/null; }
# shellcheck disable=SC2154  # tmp and fg_pid come from scratch_dir
trap 'if [[ -n $fg_pid ]]; then kill "$fg_pid" 2>/dev/null || true; fi; testbed down || true; rm -rf "$tmp"' EXIT

goodput=0.956
# host NAME INDEX NIC [GROUP]: a [[host]] of the testbed; SCALE scales rates.
host() {
  echo "[[host]]"
  echo "name = \"$1\""
  echo "nic = \"$(rate "$3")\""
  [[ -n ${4:-} ]] && echo "group = \"$4\""
  echo "address = \"$subnet.$(($2 + 1))\""
  echo "launcher = \"ip netns exec $prefix-h$2\""
  echo
}
# rate MBIT: the rate the plan gives, in bit/s (scaled by $scale, which
# the caller sets, for the simulator).
# shellcheck disable=SC2154
rate() { python3 -c "print(f'{int($1 * 1e6 * $scale)}bit')"; }

table3_plan() {
  cat <<EOF
[defaults]
mem = "256M"
workload = "hotset:wws=6M,rate=4k"
policy = "threshold"
downtime_limit = "300ms"
max_time = "60s"

EOF
  host src 0 300
  for i in 1 2 3 4; do host "dst$i" "$i" 300; done
  for i in 1 2 3 4; do printf '[[vm]]\nname = "web%d"\nfrom = "src"\nto = "dst%d"\n\n' "$i" "$i"; done
}

table1_plan() {
  cat <<EOF
[defaults]
mem = "64M"
workload = "hotset:wws=1M,rate=200"
policy = "threshold"

EOF
  for i in 0 1 2; do host "a$i" "$i" 100 a; done
  for i in 3 4 5; do host "b$i" "$i" 100 b; done
  printf '[[link]]\nbetween = ["a", "b"]\nrate = "%s"\n\n' "$(rate 300)"
  for i in 0 1 2; do
    printf '[[vm]]\nname = "vm%d"\ncount = 2\nfrom = "a%d"\nto = "b%d"\n\n' "$i" "$i" "$((i + 3))"
  done
}

# plan TABLE STRATEGY real|sim RUN: one plan's report in $tmp.
plan() {
  local out="$tmp/t$1-${2//:/-}-$3-$4"
  local args=(plan "$tmp/t$1-$3.toml" --strategy "$2" --warmup 100ms --quiet --out "$out")
  [[ $3 == sim ]] && args+=(--simulate)
  say "table $1: $2 ($3${4:+, run $4})"
  # A failed migration is in the report; the tables show it.
  run_fg "$livemig" "${args[@]}" >"$out.log" 2>&1 || true
  [[ -f $out/plan.json ]] || die "table $1, $2 ($3): no report: $(tail -3 "$out.log")"
}

for t in ${tables//,/ }; do
  # The plan's functions read $scale as they run.
  scale=1 "table${t}_plan" >"$tmp/t$t-real.toml"
  scale=$goodput "table${t}_plan" >"$tmp/t$t-sim.toml"
  if ((t == 3)); then
    testbed up --hosts 5 --rate 300mbit
    strategies=(sequential batch:2 parallel auto)
  else
    testbed up --hosts 6 --split 3 --rate 100mbit --interlink 300mbit
    strategies=(sequential parallel)
  fi
  for s in "${strategies[@]}"; do
    plan "$t" "$s" sim 1
    for ((r = 1; r <= runs; r++)); do plan "$t" "$s" real "$r"; done
  done
  testbed down
done

python3 - "$tmp" "$runs" "$tables" "$json_out" <<'EOF'
import glob, json, os, statistics, sys

tmp, runs, tables, json_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
paper = {
    3: {"sequential": (7.66, 0.45, 31), "batch:2": (15.41, 0.47, 31), "parallel": (49.51, 34.51, 94)},
    1: {"sequential": (12.2, 5.41, 2871), "parallel": (192.9, 45.12, 446)},
}
out = {}

def load(t, s, kind):
    reps = []
    for path in sorted(glob.glob(f"{tmp}/t{t}-{s.replace(':', '-')}-{kind}-*/plan.json")):
        with open(path) as f:
            reps.append(json.load(f))
    return reps

def med(reps, key):
    return statistics.median(r[key] for r in reps) / 1e3

errors = {"completion": [], "mean": []}
for t in [int(x) for x in tables.split(",")]:
    strategies = ["sequential", "batch:2", "parallel", "auto"] if t == 3 else ["sequential", "parallel"]
    print(f"\nTable {t} ({'4 VMs of 256 MiB, hot set 6 MiB at 4k pages/s, one 300 Mbit/s NIC' if t == 3 else '6 VMs of 64 MiB on 3 servers, 100 Mbit/s NICs, a 300 Mbit/s interlink'}); real: median of {runs}")
    print(f"{'strategy':<22} {'mean s':>8} {'sd s':>7} {'all s':>7} {'not conv':>8} {'failed':>6} | {'paper mean':>10} {'sd':>6} {'all':>6}")
    for s in strategies:
        real, sim = load(t, s, "real"), load(t, s, "sim")
        if not real:
            continue
        row = {
            "strategy": real[0]["strategy"],
            "mean_s": med(real, "mean_duration_ms"),
            "sd_s": med(real, "stddev_duration_ms"),
            "completion_s": med(real, "completion_time_ms"),
            "not_converged": statistics.median(len(r["not_converged"]) for r in real),
            "failed": max(r["failed"] for r in real),
            "sim_mean_s": sim[0]["mean_duration_ms"] / 1e3,
            "sim_completion_s": sim[0]["completion_time_ms"] / 1e3,
            "runs": [{k: r[k] for k in ("completion_time_ms", "mean_duration_ms", "stddev_duration_ms", "failed")} for r in real],
        }
        out.setdefault(f"table{t}", {})[s] = row
        p = paper[t].get(s)
        ps = f"{p[0]:>10.2f} {p[1]:>6.2f} {p[2]:>6}" if p else f"{'':>10} {'':>6} {'':>6}"
        name = row["strategy"] if len(row["strategy"]) <= 22 else row["strategy"].split(";")[0] + ")"
        print(f"{name:<22} {row['mean_s']:>8.2f} {row['sd_s']:>7.2f} {row['completion_s']:>7.2f} {row['not_converged']:>8.0f} {row['failed']:>6} | {ps}")
    rows = out.get(f"table{t}", {})
    if t == 3 and all(k in rows for k in ("sequential", "batch:2", "parallel")):
        sq, b2, pa = rows["sequential"], rows["batch:2"], rows["parallel"]
        print(f"shape: parallel/batch:2 mean {pa['mean_s'] / b2['mean_s']:.2f} (paper 3.21), batch:2/sequential mean {b2['mean_s'] / sq['mean_s']:.2f} (paper 2.01),")
        print(f"       batch:2/sequential completion {b2['completion_s'] / sq['completion_s']:.2f} (paper 1.00), parallel/batch:2 completion {pa['completion_s'] / b2['completion_s']:.2f} (paper 3.03)")
        if "auto" in rows:
            best = min(r["mean_s"] for r in (sq, b2, pa))
            print(f"auto: mean {rows['auto']['mean_s']:.2f} s against the best of the three {best:.2f} s ({rows['auto']['mean_s'] / best - 1:+.0%}); not converged {rows['auto']['not_converged']:.0f}")
    if t == 1 and all(k in rows for k in ("sequential", "parallel")):
        sq, pa = rows["sequential"], rows["parallel"]
        print(f"shape: sequential/parallel completion {sq['completion_s'] / pa['completion_s']:.2f} (paper 6.4, 9.0), parallel/sequential mean {pa['mean_s'] / sq['mean_s']:.2f} (paper 15.8, 14.1)")
    for s, row in rows.items():
        if s == "auto":
            continue
        errors["completion"].append(abs(row["sim_completion_s"] / row["completion_s"] - 1))
        errors["mean"].append(abs(row["sim_mean_s"] / row["mean_s"] - 1))

print("\nAccuracy: simulator against the real plans")
print(f"{'table':<6} {'strategy':<12} {'real all s':>10} {'sim all s':>10} {'error':>7} {'real mean s':>11} {'sim mean s':>10} {'error':>7}")
for t, rows in out.items():
    for s, row in rows.items():
        if s == "auto":
            continue
        e1 = row["sim_completion_s"] / row["completion_s"] - 1
        e2 = row["sim_mean_s"] / row["mean_s"] - 1
        print(f"{t[-1]:<6} {s:<12} {row['completion_s']:>10.2f} {row['sim_completion_s']:>10.2f} {e1:>+7.1%} {row['mean_s']:>11.2f} {row['sim_mean_s']:>10.2f} {e2:>+7.1%}")
if errors["mean"]:
    out["median_error"] = {k: statistics.median(v) for k, v in errors.items()}
    print(f"median error over the strategies: completion {out['median_error']['completion']:.1%}, mean duration {out['median_error']['mean']:.1%}")
if json_out:
    with open(json_out, "w") as f:
        json.dump(out, f, indent=2)
EOF
