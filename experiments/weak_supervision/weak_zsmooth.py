"""Level 1's probabilities averaged over neighbouring slices before the argmax (an experiment).

COVID-19-CT-Seg's slices are consecutive slices of each volume (``group``; consecutive
``source_index``), and lesions continue from slice to slice: the experts' infection on one
slice and the next overlap with Dice 0.83 on zenodo20_dev.npz. Noise in level 1's output
need not. This script averages level 1's softmax probabilities over the slices within
radius R (``--radii``) of each slice in the same volume (weights: a Gaussian of sigma R/2,
renormalised at the volume's ends), then decides labels as ``Predictor`` does (argmax,
then the body restriction), and scores infection and lung Dice per slice
against the expert masks (mean over slices, as ``evaluate``). With ``--save R`` the labels
for that radius go to ``OUT/labels_r<R>.npz`` for ``evaluate --predictions``. Radius 0
is level 1's own argmax. No expert mask decides anything here:

    python experiments/weak_supervision/weak_zsmooth.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        runs/weak6/st/level1/best.pt \\
        --radii 0,1,2,3 --out runs/weak15_zsmooth --save 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.labelmaps import save_label_maps  # noqa: E402
from DRSegUNetLib.metrics import _group_key  # noqa: E402
from DRSegUNetLib.slices import read_slices  # noqa: E402
from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO, LUNG  # noqa: E402

from weak_lungfield import dice_per_slice  # noqa: E402  (this folder)


def weights(radius: int) -> np.ndarray:
    """Slice weights for offsets -R..R: a Gaussian of sigma R/2 (R = 0: the slice alone)."""
    if radius <= 0:
        return np.ones(1)
    x = np.arange(-radius, radius + 1, dtype=float)
    w = np.exp(-0.5 * (x / (radius / 2.0)) ** 2)
    return w / w.sum()


def smooth_over_slices(prob: np.ndarray, volumes: np.ndarray, radius: int) -> np.ndarray:
    """(N, C, H, W) probabilities averaged with ``weights(radius)`` over neighbouring slices of the
    same volume (``volumes`` (N,) labels consecutive slices of one volume alike); at a volume's ends
    the weights that fall outside it are dropped and the rest renormalised."""
    if radius <= 0:
        return prob.astype(np.float32)
    w = weights(radius)
    out = np.zeros(prob.shape, np.float32)
    n = len(prob)
    for i in range(n):
        acc, total = 0.0, 0.0
        for k, off in enumerate(range(-radius, radius + 1)):
            j = i + off
            if 0 <= j < n and volumes[j] == volumes[i]:
                acc = acc + w[k] * prob[j].astype(np.float32)
                total += w[k]
        out[i] = acc / total
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help=".npz of 8-bit slices with expert masks (zenodo20_dev.npz)")
    ap.add_argument("model", help="level 1's checkpoint")
    ap.add_argument("--radii", default="0,1,2,3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", type=int, default=None, metavar="R", help="write the labels of this radius")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    out = Path(a.out)
    t0 = time.time()
    inp = read_slices(a.data)
    with np.load(a.data) as z:
        inf_truth, lung_truth = z["infection_mask"].astype(bool), z["lung_mask"].astype(bool)
        source = z["source_index"] if "source_index" in z.files else np.arange(len(inp))
    volumes = np.array(inp.groups)
    same = volumes[1:] == volumes[:-1]
    if not (np.diff(source)[same] == 1).all():
        ap.error(f"{a.data}: the slices of a volume are not consecutive (source_index), so neighbours in the "
                 "file are not neighbouring slices; use the full set, not a subset such as every 2nd slice")
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoint(a.model, a.device, batch_size=8)
    prob = np.zeros((len(inp), 4) + inp.hu.shape[1:], np.float16)
    for s in range(0, len(inp), 16):
        prob[s:s + 16] = predictor.probabilities(inp.hu[s:s + 16]).float().cpu().numpy()
    order = sorted(set(inp.groups), key=_group_key)  # zenodo0, zenodo1, ..., zenodo8 in number order
    first_half = np.isin(volumes, order[:5])  # groups 0-4 of zenodo20_dev.npz
    rows = []
    for r in [int(x) for x in a.radii.split(",")]:
        sm = smooth_over_slices(prob, volumes, r)
        labels = predictor.decide_labels(torch.from_numpy(sm), inp.hu, eight_bit=True)
        inf = dice_per_slice(np.isin(labels, (GGO, CONSOLIDATION)), inf_truth)
        lung = dice_per_slice(np.isin(labels, (GGO, CONSOLIDATION, LUNG)), lung_truth)
        row = {"radius": r, "infection": round(float(inf.mean()), 4),
               "infection_0_4": round(float(inf[first_half].mean()), 4),
               "infection_5_8": round(float(inf[~first_half].mean()), 4), "lung": round(float(lung.mean()), 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.save == r:
            save_label_maps(out / f"labels_r{r}.npz", [inp.path], [labels])
    info = {"model": a.model, "rows": rows, "seconds": round(time.time() - t0, 1)}
    (out / "zsmooth.json").write_text(json.dumps(info, indent=1) + "\n")
    print("| radius | infection: all | first 5 groups (0-4) | the others (5-8) | lung |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['radius']} | {row['infection']:.3f} | {row['infection_0_4']:.3f} | "
              f"{row['infection_5_8']:.3f} | {row['lung']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
