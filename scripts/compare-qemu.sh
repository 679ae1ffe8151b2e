#!/usr/bin/env bash
# compare-qemu.sh: the same migration in a real QEMU and in livemig, side by
# side (issue 19's yardstick for `--policy qemu`). The guest: 256 MiB that
# rewrites byte 0 of every page in [1 MiB, 100 MiB) as fast as it can. In
# QEMU it is a 512-byte boot sector (scripts/qemu-bootsector.s, TCG), moved
# between two QEMUs on this machine over QMP (scripts/qemu-migrate.py); in
# livemig it is `--workload sweep:from=1M,to=100M,rate=max,zero=0.6` under
# `--policy qemu`. Both with QEMU's default 300 ms downtime limit, at each
# bandwidth cap, and given up after 28 s (QEMU: migrate_cancel; livemig:
# --max-time). Prints one table (converged, total / downtime, sent, dirty
# syncs and syncs per second, for each side), the guests' write rates, and
# the issue's targets, each saying whether it holds.
# Skips (exit 0) where qemu-system-x86_64 is not installed; never installs it.
set -euo pipefail

default_caps=128MiB/s,256MiB/s,512MiB/s,10GiB/s

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]
  --caps LIST        bandwidth caps, comma-separated: 120MiB/s, 2GiB/s,
                     500mbit, 10gbit (default $default_caps)
  --runs N           repeat every migration N times; the table has medians
                     (default 1)
  --max-time DUR     give a migration up after this long: QEMU cancels it,
                     livemig stops iterating (default 28s)
  --tracker T        livemig's dirty tracker (default bitmap: the guest marks
                     a bitmap as it writes, as TCG marks QEMU's dirty memory
                     in software; uffd-wp's write faults after every sync
                     would slow livemig's guest far below TCG's)
  --json FILE        also write every figure, per run, and the checks to FILE
  --help             print this help
QEMU=/path/to/qemu-system-x86_64 and LIVEMIG=/path/to/livemig pick the
binaries (default: qemu-system-x86_64 on PATH, a release build of livemig).
The exit status is 0 whether or not the targets hold (and when QEMU is
absent), 1 when a migration fails, 2 on a bad argument.
EOF
}

die() { echo "compare-qemu: $*" >&2; exit 1; }
bad_arg() { echo "compare-qemu: $*" >&2; usage >&2; exit 2; }
say() { echo "compare-qemu: $*" >&2; }

caps=$default_caps runs=1 max_time=28s tracker=bitmap json_out=""
while (($#)); do
  case "$1" in
    --caps|--runs|--max-time|--tracker|--json)
      if (($# < 2)) || [[ -z $2 ]]; then bad_arg "$1 needs a value"; fi
      case "$1" in
        --caps) caps=$2 ;;
        --runs) runs=$2 ;;
        --max-time) max_time=$2 ;;
        --tracker) tracker=$2 ;;
        --json) json_out=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_arg "unknown argument: $1" ;;
  esac
done
[[ $runs =~ ^[1-9][0-9]{0,2}$ ]] || bad_arg "--runs must be a positive integer (at most 999), not '$runs'"
[[ $max_time =~ ^([0-9]+(\.[0-9]+)?)s?$ && ${BASH_REMATCH[1]} != 0 ]] ||
  bad_arg "--max-time must be a number of seconds like 28s, not '$max_time'"
max_time_s=${BASH_REMATCH[1]}
[[ $tracker =~ ^[a-z-]*$ ]] || bad_arg "--tracker must be a tracker name like uffd-wp or bitmap, not '$tracker'"
if [[ -n $json_out ]]; then
  [[ -d $(dirname -- "$json_out") ]] || bad_arg "--json: no directory $(dirname -- "$json_out")"
