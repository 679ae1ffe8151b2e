#!/usr/bin/env bash
# compare-modes.sh: the same workloads under pre-copy, post-copy, hybrid and
# cold migration, in one table: migration time, downtime, bytes sent, rounds,
# post-copy faults and their p99 latency, the guest's rate during migration
# against its rate before, what the migration cost the guest (the report's
# `impact`: work lost in seconds of its rate before, the longest stall, the
# time from the resume until its rate is back within 5 %), and the
# verification. Then a few checks computed
# from the figures, each saying whether it holds:
#   (a) post-copy sends each page about once (sent pages / memory pages in
#       1.00..1.05);
#   (b) under the heaviest dirtying, post-copy has the lowest migration time;
#   (c) under the lightest dirtying, pre-copy has the lowest downtime (post-copy
#       and hybrid downtimes are tiny too: the figures are printed as they are).
# A bandwidth limit (default 2gbit) makes the comparison about the algorithms
# rather than loopback's speed.
set -euo pipefail

default_workloads=(idle 'hotset:wws=32M,rate=50k' uniform:rate=1M)

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]
  --mem SIZE         guest memory (default 256M)
  --bandwidth RATE   rate limit for every migration: 500mbit, 2gbit, 120MiB/s,
                     or unlimited (default 2gbit)
  --workload SPEC    a workload to compare the modes under; repeat for more
                     (default: ${default_workloads[*]})
  --policy P         pre-copy's convergence policy: xen, qemu, fixed:N
                     (default xen; hybrid always runs 2 pre-copy rounds)
  --prepage N        post-copy and hybrid: pages asked for after each faulted
                     one (default 0)
  --runs N           repeat every migration N times; the table has medians
                     (default 1)
  --json FILE        also write every row, its runs and the checks to FILE
  --help             print this help
Modes: precopy (--policy), postcopy, hybrid:rounds=2, cold; each migration
warms the guest up for 1 s. Every run must complete with every page
verified. LIVEMIG=/path/to/livemig uses that binary instead of building one.
The exit status is 0 whether or not the checks hold, 1 when a migration
fails or does not verify, 2 on a bad argument.
EOF
}

die() { echo "compare-modes: $*" >&2; exit 1; }
bad_arg() { echo "compare-modes: $*" >&2; usage >&2; exit 2; }
say() { echo "compare-modes: $*" >&2; }

mem=256M bandwidth=2gbit policy=xen prepage=0 runs=1 json_out=""
workloads=()
while (($#)); do
  case "$1" in
    --mem|--bandwidth|--workload|--policy|--prepage|--runs|--json)
      if (($# < 2)) || [[ -z $2 ]]; then bad_arg "$1 needs a value"; fi
      case "$1" in
        --mem) mem=$2 ;;
        --bandwidth) bandwidth=$2 ;;
        --workload) workloads+=("$2") ;;
        --policy) policy=$2 ;;
        --prepage) prepage=$2 ;;
        --runs) runs=$2 ;;
        --json) json_out=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_arg "unknown argument: $1" ;;
  esac
