"""Issue 21: how dense is the experts' consolidation in each part of the MedSeg split, and what
does the new lineage call the consolidation it misses on validation?

Per part (development split): slices with consolidation, the HU quartiles of consolidation
pixels (8-bit mapped by EightBitConfig), the share above -100 HU (soft-tissue density) and the
slices with over 3,000 such pixels. Then, for each MedSeg validation slice and a checkpoint
(compare.py's cached probabilities): how many truth-consolidation pixels the model calls
consolidation, GGO or neither, with their median HU.

    .venv/bin/python experiments/issue21/dense_consolidation.py ../shared/data runs/i21_l2c/best.pt

Nothing in DRSegUNetLib imports this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import ROOT, cache_path, decided, load_samples, probabilities  # noqa: E402

from DRSegUNetLib.config import EightBitConfig  # noqa: E402
from DRSegUNetLib.data import apply_split, load_split, read_dataset  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO  # noqa: E402

DENSE_HU = -100.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("model", type=Path)
    args = ap.parse_args()
    split = load_split(ROOT / "DRSegUNetLib" / "splits" / "default.json")
    parts = apply_split(read_dataset(args.shared_data / "medseg" / "train50", EightBitConfig()), split)
    print("| part | slices | with consolidation | consolidation px | HU quartiles | share > -100 HU | slices with > 3,000 px > -100 HU |")
    print("|---|---|---|---|---|---|---|")
    for name, part in zip(("train", "val", "test"), parts):
        hu = [s.hu[np.asarray(s.region_truth("consolidation"), bool)] for s in part]
        allhu = np.concatenate(hu)
        dense = [f"{s.name} ({int((h > DENSE_HU).sum())} of {h.size})" for s, h in zip(part, hu) if (h > DENSE_HU).sum() > 3000]
        print(f"| {name} | {len(part)} | {sum(h.size > 0 for h in hu)} | {allhu.size} | "
              f"{' / '.join(f'{q:.0f}' for q in np.percentile(allhu, [25, 50, 75]))} | {(allhu > DENSE_HU).mean():.2f} | "
              f"{', '.join(dense) or '-'} |")
    pred = Predictor.from_checkpoint(args.model, device="cpu", cpu_bf16="off")
    samples = load_samples(args.shared_data, pred, "val")
    probs = probabilities(pred, samples, cache_path(args.model, "val"))
    print(f"\n{args.model}, MedSeg validation: truth consolidation called ... (pixels, median HU)")
    print("| slice | consolidation | GGO | neither (background or lung) |")
    print("|---|---|---|---|")
    medseg = [i for i, s in enumerate(samples) if s.source == "medseg"]
    ms = [samples[i] for i in medseg]
    for s, lab in zip(ms, decided(pred, ms, [probs[i] for i in medseg])):
        truth = np.asarray(s.region_truth("consolidation"), bool)
        cells = []
        for m in (truth & (lab == CONSOLIDATION), truth & (lab == GGO), truth & (lab != GGO) & (lab != CONSOLIDATION)):
            cells.append(f"{int(m.sum())} ({np.median(s.hu[m]):.0f})" if m.any() else "0")
        print(f"| {s.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
