#!/usr/bin/env bash
# teleport-sweep.sh: page-cache teleportation's total time against the share
# R of clean page cache the destination reads from shared storage, R = 0..1
# and auto, for a page-cache-heavy guest (Akiyama et al.'s Figure, scaled to
# this machine): measured (median of --runs), the model and the simulator,
# as a Markdown table and an SVG with auto marked.
set -euo pipefail

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--mem SIZE] [--cache F] [--layout seq|scatter]
                        [--workload KIND] [--bandwidth RATE] [--storage-rate RATE]
                        [--runs N] [--out DIR]
  --mem SIZE           guest memory (default 1G)
  --cache F            share of memory that is page cache (default 0.75)
  --layout L           seq or scatter (default seq)
  --workload W         the guest's writes besides its cache (default uniform:rate=2k)
  --bandwidth RATE     the network (default 1gbit)
  --storage-rate RATE  the storage channel (default 1gbit)
  --runs N             measured runs per R; the table shows medians (default 3)
  --out DIR            where teleport.md, teleport.svg and the sweeps go (default teleport-out)
USAGE
}

mem=1G cache=0.75 layout=seq workload="uniform:rate=2k" bw=1gbit storage=1gbit runs=3 out=teleport-out
while (($#)); do
  case "$1" in
    --mem) mem=${2:?}; shift 2 ;;
    --cache) cache=${2:?}; shift 2 ;;
    --layout) layout=${2:?}; shift 2 ;;
    --workload) workload=${2:?}; shift 2 ;;
    --bandwidth) bw=${2:?}; shift 2 ;;
    --storage-rate) storage=${2:?}; shift 2 ;;
    --runs) runs=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
scratch_dir teleport-sweep
livemig=$(private_livemig)
mkdir -p "$out"

