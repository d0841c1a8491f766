"""Infection Dice of label maps by the size of the experts' infection on each slice (issue 4).

Issue 4 scores infection Dice as a mean over slices, so slices with small lesions weigh
as much as slices with large ones. This script splits the slices of a COVID-19-CT-Seg
``.npz`` into quartiles of their expert infection area and prints, per quartile, the mean
Dice of each label map given as NAME=LABELS.npz (``evaluate --predictions`` inputs, e.g.
``selftrain``'s ``levelK/labels.npz``), and the mean over all slices; then each map's
precision, recall and area against the experts' per quartile. A last table gives
each map's infection as a share of its own lung field (infection + lung labels) per slice:
median, interquartile range, and its rank correlation (Spearman) with the experts' share
(expert infection / expert lung), which says how well a map follows how much of each slice
is diseased:

    python experiments/weak_supervision/weak_by_size.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        PL=runs/weak6/st/level0/labels.npz L1=runs/weak14_l2_body8/level1_labels.npz \\
        L2=runs/weak14_l2_body8/labels.npz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DRSegUNetLib.labelmaps import labels_for_dataset  # noqa: E402
from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO, LUNG  # noqa: E402

from weak_lungfield import dice_per_slice  # noqa: E402  (this folder)


def quartiles(area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(edges (3,), quartile (N,) 0-3) of per-slice areas: quartile k holds areas in
    [edge k-1, edge k), the first from 0 and the last to the largest."""
    edges = np.quantile(area, [0.25, 0.5, 0.75])
    return edges, np.digitize(area, edges)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..N-1 (ties in index order), for a Spearman correlation of ranks."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help=".npz with infection_mask (zenodo20_dev.npz)")
    ap.add_argument("labels", nargs="+", metavar="NAME=LABELS.npz")
    a = ap.parse_args(argv)
    with np.load(a.data) as z:
        truth = z["infection_mask"].astype(bool)
        expert_lung = z["lung_mask"].astype(bool).sum(axis=(1, 2))
    maps, fields = {}, {}
    for item in a.labels:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"{item}: give NAME=LABELS.npz")
        lab = labels_for_dataset(path, a.data, len(truth))
        maps[name] = np.isin(lab, (GGO, CONSOLIDATION))
        fields[name] = np.isin(lab, (GGO, CONSOLIDATION, LUNG)).sum(axis=(1, 2))
    area = truth.sum(axis=(1, 2))
    edges, q = quartiles(area)
    names = list(maps)
    print(f"Infection Dice (mean over slices) by quartile of the experts' infection area; edges "
          f"{', '.join(f'{e:g}' for e in edges)} px\n")
    print("| quartile | slices | median area (px) | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    dice = {n: dice_per_slice(m, truth) for n, m in maps.items()}
    for k in range(4):
        sel = q == k
        if not sel.any():  # many equal areas (e.g. lesion-free slices) can leave a quartile empty
            print(f"| {k + 1} | 0 | – |" + " – |" * len(names))
            continue
        print(f"| {k + 1} | {int(sel.sum())} | {int(np.median(area[sel]))} | "
              + " | ".join(f"{dice[n][sel].mean():.3f}" for n in names) + " |")
    print(f"| all | {len(truth)} | {int(np.median(area))} | " + " | ".join(f"{dice[n].mean():.3f}" for n in names)
          + " |")
    print("\nPer quartile: precision / recall (mean over slices; precision 0 where a map marks nothing) "
          "and the median ratio of the map's infection area to the experts'\n")
    print("| quartile | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for k in range(4):
        sel = q == k
        if not sel.any():
            continue
        cells = []
        for n in names:
            m, t = maps[n][sel], truth[sel]
            tp, marked = (m & t).sum(axis=(1, 2)), m.sum(axis=(1, 2))
            prec = np.where(marked > 0, tp / np.maximum(marked, 1), 0.0).mean()
            rec = (tp / np.maximum(area[sel], 1)).mean()
            cells.append(f"{prec:.3f} / {rec:.3f}, x{np.median(marked / np.maximum(area[sel], 1)):.2f}")
        print(f"| {k + 1} | " + " | ".join(cells) + " |")
    expert_share = area / np.maximum(expert_lung, 1)
    print("\nInfection as a share of the lung field, per slice\n")
    print("| map | median | interquartile range | Spearman with the experts' share |\n|---|---|---|---|")
    lo, hi = np.quantile(expert_share, [0.25, 0.75])
    print(f"| experts | {np.median(expert_share):.3f} | {lo:.3f}-{hi:.3f} | 1 |")
    for n in names:
        share = maps[n].sum(axis=(1, 2)) / np.maximum(fields[n], 1)
        lo, hi = np.quantile(share, [0.25, 0.75])
        print(f"| {n} | {np.median(share):.3f} | {lo:.3f}-{hi:.3f} | {spearman(share, expert_share):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
