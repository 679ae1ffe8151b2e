#!/usr/bin/env python3
"""The module graph of livemig's src/, read from its `use crate::...` lines
and `crate::a::b` paths (test modules left out).

Prints one line per module with the modules it imports (--edges), then every
import cycle, then every import that reaches up a layer. Exits 1 if it found
either. The layers, lowest first, are the folders of src/:

    util < guest < wire < report < migration < predict < plan

A module may import from its own folder and from the folders below it.

usage: scripts/modgraph.py [--edges] [SRC]
"""
import os
import re
import sys

LAYERS = ["util", "guest", "wire", "report", "migration", "predict", "plan"]


def modules(src):
    """{module path tuple: file} for every .rs file under src."""
    out = {}
    for root, _, names in os.walk(src):
        for n in names:
            if not n.endswith(".rs"):
                continue
            path = os.path.join(root, n)
            parts = os.path.relpath(path, src)[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib"):
                parts = parts[:-1]
            out[tuple(parts)] = path
    return out


def use_paths(body, prefix=()):
    """Every path a use tree names: `a::{b, c::d}` -> a::b, a::c::d."""
    body = body.strip()
    if body.startswith("{") and body.endswith("}"):
        depth, start, out = 0, 0, []
        inner = body[1:-1]
        for i, ch in enumerate(inner + ","):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                if inner[start:i].strip():
                    out += use_paths(inner[start:i], prefix)
                start = i + 1
        return out
    head, sep, rest = body.partition("::")
    if sep:
        return use_paths(rest, prefix + (head.strip(),))
    return [prefix + (body.split(" as ")[0].strip(),)]


def imports(path, mods):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"//[^\n]*", "", text).split("#[cfg(test)]")[0]
    paths = [use_paths(m) for m in re.findall(r"\buse\s+crate::([^;]*);", text, re.S)]
    paths = [p for ps in paths for p in ps]
    paths += [tuple(s.strip() for s in m.split("::") if s.strip())
              for m in re.findall(r"\bcrate((?:\s*::\s*\w+)+)", text)]
    found = set()
    for p in paths:
        # The longest prefix that is a module of the crate.
        for k in range(len(p), 0, -1):
            if p[:k] in mods:
                found.add(p[:k])
                break
    return found


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(mod):
    return LAYERS.index(mod[0]) if mod and mod[0] in LAYERS else None


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "src")
    mods = modules(src)
    name = lambda m: "::".join(m) or "crate"
    edges = {}
    for m, path in mods.items():
        # A module using its own folder's mod.rs is using its folder's interface.
        edges[m] = {t for t in imports(path, mods) if t != m and t != m[: len(t)]}
    if "--edges" in sys.argv:
        for m in sorted(edges):
            print(f"{name(m)} -> {', '.join(name(t) for t in sorted(edges[m]))}")
    bad = 0
    for c in cycles(edges):
        bad += 1
        print(f"cycle of {len(c)} modules: {', '.join(map(name, c))}")
    for m in sorted(edges):
        for t in sorted(edges[m]):
            if layer(m) is not None and layer(t) is not None and layer(t) > layer(m):
                bad += 1
                print(f"reaches up: {name(m)} ({m[0]}) imports {name(t)} ({t[0]})")
    print(f"{len(mods)} modules, {sum(map(len, edges.values()))} imports, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