fi
command -v python3 >/dev/null || die "needs python3"
# 'cap<TAB>bytes per second' for each cap, in the order given.
cap_rows=$(python3 - "$caps" 2>&1 <<'PY'
import re, sys
units = {"KiB/s": 2**10, "MiB/s": 2**20, "GiB/s": 2**30, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
for cap in sys.argv[1].split(","):
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(KiB/s|MiB/s|GiB/s|kbit|mbit|gbit)", cap)
    if not m or float(m[1]) == 0:
        sys.exit(f"--caps: '{cap}' is not a rate like 128MiB/s or 500mbit")
    print(f"{cap}\t{round(float(m[1]) * units[m[2]])}")
PY
) || bad_arg "$(tail -n 1 <<<"$cap_rows")"

qemu=${QEMU:-qemu-system-x86_64}
if ! command -v "$qemu" >/dev/null; then
  echo "compare-qemu: skipped: $qemu is not installed (Debian: apt-get install qemu-system-x86)"
  exit 0
fi
for tool in as ld objcopy; do
  if ! command -v "$tool" >/dev/null; then
    echo "compare-qemu: skipped: needs GNU binutils ($tool) to build the boot sector"
    exit 0
  fi
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir compare-qemu


# The guest: one boot sector, exactly 512 bytes.
image=$tmp/bootsector.img
as --32 -o "$tmp/bootsector.o" "$root/scripts/qemu-bootsector.s"
ld -m elf_i386 -Ttext=0x7c00 -e start -o "$tmp/bootsector.elf" "$tmp/bootsector.o"
objcopy -O binary -j .text "$tmp/bootsector.elf" "$image"
[[ $(stat -c %s "$image") == 512 ]] || die "the boot sector is $(stat -c %s "$image") bytes, not 512"

livemig=$(private_livemig)
tracker_opt=()
if [[ -n $tracker ]]; then
  tracker_opt=(--tracker "$tracker")
  err=$("$livemig" simulate --quiet --mem 256M --tracker "$tracker" --warmup 0s 2>&1 >/dev/null) ||
    bad_arg "$(grep -m 1 -i 'error' <<<"$err" | sed 's/^Error: //; s/^error: //')"
fi
workload=sweep:from=1M,to=100M,rate=max,zero=0.6

# 'side<TAB>cap<TAB>run<TAB>report' for each migration.
manifest=$tmp/manifest.tsv
: >"$manifest"
ncaps=$(wc -l <<<"$cap_rows")
total=$((ncaps * 2 * runs)) n=0
say "$ncaps cap(s) x 2 sides x $runs run(s) = $total migrations of a 256 MiB guest, given up after ${max_time_s} s"
for ((r = 1; r <= runs; r++)); do
  while IFS=$'\t' read -r cap bps; do
    n=$((n + 1))
    out=$tmp/qemu-$n
    mkdir "$out"
    say "  [$n/$total] QEMU at $cap, run $r"
    rc=0
    run_fg python3 "$root/scripts/qemu-migrate.py" --qemu "$qemu" --image "$image" --workdir "$out" \
      --bandwidth "$bps" --downtime-limit-ms 300 --max-time "$max_time_s" --json "$out.json" \
      >"$out.log" 2>&1 || rc=$?
    if ((rc != 0)); then
      sed 's/^/  | /' "$out.log" >&2
      die "QEMU migration failed at $cap, run $r (exit status $rc)"
    fi
    printf 'qemu\t%s\t%s\t%s\t%s\n' "$cap" "$bps" "$r" "$out.json" >>"$manifest"

    n=$((n + 1))
    out=$tmp/livemig-$n
    say "  [$n/$total] livemig at $cap, run $r"
    rc=0
    run_fg "$livemig" migrate --mem 256M --workload "$workload" --policy qemu --downtime-limit 300ms \
      --bandwidth "$cap" --max-time "${max_time_s}s" "${tracker_opt[@]}" --quiet --json "$out.json" \
      >"$out.log" 2>&1 || rc=$?
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
      die "livemig migration failed at $cap, run $r (exit status $rc${why:+; $why})"
    fi
    printf 'livemig\t%s\t%s\t%s\t%s\n' "$cap" "$bps" "$r" "$out.json" >>"$manifest"
  done <<<"$cap_rows"
done

# Medians, the tables, the targets (and the JSON).
python3 - "$manifest" "$json_out" "$runs" "$max_time_s" "$tracker" "$SECONDS" <<'PY'
import json, statistics, sys

manifest, json_out, runs, max_time_s, tracker, wall_s = sys.argv[1:]
runs, max_time_s, wall_s = int(runs), float(max_time_s), int(wall_s)

# Each run as the same few figures, whichever side made it.
def from_qemu(q):
    return {
        "converged": q["converged"],
        "stopped_at_ms": None if q["converged"] else q["cancelled_at_ms"],
        "total_ms": q["total_time_ms"] if q["converged"] else None,
        "downtime_ms": q["downtime_ms"],
        "sent_bytes": q["transferred_bytes"],
        "syncs": q["dirty_sync_count"],
        "syncs_per_s": q["dirty_syncs_per_s"],
        "guest_pps_before": q["guest_pages_per_s_before"],
        "guest_pps_during": q["guest_pages_per_s_during"],
        "dirty_pages_rate": q["dirty_pages_rate_median"],
        "raw": q,
    }

def from_livemig(m):
    syncs = m.get("dirty_sync_count")
    if syncs is None:  # a livemig without it: its rounds
        syncs = len(m["rounds"]) + m.get("rounds_not_listed", 0)
    t = m["migration_time_ms"]
    return {
        "converged": bool(m["converged"]),
        # Iteration ended where the stop-and-copy began.
        "stopped_at_ms": None if m["converged"] else t - m["downtime_ms"],
        "total_ms": t if m["converged"] else None,
        "downtime_ms": m["downtime_ms"] if m["converged"] else None,
        "sent_bytes": m["transferred_bytes"],
        "syncs": syncs,
        "syncs_per_s": syncs / (t / 1e3) if t else None,
        "guest_pps_before": m["guest_dirty_rate_pps"],
        "guest_pps_during": m.get("guest_rate_precopy_pps"),
        "dirty_pages_rate": None,
        "raw": {k: v for k, v in m.items() if k not in ("rounds", "stream_pages", "destination_stream_pages")},
    }

cells, caps = {}, {}
for line in open(manifest):
    side, cap, bps, run, path = line.rstrip("\n").split("\t")
    rep = json.load(open(path))
    fig = from_qemu(rep) if side == "qemu" else from_livemig(rep)
    fig["run"] = int(run)
    caps[cap] = int(bps)
    cells.setdefault((cap, side), []).append(fig)

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def summary(figs):
    conv = [f for f in figs if f["converged"]]
    return {
        "runs": len(figs), "converged_runs": len(conv),
        "stopped_at_ms": med(f["stopped_at_ms"] for f in figs),
        "total_ms": med(f["total_ms"] for f in conv),
        "downtime_ms": med(f["downtime_ms"] for f in conv),
        "sent_bytes": med(f["sent_bytes"] for f in figs),
        "syncs": med(f["syncs"] for f in figs),
        "syncs_per_s": med(f["syncs_per_s"] for f in figs),
        "guest_pps_before": med(f["guest_pps_before"] for f in figs),
        "guest_pps_during": med(f["guest_pps_during"] for f in figs),
        "dirty_pages_rate": med(f["dirty_pages_rate"] for f in figs),
        "per_run": figs,
    }

rows = [{"cap": cap, "bytes_per_s": bps, "qemu": summary(cells[(cap, "qemu")]),
         "livemig": summary(cells[(cap, "livemig")])} for cap, bps in caps.items()]

def count(x):
    return "-" if x is None else (f"{x:.0f}" if x == int(x) else f"{x:.1f}")

def ms(x):
    return "-" if x is None else (f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms")

def rate(pps):
    if pps is None:
        return "-"
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if pps >= 0.9995 * div:
            return f"{pps / div:.3g}{unit}"
    return f"{pps:.0f}"

def cell(s, side):
    if s["converged_runs"] == s["runs"]:
        verdict = "yes"
    elif s["converged_runs"] == 0:
        verdict = "no"
    else:
        verdict = f"{s['converged_runs']}/{s['runs']} yes"
    parts = []
    if s["converged_runs"] < s["runs"]:
        how = "cancelled" if side == "qemu" else "stopped"
        verdict += f" ({how} at {s['stopped_at_ms'] / 1e3:.1f} s)"
    parts.append(verdict)
    if s["converged_runs"]:
        parts.append(f"{ms(s['total_ms'])} / {ms(s['downtime_ms'])}")
    parts.append(f"{s['sent_bytes'] / 1e6:.0f} MB")
    sps = "-" if s["syncs_per_s"] is None else f"{s['syncs_per_s']:.1f}/s"
    parts.append(f"{count(s['syncs'])} syncs ({sps})")
    return ", ".join(parts)

qv = rows[0]["qemu"]["per_run"][0]["raw"]["qemu_version"]
tr = f", livemig tracker {tracker}" if tracker else ""
print(f"QEMU {qv} (TCG) and livemig --policy qemu: a 256 MiB guest rewriting byte 0 of every page in "
      f"[1 MiB, 100 MiB), downtime limit 300 ms, given up after {max_time_s:g} s{tr}; median of {runs} run(s)")
print()
print("| bandwidth cap | QEMU: converged, total / downtime, sent, dirty syncs (per s) | livemig: the same |")
print("|---|---|---|")
for row in rows:
    print(f"| {row['cap']} | {cell(row['qemu'], 'qemu')} | {cell(row['livemig'], 'livemig')} |")
print()
print("The guests' write rates, pages/s (QEMU's from the boot sector's passes on its serial port):")
print()
print("| bandwidth cap | QEMU before | QEMU during | QEMU dirty-pages-rate | livemig before | livemig during |")
print("|---|---:|---:|---:|---:|---:|")
for row in rows:
    q, m = row["qemu"], row["livemig"]
    print(f"| {row['cap']} | {rate(q['guest_pps_before'])} | {rate(q['guest_pps_during'])} | "
          f"{rate(q['dirty_pages_rate'])} | {rate(m['guest_pps_before'])} | {rate(m['guest_pps_during'])} |")
if runs > 1:
    print()
    print("spread over the runs (min..max): total or stop ms, downtime ms, dirty syncs")
    for row in rows:
        for side in ("qemu", "livemig"):
            figs = row[side]["per_run"]
            t = [f["total_ms"] or f["stopped_at_ms"] for f in figs]
            d = [f["downtime_ms"] for f in figs if f["downtime_ms"] is not None]
            s = [f["syncs"] for f in figs]
            dt = f"{min(d):.0f}..{max(d):.0f}" if d else "-"
            print(f"  {row['cap']:>9} {side:<7} {min(t):.0f}..{max(t):.0f}, {dt}, {min(s)}..{max(s)}")

# Issue 19's targets.
checks = []
def check(cid, claim, holds, text):
    verdict = "n/a" if holds is None else ("holds" if holds else "does not hold")
    checks.append({"id": cid, "claim": claim, "holds": holds, "text": text})
    print(f"  ({cid}) {claim}: {verdict}: {text}")

def verdict(s):
    return s["converged_runs"] * 2 > s["runs"]  # the majority's

print()
print("targets:")
same = [(r["cap"], verdict(r["qemu"]), verdict(r["livemig"])) for r in rows]
check("a", "the same converge verdict at every cap", all(q == m for _, q, m in same),
      "; ".join(f"{c}: QEMU {'yes' if q else 'no'}, livemig {'yes' if m else 'no'}" for c, q, m in same))

both_iterate = [r for r in rows if not verdict(r["qemu"]) and not verdict(r["livemig"])]
texts, ok = [], True
for r in both_iterate:
    q, m = r["qemu"]["syncs_per_s"], r["livemig"]["syncs_per_s"]
    ratio = m / q if q and m else None
    ok = ok and ratio is not None and 0.5 <= ratio <= 2
    texts.append(f"{r['cap']}: QEMU {q:.2f}/s, livemig {m:.2f}/s" + (f" ({ratio:.2f}x)" if ratio else ""))
check("b", "dirty syncs per second within a factor of 2 of QEMU's where both iterate to the limit",
      ok if both_iterate else None, "; ".join(texts) or "no cap where both give up")

at512 = [r for r in rows if r["bytes_per_s"] == 512 * 2**20]
if at512 and at512[0]["qemu"]["downtime_ms"] is not None and at512[0]["livemig"]["downtime_ms"] is not None:
    q, m = at512[0]["qemu"]["downtime_ms"], at512[0]["livemig"]["downtime_ms"]
    check("c", "downtime at 512 MiB/s at most 1.5x QEMU's + 10 ms", m <= 1.5 * q + 10,
          f"QEMU {ms(q)}, livemig {ms(m)} (bound {ms(1.5 * q + 10)})")
else:
    check("c", "downtime at 512 MiB/s at most 1.5x QEMU's + 10 ms", None,
          "512MiB/s not measured, or a side did not converge there")

both_conv = [r for r in rows if verdict(r["qemu"]) and verdict(r["livemig"])]
texts, ok = [], True
for r in both_conv:
    q, m = r["qemu"]["sent_bytes"], r["livemig"]["sent_bytes"]
    ok = ok and abs(m - q) <= 0.1 * q
    texts.append(f"{r['cap']}: QEMU {q / 1e6:.0f} MB, livemig {m / 1e6:.0f} MB ({100 * (m - q) / q:+.0f}%)")
check("d", "bytes sent within 10% of QEMU's where both converge", ok if both_conv else None,
      "; ".join(texts) or "no cap where both converge")

print()
print("notes:")
print("  QEMU: total-time, downtime, ram transferred and dirty-sync-count from query-migrate; a run")
print("  still going at the time limit is cancelled and shows its figures at the cancel. livemig:")
print("  migration_time_ms, downtime_ms, transferred_bytes, dirty_sync_count; past --max-time it stops")
print("  iterating and finishes with a stop-and-copy (so it always completes, every page verified).")
print("  Syncs per second: dirty syncs over the total (or cancel) time. MB = 10^6 bytes.")
print("  'before': the guest's rate in the second before migration; 'during': while pre-copy ran.")
print("  QEMU's dirty-pages-rate: pages found dirty per second at its syncs, at most once a second; it")
print("  counts each page once per sync (25344 at most), the other rates count every write.")
print(f"  took {wall_s} s in all")

if json_out:
    out = {"caps": list(caps), "runs": runs, "max_time_s": max_time_s, "tracker": tracker or None,
           "qemu_version": qv, "rows": rows, "checks": checks, "wall_s": wall_s}
    with open(json_out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
PY