done
((${#workloads[@]})) || workloads=("${default_workloads[@]}")
[[ $mem =~ ^[0-9]+(\.[0-9]+)?[KMGTkmgt]?(i?B)?$ ]] || bad_arg "--mem must be a size like 256M or 1G, not '$mem'"
[[ $runs =~ ^[1-9][0-9]{0,2}$ ]] || bad_arg "--runs must be a positive integer (at most 999), not '$runs'"
[[ $prepage =~ ^[0-9]{1,9}$ ]] || bad_arg "--prepage must be a whole number of pages, not '$prepage'"
for w in "${workloads[@]}"; do
  [[ $w != *[[:space:]]* ]] || bad_arg "--workload must not contain white space: '$w'"
done
if [[ -n $json_out ]]; then
  [[ -d $(dirname -- "$json_out") ]] || bad_arg "--json: no directory $(dirname -- "$json_out")"
fi
command -v python3 >/dev/null || die "needs python3"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir compare-modes


livemig=$(private_livemig)
[[ $("$livemig" migrate --help) == *--mode* ]] || die "this livemig has no --mode option (post-copy, hybrid, cold)"

# Let livemig judge --mem, --bandwidth, --policy and each workload before any
# migration starts: 'simulate' parses them as 'migrate' does, in milliseconds.
for w in "${workloads[@]}"; do
  if ! err=$("$livemig" simulate --quiet --mem "$mem" --workload "$w" --bandwidth "$bandwidth" \
    --policy "$policy" --warmup 0s 2>&1 >/dev/null); then
    if [[ $err == *"Error: invalid"* || $err == *"error:"* ]]; then
      bad_arg "$(grep -m 1 -i 'error' <<<"$err" | sed 's/^Error: //; s/^error: //')"
    fi
    say "warning: livemig simulate failed for --workload $w (going on): $err"
  fi
done

# 'label<TAB>--mode value' for each mode compared.
t=$'\t'
modes=("precopy ($policy)${t}precopy" "postcopy${t}postcopy" "hybrid:rounds=2${t}hybrid:rounds=2" "cold${t}cold")
pc_opts=()
if ((prepage > 0)); then
  pc_opts=(--prepage "$prepage")
  modes[1]="postcopy (prepage $prepage)${t}postcopy"
  modes[2]="hybrid:rounds=2 (prepage $prepage)${t}hybrid:rounds=2"
fi

# 'workload<TAB>mode label<TAB>mode<TAB>run<TAB>report' for each migration.
manifest=$tmp/manifest.tsv
: >"$manifest"
total=$((${#workloads[@]} * ${#modes[@]} * runs)) n=0
say "${#workloads[@]} workload(s) x ${#modes[@]} modes x $runs run(s) = $total migrations of a $mem guest at $bandwidth"
for ((r = 1; r <= runs; r++)); do
  for w in "${workloads[@]}"; do
    for m in "${modes[@]}"; do
      label=${m%%"$t"*} mode=${m#*"$t"}
      n=$((n + 1))
      name="$w / $label / run $r"
      say "  [$n/$total] $name"
      out=$tmp/run-$n
      opts=(--mode "$mode")
      case "$mode" in
        precopy) opts+=(--policy "$policy") ;;
        postcopy|hybrid*) opts+=("${pc_opts[@]}") ;;
      esac
      rc=0
      run_fg "$livemig" migrate --mem "$mem" --workload "$w" --bandwidth "$bandwidth" "${opts[@]}" \
        --warmup 1s --quiet --json "$out.json" >"$out.log" 2>&1 || rc=$?
      # The report must say completed with every page verified (it is
      # written for failed runs too).
      if ! why=$(python3 - "$out.json" 2>&1 <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no report ({e})")
if r.get("status") != "completed" or r.get("mismatched_pages") != 0 or not r.get("verified_pages"):
    sys.exit(f"status={r.get('status')} verified_pages={r.get('verified_pages')} "
             f"mismatched_pages={r.get('mismatched_pages')} error={r.get('error')}")
PY
      ) || ((rc != 0)); then
        sed 's/^/  | /' "$out.log" >&2
        die "migration failed: $name (exit status $rc${why:+; $why})"
      fi
      printf '%s\t%s\t%s\t%s\t%s\n' "$w" "$label" "$mode" "$r" "$out.json" >>"$manifest"
    done
  done
done

# Medians, the table, the checks (and the JSON).
python3 - "$manifest" "$json_out" "$mem" "$bandwidth" "$policy" "$prepage" "$runs" <<'PY'
import json, statistics, sys

manifest, json_out, mem, bandwidth, policy, prepage, runs = sys.argv[1:]
prepage, runs = int(prepage), int(runs)

cells, order = {}, []  # (workload, label) -> [reports]
for line in open(manifest):
    w, label, mode, run, path = line.rstrip("\n").split("\t")
    rep = json.load(open(path))
    rep["_run"], rep["_mode_arg"] = int(run), mode
    if (w, label) not in cells:
        order.append((w, label))
    cells.setdefault((w, label), []).append(rep)
workloads = list(dict.fromkeys(w for w, _ in order))

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def kind(rep):
    m = rep["_mode_arg"]
    return "hybrid" if m.startswith("hybrid") else m

rows = []
for (w, label) in order:
    reps = cells[(w, label)]
    r0 = reps[0]
    mem_pages = r0["memory_bytes"] // r0["page_size"]
    k = kind(r0)
    before = med(r["guest_dirty_rate_pps"] for r in reps)
    pre = med(r.get("guest_rate_precopy_pps") for r in reps) if k in ("precopy", "hybrid") else None
    post = med(r.get("guest_rate_postcopy_pps") for r in reps) if k in ("postcopy", "hybrid") else None
    fl = [r.get("fault_latency_us") for r in reps]
    row = {
        "workload": w, "mode": label, "mode_arg": r0["_mode_arg"], "kind": k, "runs": len(reps),
        "memory_bytes": r0["memory_bytes"], "memory_pages": mem_pages,
        "migration_time_ms": med(r["migration_time_ms"] for r in reps),
        "total_time_ms": med(r["total_time_ms"] for r in reps),
        "downtime_ms": med(r["downtime_ms"] for r in reps),
        "transferred_bytes": med(r["transferred_bytes"] for r in reps),
        "transferred_pages": med(r["transferred_pages"] for r in reps),
        "sent_per_memory": med(r["transferred_pages"] / mem_pages for r in reps),
        "rounds": med(len(r["rounds"]) + r.get("rounds_not_listed", 0) for r in reps),
        "stop_reasons": sorted({r["stop_reason"] for r in reps if r.get("stop_reason")}),
        "postcopy_faults": med(r.get("postcopy_faults") for r in reps),
        "postcopy_requests": med(r.get("postcopy_requests") for r in reps),
        "pages_pulled": med(r.get("pages_pulled") for r in reps),
        "pages_pushed": med(r.get("pages_pushed") for r in reps),
        "fault_latency_p50_us": med(f and f["p50"] for f in fl),
        "fault_latency_p99_us": med(f and f["p99"] for f in fl),
        "fault_latency_max_us": med(f and f["max"] for f in fl),
        "postcopy_populated_ms": med(r.get("postcopy_populated_ms") for r in reps),
        "guest_dirty_rate_pps": before,
        "guest_rate_precopy_pps": pre,
        "guest_rate_postcopy_pps": post,
        "guest_rate_precopy_pct": 100 * pre / before if pre is not None and before and before >= 1 else None,
        "guest_rate_postcopy_pct": 100 * post / before if post is not None and before and before >= 1 else None,
        "downtime_breakdown_ms": {ph: med(r["downtime_breakdown_ms"].get(ph) for r in reps)
                                  for ph in r0.get("downtime_breakdown_ms") or {}},
        "rate_limit_bps": (r0["rounds"][-1].get("rate_limit_bps") if r0["rounds"] else None) or None,
        "verified_pages": med(r["verified_pages"] for r in reps),
        "mismatched_pages": max(r["mismatched_pages"] for r in reps),
        "lost_work_s": med((r.get("impact") or {}).get("lost_work_s") for r in reps),
        "longest_stall_ms": med((r.get("impact") or {}).get("longest_stall_ms") for r in reps),
        "recovery_ms": med((r.get("impact") or {}).get("recovery_ms") for r in reps),
        "recovered_runs": sum(1 for r in reps if (r.get("impact") or {}).get("recovery_ms") is not None),
        "per_run": [{key: r.get(key) for key in (
            "status", "migration_time_ms", "total_time_ms", "downtime_ms", "downtime_breakdown_ms",
            "transferred_bytes", "transferred_pages", "stop_reason", "postcopy_requests",
            "pages_pulled", "pages_pushed", "postcopy_faults", "fault_latency_us",
            "postcopy_populated_ms", "guest_dirty_rate_pps", "guest_rate_precopy_pps",
            "guest_rate_postcopy_pps", "verified_pages", "mismatched_pages", "impact")}
            | {"run": r["_run"], "rounds": len(r["rounds"]) + r.get("rounds_not_listed", 0)} for r in reps],
    }
    rows.append(row)

def rate(pps):
    if pps is None:
        return "-"
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if pps >= 0.9995 * div:  # so 999,900 reads 1M, not 1e+03k
            return f"{pps / div:.3g}{unit}"
    return f"{pps:.0f}"

def num(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)

def ms(x):
    return "-" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")

def count(x):
    return "-" if x is None else (f"{x:.0f}" if x == int(x) else f"{x:.1f}")

def guest_cell(row):
    if row["kind"] == "cold":
        return "paused"
    if not row["guest_dirty_rate_pps"] or row["guest_dirty_rate_pps"] < 1:
        return "- (no writes)"
    parts = []
    for phase in ("precopy", "postcopy"):
        pct = row[f"guest_rate_{phase}_pct"]
        if row[f"guest_rate_{phase}_pps"] is not None:
            parts.append(f"{phase[:-4]} " + ("-" if pct is None else f"{pct:.0f}%"))
    return " / ".join(parts) or "-"

by_wl = {w: {row["kind"]: row for row in rows if row["workload"] == w} for w in workloads}
rate_before = {w: med(r["guest_dirty_rate_pps"] for row in rows if row["workload"] == w
                      for r in cells[(w, row["mode"])]) for w in workloads}

bw = "unlimited bandwidth" if bandwidth == "unlimited" else f"at {bandwidth}"
print(f"livemig migration modes: a {mem} guest {bw}, median of {runs} run(s)")
head = ("workload", "pages/s before", "mode", "migration ms", "downtime ms", "MiB sent (x mem)",
        "rounds", "faults", "p99 fault us", "guest rate vs before", "work lost s", "longest stall ms",
        "recovery ms", "verified")
table = [head]
for row in rows:
    faults = row["postcopy_faults"] if row["kind"] in ("postcopy", "hybrid") else None
    rounds = count(row["rounds"])
    if row["stop_reasons"]:
        rounds += f" ({','.join(row['stop_reasons'])})"
    table.append((row["workload"], rate(rate_before[row["workload"]]), row["mode"],
                  num(row["migration_time_ms"]), ms(row["downtime_ms"]),
                  f"{row['transferred_bytes'] / 2**20:.1f} ({row['sent_per_memory']:.2f}x)",
                  rounds, count(faults), count(row["fault_latency_p99_us"]), guest_cell(row),
                  num(row["lost_work_s"], "{:.3f}"), ms(row["longest_stall_ms"]),
                  ms(row["recovery_ms"]) if row["recovered_runs"] == row["runs"]
                  else f"{ms(row['recovery_ms'])} ({row['recovered_runs']}/{row['runs']} recovered)",
                  f"{row['verified_pages']:.0f}/{row['memory_pages']}"))
widths = [max(len(t[i]) for t in table) for i in range(len(head))]
right = {1, 3, 4, 5, 7, 8, 10, 11, 12}
for i, t in enumerate(table):
    print("  " + " | ".join(c.rjust(wd) if j in right and i else c.ljust(wd)
                            for j, (c, wd) in enumerate(zip(t, widths))).rstrip())
    if i == 0:
        print("  " + "-+-".join("-" * wd for wd in widths))
if runs > 1:
    print("spread over the runs (min..max): migration ms, downtime ms")
    for row in rows:
        mt = [p["migration_time_ms"] for p in row["per_run"]]
        dt = [p["downtime_ms"] for p in row["per_run"]]
        print(f"  {row['workload']:<{widths[0]}}  {row['mode']:<{widths[2]}}  "
              f"{min(mt):.0f}..{max(mt):.0f}, {ms(min(dt))}..{ms(max(dt))}")

checks = []
def check(cid, claim, holds, text, **data):
    verdict = "n/a" if holds is None else ("holds" if holds else "does not hold")
    checks.append({"id": cid, "claim": claim, "holds": holds, "text": text, **data})
    print(f"  ({cid}) {claim}: {verdict}: {text}")

print("checks:")
# (a) Post-copy sends each page once.
pc = [(w, by_wl[w]["postcopy"]) for w in workloads if "postcopy" in by_wl[w]]
ratios = {w: row["sent_per_memory"] for w, row in pc}
ok = all(1.0 <= x <= 1.05 for x in ratios.values())
check("a", "post-copy sends each page about once (sent / memory pages in 1.00..1.05)", ok,
      "; ".join(f"{w}: {row['transferred_pages']:.0f} / {row['memory_pages']} = {ratios[w]:.3f} "
                f"({count(row['pages_pulled'])} pulled, {count(row['pages_pushed'])} pushed)"
                for w, row in pc), ratios=ratios)

def compare(w, key, unit, fmt):
    present = [(k, by_wl[w][k]) for k in ("precopy", "postcopy", "hybrid", "cold") if k in by_wl[w]]
    vals = {k: row[key] for k, row in present}
    best = min(vals, key=vals.get)
    return vals, best, ", ".join(f"{by_wl[w][k]['mode']} {fmt(v)} {unit}" for k, v in vals.items())

# (b) Heaviest dirtying: post-copy finishes first.
heavy = max(workloads, key=lambda w: rate_before[w] or 0)
if not rate_before[heavy]:
    check("b", "under the heaviest dirtying, post-copy has the lowest migration time", None,
          "no workload dirties memory", workload=None)
else:
    vals, best, text = compare(heavy, "migration_time_ms", "ms", lambda v: f"{v:.0f}")
    others = sorted(v for k, v in vals.items() if k != "postcopy")
    if vals["postcopy"] == vals[best] and others:
        text += f"; post-copy {others[0] / vals['postcopy']:.2f}x faster than the next"
    else:
        text += f"; lowest: {by_wl[heavy][best]['mode']}"
    # Demand-fault replies travel on a connection of their own, outside the
    # rate limit: say so when post-copy moved its bytes faster than the limit.
    pc = by_wl[heavy].get("postcopy")
    if pc and pc["rate_limit_bps"] and pc["migration_time_ms"]:
        gbps = pc["transferred_bytes"] * 8 / (pc["migration_time_ms"] / 1e3) / 1e9
        if gbps > 1.02 * pc["rate_limit_bps"] / 1e9:
            text += (f"; post-copy moved {pc['transferred_bytes'] / 2**20:.1f} MiB at {gbps:.2f} Gbit/s, above the "
                     f"{pc['rate_limit_bps'] / 1e9:g} Gbit/s limit: its {count(pc['pages_pulled'])} pulled pages "
                     f"({pc['pages_pulled'] * pc['transferred_bytes'] / pc['transferred_pages'] / 2**20:.1f} MiB) "
                     "are not rate limited")
    pre = by_wl[heavy].get("precopy")
    if pre:
        text += (f"; pre-copy stopped by {','.join(pre['stop_reasons']) or '-'} after "
                 f"{count(pre['rounds'])} rounds, {pre['sent_per_memory']:.2f}x memory sent")
    check("b", f"under the heaviest dirtying ({heavy}, {rate(rate_before[heavy])} pages/s), "
          "post-copy has the lowest migration time", best == "postcopy", text,
          workload=heavy, migration_time_ms=vals, lowest=best)

# (c) Light dirtying: pre-copy's downtime is the lowest. Checked under the
# lightest workload and, when that one is idle, the lightest that writes.
light = sorted(workloads, key=lambda w: rate_before[w] or 0)
light_ws = light[:1]
if not rate_before[light[0]]:
    light_ws += [w for w in light if rate_before[w]][:1]
for w in light_ws:
    vals, best, text = compare(w, "downtime_ms", "ms", ms)
    text += f"; lowest: {by_wl[w][best]['mode']}"
    if best != "precopy" and "precopy" in vals:
        text += f", {ms(vals['precopy'] - vals[best])} ms below pre-copy"
    for k in ("postcopy", "hybrid"):
        row = by_wl[w].get(k)
        if row and row["postcopy_faults"]:
            text += (f"; {row['mode']} pays after resume instead: {count(row['postcopy_faults'])} faults, "
                     f"p99 {count(row['fault_latency_p99_us'])} us, all pages present "
                     f"{num(row['postcopy_populated_ms'])} ms after resume")
    check("c", f"under light dirtying ({w}, {rate(rate_before[w])} pages/s), pre-copy has the lowest downtime",
          best == "precopy", text, workload=w, downtime_ms=vals, lowest=best)

print("notes:")
# Downtimes not spent sending the last pages: name the phase that took them.
for row in rows:
    b = {k: v for k, v in row["downtime_breakdown_ms"].items() if v is not None}
    if b and row["downtime_ms"] >= 5:
        phase = max(b, key=b.get)
        if phase != "last_pages":
            print(f"  {row['workload']} / {row['mode']}: {ms(b[phase])} of its {ms(row['downtime_ms'])} ms "
                  f"downtime went to '{phase.replace('_', ' ')}'")
print("  migration ms: from the start until the destination guest runs; for post-copy and hybrid until")
print("  every page is present there. Downtime: the guest runs nowhere. Verification is not included.")
print("  guest rate vs before: the guest's write rate during pre-copy (pre) and while post-copy pulls and")
print("  pushes (post), as a share of its rate before migration; cold suspends the guest throughout.")
print("  faults: the destination guest's accesses that waited for a page; rounds include the stop-and-copy")
print("  (or, for post-copy, the push of all pages), with pre-copy's stop reason.")
print("  work lost s: seconds of the guest's rate before migration it did not do, from the start until it")
print("  recovered (watched at most 1 s after the resume); longest stall: below 10 % of that rate; recovery")
print("  ms: resume until its rate stays within 5 % of it for 100 ms (- when not within the watch).")

if json_out:
    out = {"mem": mem, "bandwidth": bandwidth, "policy": policy, "prepage": prepage, "runs": runs,
           "workloads": workloads, "rows": rows, "checks": checks}
    with open(json_out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
PY
