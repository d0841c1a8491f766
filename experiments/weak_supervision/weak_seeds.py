"""Infection Dice of self-training runs that differ only in their seed, as a table (issue 4).

Reads the ``evaluate --json`` files that ``gpu_selftrain.sh`` writes into its
``eval/`` folders (``s<seed>_level<k>.json``, ``level0.json``, ``ens_level<k>.json``,
``ba_level2.json``) and prints, per level: the seeds' mean, standard deviation (n - 1),
lowest and highest infection Dice (mean over slices, against the expert masks), then
every other file as its own row, then the same per case group. ``--ref NAME=JSON`` adds
rows scored elsewhere (for example the CPU runs, re-scored on the same slices):

    python experiments/weak_supervision/weak_seeds.py runs/gpu14a/eval runs/gpu14b/eval \\
        --ref "sixth run L1 (CPU)=runs/gpu14_cpuref/weak6_level1.json"
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def infection(d: dict, group: str | None = None) -> float:
    m = d["metrics"] if group is None else d["by_group"][group]
    return float(m["infection"]["mean"]["dice"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="eval/ folders of gpu_selftrain.sh")
    ap.add_argument("--ref", action="append", default=[], metavar="NAME=JSON")
    a = ap.parse_args(argv)
    seeds: dict[int, dict[int, dict]] = {}  # level -> seed -> eval
    others: dict[str, dict] = {}
    for folder in a.folders:
        for f in sorted(Path(folder).glob("*.json")):
            m = re.fullmatch(r"s(\d+)_level(\d+)", f.stem)
            d = json.loads(f.read_text())
            if m:
                level, seed = int(m.group(2)), int(m.group(1))
                if seed in seeds.get(level, {}):
                    print(f"seed {seed}, level {level} is in two folders ({f})", file=sys.stderr)
                    return 2
                seeds.setdefault(level, {})[seed] = d
            else:
                others[f"{f.stem} ({Path(folder).parent.name})"] = d
    for r in a.ref:
        name, _, path = r.partition("=")
        others[name] = json.loads(Path(path).read_text())
    if not seeds and not others:
        print("no evaluation files found", file=sys.stderr)
        return 1
    every = [d for per in seeds.values() for d in per.values()] + list(others.values())
    counts = {d["metrics"]["infection"]["n_slices"] for d in every}
    if len(counts) > 1:
        print(f"the files were scored on different numbers of slices ({sorted(counts)}); "
              "score them on the same slices", file=sys.stderr)
        return 2
    n_slices = counts.pop()
    first = every[0]
    groups = list(first.get("by_group", {}))
    print(f"Infection Dice, mean over {n_slices} slices, against the expert masks\n")
    print("| run | n | mean | sd | lowest | highest | each |")
    print("|---|---|---|---|---|---|---|")
    for level in sorted(seeds):
        v = [infection(seeds[level][s]) for s in sorted(seeds[level])]
        sd = statistics.stdev(v) if len(v) > 1 else float("nan")
        each = ", ".join(f"s{s} {infection(seeds[level][s]):.3f}" for s in sorted(seeds[level]))
        print(f"| level {level}, seeds | {len(v)} | {statistics.mean(v):.3f} | {sd:.3f} | {min(v):.3f} | "
              f"{max(v):.3f} | {each} |")
    for name, d in others.items():
        print(f"| {name} | 1 | {infection(d):.3f} | | | | |")
    if groups:
        print("\nPer case group (seeds: mean, lowest-highest)\n")
        head = ["group"] + [f"level {k}, seeds" for k in sorted(seeds)] + list(others)
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for g in groups:
            row = [g]
            for level in sorted(seeds):
                v = [infection(seeds[level][s], g) for s in sorted(seeds[level])]
                row.append(f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})")
            row += [f"{infection(d, g):.3f}" if g in d.get("by_group", {}) else "–" for d in others.values()]
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
