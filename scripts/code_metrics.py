"""Code-shape metrics for issue 20: lines per module, the longest functions, import cycles.

    python scripts/code_metrics.py [ROOT] [--json OUT]

Reads the sources only (ast); imports nothing from the project.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGES = ("DRSegUNetLib", "DRSegUNet/DRSegUNetSlicer")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        base = root / pkg
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        return [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    head = ".".join(base + ([node.module] if node.module else []))
    return [head] + [f"{head}.{a.name}" for a in node.names]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = _resolve(mod, is_pkg, node)
            for n in names:
                if n in mods and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
    for v in graph:
        if v not in index:
            visit(v)
    return out


def functions(mods: dict[str, Path]) -> list[tuple[int, str]]:
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))
    return sorted(out, reverse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=".")
    ap.add_argument("--json")
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args(argv)
    root = Path(a.root)
    mods = modules(root)
    lines = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in mods.items()}
    funcs = functions(mods)
    cyc = cycles(import_graph(mods))
    tests_loading_scripts = sorted(
        str(f.relative_to(root)) for f in (root / "Testing").glob("*.py")
        if "spec_from_file_location" in f.read_text(encoding="utf-8")
        and ("bench" in f.read_text(encoding="utf-8") or "experiments" in f.read_text(encoding="utf-8")))
    print(f"{'module':45s} lines")
    for m, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"{m:45s} {n}")
    print(f"\n{len(mods)} modules, {sum(lines.values())} lines; largest {max(lines.values())}")
    print(f"\nlongest functions (top {a.top}):")
    for n, name in funcs[: a.top]:
        print(f"  {n:4d}  {name}")
    print(f"functions over 120 lines: {sum(1 for n, _ in funcs if n > 120)}")
    print(f"\nimport cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    print(f"\ntests that load a bench/ or experiments/ script by path: {len(tests_loading_scripts)}")
    for t in tests_loading_scripts:
        print("  " + t)
    if a.json:
        Path(a.json).write_text(json.dumps({"lines": lines, "longest": funcs[: a.top], "cycles": cyc,
                                            "over_120": [f for f in funcs if f[0] > 120],
                                            "tests_loading_scripts": tests_loading_scripts}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
