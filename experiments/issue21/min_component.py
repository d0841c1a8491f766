"""Issue 21, point 4: do tiny lesion components cost Dice? Removing them, chosen on validation.

On a slice with no consolidation in the expert mask, a single predicted consolidation pixel
scores Dice 0 (slices where truth and prediction are both empty are left out). The rule tried:
after ``decide_labels``, every 8-connected consolidation component smaller than A pixels
takes the most probable other class, pixel by pixel; optionally every lesion component (GGO
and consolidation together) smaller than B pixels takes the more probable of background and
lung. Areas are in pixels of the model's working grid (1.2 mm): COVID-19-CT-Seg slices
(1.5 mm) scale by (1.5 / 1.2)^2, MedSeg slices (no pixel size) count their own pixels, as
inference treats them.

    .venv/bin/python experiments/issue21/min_component.py ../shared/data CKPT [--part val|test] [--grid A:B,...]

Reuses compare.py's cached probabilities (runs/issue21_compare/). Nothing in DRSegUNetLib
imports this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import TARGETS, cache_path, decided, load_samples, per_slice_labels, probabilities  # noqa: E402

from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG  # noqa: E402

EIGHT = np.ones((3, 3), bool)


def drop_small(labels: np.ndarray, prob: np.ndarray, min_cons: float, min_lesion: float, scale: float) -> np.ndarray:
    out = labels.copy()
    if min_lesion > 0:
        comp, n = ndimage.label((out == GGO) | (out == CONSOLIDATION), EIGHT)
        if n:
            area = np.bincount(comp.ravel())[1:] * scale
            small = np.isin(comp, np.flatnonzero(area < min_lesion) + 1)
            out[small] = np.where(prob[LUNG][small] >= prob[BACKGROUND][small], LUNG, BACKGROUND)
    if min_cons > 0:
        comp, n = ndimage.label(out == CONSOLIDATION, EIGHT)
        if n:
            area = np.bincount(comp.ravel())[1:] * scale
            small = np.isin(comp, np.flatnonzero(area < min_cons) + 1)
            others = prob.copy()
            others[CONSOLIDATION] = -1
            out[small] = others.argmax(0)[small]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--part", choices=("val", "test"), default="val")
    ap.add_argument("--grid", default="0:0,10:0,25:0,50:0,100:0,200:0,400:0,0:10,0:25,0:50,25:25,50:25,100:25,50:50,100:50")
    args = ap.parse_args()
    pred = Predictor.from_checkpoint(args.model, device="cpu", cpu_bf16="off")
    work = pred.config.inference.pixel_mm or None
    samples = load_samples(args.shared_data, pred, args.part)
    probs = probabilities(pred, samples, cache_path(args.model, args.part))
    base = decided(pred, samples, probs)
    keys = [f"{s}_{r}" for s, r in TARGETS]
    print(f"{args.model} on {args.part} ({len(samples)} slices): mean Dice over slices (slices scored)")
    print("| min cons. px : min lesion px | " + " | ".join(keys) + " | mean of five |")
    print("|---|" + "---|" * (len(keys) + 1))
    for cell in args.grid.split(","):
        a, b = (float(x) for x in cell.split(":"))
        outs = [drop_small(lab, p.astype(np.float32), a, b, (s.pixel_mm / work) ** 2 if (s.pixel_mm and work) else 1.0)
                for s, p, lab in zip(samples, probs, base)]
        scores = {k: list(v.values()) for k, v in per_slice_labels(samples, outs).items()}
        means = [float(np.mean(scores[k])) for k in keys]
        print(f"| {a:g} : {b:g} | " + " | ".join(f"{m:.3f} ({len(scores[k])})" for m, k in zip(means, keys))
              + f" | {np.mean(means):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