# The guest's disk: random blocks, as many as its page cache needs.
disk_mib=$(python3 -c "
import re,sys
m=re.fullmatch(r'(\d+)([KMGT]?)', '$mem'.upper().rstrip('IB'))
n=int(m[1])*{'':1,'K':1<<10,'M':1<<20,'G':1<<30,'T':1<<40}[m[2]]
print(int(n*float('$cache')/(1<<20))+1)")
say "writing a ${disk_mib} MiB backing file"
head -c "${disk_mib}M" /dev/urandom >"$tmp/disk"

spec="$workload,cache=$cache,layout=$layout"
shares=(0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1 auto)
share_flags=()
for r in "${shares[@]}"; do share_flags+=(--teleport-share "$r"); done
for i in $(seq 1 "$runs"); do
  say "sweep $i of $runs: $mem, $spec, network $bw, storage $storage, R = ${shares[*]}"
  run_fg "$livemig" sweep --quiet --mem "$mem" --workload "$spec" --bandwidth "$bw" \
    --policy xen --teleport "$tmp/disk" --storage-rate "$storage" "${share_flags[@]}" \
    --out "$out/sweep-$i" >/dev/null
done

python3 - "$out" "$runs" "$mem" "$spec" "$bw" "$storage" <<'PY'
import json, statistics, sys
out, runs, mem, spec, bw, storage = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
sweeps = [json.load(open(f"{out}/sweep-{i}/sweep.json")) for i in range(1, runs + 1)]
rows = []
for k, row in enumerate(sweeps[0]["rows"]):
    label = row["label"].rsplit(" R=", 1)[1]
    meas = [s["rows"][k]["measured"] for s in sweeps]
    times = [m["total_time_ms"] for m in meas if m["total_time_ms"] is not None]
    shares = [m["teleport_share"] for m in meas if m.get("teleport_share") is not None]
    rows.append(dict(
        label=label,
        share=statistics.median(shares) if shares else None,
        measured=statistics.median(times) if times else None,
        spread=(min(times), max(times)) if times else None,
        model=row["model"]["total_time_ms"],
        sim=row["simulated"]["total_time_ms"],
    ))
fixed = [r for r in rows if r["label"] != "auto" and r["measured"]]
base = next(r for r in rows if r["label"] == "0")["measured"]
best = min(fixed, key=lambda r: r["measured"])
auto = next(r for r in rows if r["label"] == "auto")
err = lambda p, m: f"{100 * (p - m) / m:+.1f}%" if p and m else "-"
lines = [
    f"Total time against R: {mem} guest, `{spec}`, network {bw}, storage {storage}, "
    f"median of {runs} run(s) (machine shared with other builds).",
    "",
    "| R | measured total (s) | min-max (s) | vs R=0 | model (s) | err | simulator (s) | err |",
    "|---|---|---|---|---|---|---|---|",
]
for r in rows:
    name = f"auto ({r['share']:.2f})" if r["label"] == "auto" and r["share"] is not None else r["label"]
    if r is best:
        name = f"**{name}** (best)"
    m = r["measured"]
    lines.append(
        f"| {name} | {m / 1e3:.2f} | {r['spread'][0] / 1e3:.2f}-{r['spread'][1] / 1e3:.2f} | "
        f"{100 * (m - base) / base:+.1f}% | {r['model'] / 1e3:.2f} | {err(r['model'], m)} | "
        f"{r['sim'] / 1e3:.2f} | {err(r['sim'], m)} |" if m else f"| {name} | failed | | | | | | |"
    )
gain = 100 * (base - best["measured"]) / base
auto_gap = 100 * (auto["measured"] - best["measured"]) / best["measured"] if auto["measured"] else float("nan")
worst = max(abs(r[p] - r["measured"]) / r["measured"] for r in rows if r["measured"] for p in ("model", "sim"))
lines += ["", f"Best R = {best['label']}: {gain:.1f}% below R = 0. auto chose R = "
          f"{auto['share']:.2f}, {auto_gap:+.1f}% from the best. Predictions within {100 * worst:.1f}%."]
open(f"{out}/teleport.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

# The picture: measured (with min-max), model, simulator; auto marked.
W, H, L, B, T, R = 640, 400, 60, 50, 30, 20
pts = [r for r in fixed]
ymax = max(max(r["measured"], r["model"], r["sim"]) for r in rows if r["measured"]) * 1.1 / 1e3
x = lambda v: L + v * (W - L - R)
y = lambda v: H - B - v / ymax * (H - B - T)
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{(W+L)/2}" y="{H-12}" text-anchor="middle">R (share of clean page cache read from storage)</text>',
       f'<text x="16" y="{(H-B+T)/2}" transform="rotate(-90 16 {(H-B+T)/2})" text-anchor="middle">total time (s)</text>',
       f'<text x="{(W+L)/2}" y="18" text-anchor="middle">{mem}, {spec}, network {bw}, storage {storage}</text>']
for i in range(11):
    svg.append(f'<text x="{x(i/10)}" y="{H-B+16}" text-anchor="middle">{i/10:.1f}</text>')
for i in range(6):
    v = ymax * i / 5
    svg.append(f'<text x="{L-6}" y="{y(v)+4}" text-anchor="end">{v:.1f}</text>')
for key, colour, name in [("measured", "#1f77b4", "measured (median)"), ("model", "#2ca02c", "model"), ("sim", "#ff7f0e", "simulator")]:
    path = " ".join(f"{x(float(r['label'])):.1f},{y(r[key] / 1e3):.1f}" for r in pts)
    dash = '' if key == "measured" else ' stroke-dasharray="5,3"'
    svg.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
    k = ["measured", "model", "sim"].index(key)
    svg.append(f'<line x1="{W-170}" y1="{T+10+16*k}" x2="{W-150}" y2="{T+10+16*k}" stroke="{colour}" stroke-width="2"{dash}/>')
    svg.append(f'<text x="{W-145}" y="{T+14+16*k}">{name}</text>')
for r in pts:
    lo, hi = r["spread"]
    svg.append(f'<line x1="{x(float(r["label"]))}" y1="{y(lo/1e3)}" x2="{x(float(r["label"]))}" y2="{y(hi/1e3)}" stroke="#1f77b4"/>')
if auto["measured"] and auto["share"] is not None:
    ax, ay = x(auto["share"]), y(auto["measured"] / 1e3)
    svg.append(f'<circle cx="{ax}" cy="{ay}" r="6" fill="none" stroke="red" stroke-width="2"/>')
    svg.append(f'<text x="{ax}" y="{ay-10}" text-anchor="middle" fill="red">auto (R={auto["share"]:.2f})</text>')
svg.append("</svg>")
open(f"{out}/teleport.svg", "w").write("\n".join(svg) + "\n")
PY
say "wrote $out/teleport.md and $out/teleport.svg"
