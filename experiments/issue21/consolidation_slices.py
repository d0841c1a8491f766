"""Issue 21: consolidation per MedSeg slice of a split part, to see why a mean Dice is what it is.

For each checkpoint and each MedSeg slice of the part: consolidation pixels in truth, predicted,
predicted inside the expert's GGO, and the slice's Dice (``-`` where truth and prediction are
both empty: left out of the mean, as ``compare.py`` does). Uses ``compare.py``'s cached
probabilities (same sha256 and part), so after ``compare.py`` it takes seconds.

    .venv/bin/python experiments/issue21/consolidation_slices.py ../shared/data A.pt [B.pt ...] [--part val|test]

Descriptive only: nothing here chooses a rule. Nothing in DRSegUNetLib imports this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (sets the path to the repository and one torch thread)

from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.metrics import counts, region_mask  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--part", choices=("val", "test"), default="val")
    args = ap.parse_args()
    print("| model | slice | truth px | predicted px | predicted in truth GGO | Dice |")
    print("|---|---|---|---|---|---|")
    for m in args.models:
        pred = Predictor.from_checkpoint(m, device="cpu", cpu_bf16="off")
        samples = compare.load_samples(args.shared_data, pred, args.part)
        probs = compare.probabilities(pred, samples, compare.cache_path(m, args.part))
        for s, labels in zip(samples, compare.decided(pred, samples, probs)):
            if s.source != "medseg":
                continue
            cons, truth, ggo = region_mask(labels, "consolidation"), s.region_truth("consolidation"), s.region_truth("ggo")
            sc = counts(cons, truth).scores()
            dice = "-" if sc is None else f"{sc['dice']:.3f}"
            print(f"| {m.parent.name}/{m.name} | {s.name} | {int(truth.sum())} | {int(cons.sum())} | "
                  f"{int((cons & ggo).sum())} | {dice} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
