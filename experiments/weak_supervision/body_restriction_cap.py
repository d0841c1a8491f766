"""What does clearing labels outside the body cost on 8-bit COVID-19-CT-Seg slices?

``inference.restrict_to_body`` sets labels outside the body to background, with the body
taken as the largest region at or above ``InferenceConfig.body_threshold_hu`` (-500 HU),
holes filled. That rule was made for CT in Hounsfield units. On the 8-bit slices of a
COVID-19-CT-Seg ``.npz`` (mapped to approximate HU, EightBitConfig) fat can fall below
-500, so the body may stop at the fat and leave lung outside. This script applies the rule
to the *expert* labels themselves (infection as GGO, the rest of the lung as lung), so any
loss is what every model scored on these slices loses, whatever it predicts:

    python experiments/weak_supervision/body_restriction_cap.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        --levels=-500,-700,-800

Each row is one body level: a fixed approx. HU, or ``otsu`` (each slice's Otsu level, the
lung extraction's rule for 8-bit slices, ``lungs.air_mask``). It prints the share of expert
infection pixels outside the body, the slices losing more than 10 % of theirs (by group), the
mean share of the image the body covers, and the Dice of the restricted expert labels
against the unrestricted ones (mean over slices): the ceiling for any model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DRSegUNetLib.inference import restrict_to_body  # noqa: E402
from DRSegUNetLib.lungs import air_mask  # noqa: E402
from DRSegUNetLib.slices import read_slices  # noqa: E402
from DRSegUNetLib.vocabulary import GGO, LUNG  # noqa: E402
from DRSegUNetLib.weak import lung_config_for  # noqa: E402
from weak_lungfield import dice_per_slice  # noqa: E402  (this folder)


def restrict_with_air(labels: np.ndarray, air: np.ndarray) -> np.ndarray:
    """``restrict_to_body`` with a given air mask: the same rule, the air threshold swapped.

    ``restrict_to_body`` thresholds ``hu < threshold_hu``; passing ``~air`` as the image
    (True = tissue) and a threshold of 0.5 gives ``air`` exactly.
    """
    return restrict_to_body(labels, (~air).astype(np.float32), 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="COVID-19-CT-Seg .npz with ct_uint8, lung_mask, infection_mask, group")
    ap.add_argument("--levels", default="-500", help="fixed body levels in approx. HU, comma-separated")
    args = ap.parse_args(argv)

    inp = read_slices(args.data)
    with np.load(args.data) as d:
        lung, inf, group = d["lung_mask"] > 0, d["infection_mask"] > 0, d["group"]
    expert = np.where(inf, GGO, np.where(lung, LUNG, 0)).astype(np.uint8)
    cfg = lung_config_for(inp, method="otsu")
    rules = {f"{float(v):g} approx. HU": (lambda hu, v=float(v): hu < v) for v in filter(None, args.levels.split(","))}
    rules["otsu (per slice)"] = lambda hu: air_mask(hu, cfg)

    print("| body level | expert infection pixels outside the body | slices losing > 10 % of theirs (by group 0-8) "
          "| body share of the image | ceiling: infection Dice all / 0-4 / 5-8 | ceiling: lung Dice all |")
    print("|---|---|---|---|---|---|")
    for name, rule in rules.items():
        air = np.stack([rule(h) for h in inp.hu])
        body = restrict_with_air(np.ones_like(expert), air) > 0  # all of a slice where the rule does not apply
        kept = np.where(body, expert, 0)
        lost = (inf & ~body).sum(axis=(1, 2)) / np.maximum(inf.sum(axis=(1, 2)), 1)
        di = dice_per_slice(kept == GGO, inf)
        dl = dice_per_slice(kept > 0, lung)
        many = np.bincount(group[lost > 0.1], minlength=9)
        print(f"| {name} | {(inf & ~body).sum() / inf.sum():.4f} | {int((lost > 0.1).sum())} "
              f"({' '.join(str(int(n)) for n in many)}) | {body.mean():.3f} | "
              f"{di.mean():.3f} / {di[group <= 4].mean():.3f} / {di[group >= 5].mean():.3f} | {dl.mean():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
