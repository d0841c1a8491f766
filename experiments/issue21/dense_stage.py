"""Lab bench (issue 21, dense_consolidation.py's finding): one `train` stage in which some crops
show their consolidation denser, as consolidated lobes against the chest wall look (about
-100 to +40 HU), because the training part has almost none of that.

With probability P per crop, the pixels known to be consolidation (MedSeg's, ``allowed`` ==
consolidation only) are raised toward a density drawn from HU_LOW..HU_HIGH: hu + w * s *
(target - hu) where it is below the target, w a soft mask of those pixels (Gaussian, sigma 1.5
px, so the edge blends), s drawn from 0.5..1 (some texture stays); pixels darker than -850 HU
(air bronchograms) are left; ``--open-type`` does the same to COVID-19-CT-Seg's infection
(type open), whose crops label the tissue outside the lung background. It runs after the crop's own augmentation, on a random stream
of its own, so with P = 0 the crops are exactly `train`'s (with `--workers 0`: crop processes do
not see the patch). Everything else is
`python -m DRSegUNetLib train ARGS...`.

    .venv/bin/python experiments/issue21/dense_stage.py --dense 0.3 [--hu -100,40] -- \
        ../shared/data/medseg/train50 ../shared/data/zenodo20/zenodo20_dev.npz --out runs/NAME ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import DRSegUNetLib.training as training  # noqa: E402
from DRSegUNetLib.cli import main as cli_main  # noqa: E402
from DRSegUNetLib.data import bit  # noqa: E402
from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO  # noqa: E402

BRONCHOGRAM_HU = -850.0


def densify(hu: np.ndarray, allowed: np.ndarray, rng: np.random.Generator, hu_range: tuple[float, float],
            open_type: bool = False) -> np.ndarray:
    """``hu`` with its consolidation-only pixels raised toward a drawn density (module doc);
    ``open_type``: also lesions of open type (COVID-19-CT-Seg's infection, whose lung mask says
    where the lung ends, so dense lesion is shown beside tissue labelled background)."""
    cons = allowed == bit(CONSOLIDATION)
    if open_type:
        cons |= allowed == bit(GGO, CONSOLIDATION)
    if not cons.any():
        return hu
    target = rng.uniform(*hu_range)
    strength = rng.uniform(0.5, 1.0)
    w = np.clip(ndimage.gaussian_filter(cons.astype(np.float32), 1.5) * 2.0, 0.0, 1.0) * (hu > BRONCHOGRAM_HU)
    return np.where(hu < target, hu + w * strength * (target - hu), hu).astype(hu.dtype)


def run(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", type=float, default=0.0, help="probability per crop")
    ap.add_argument("--hu", default="-100,40", help="range of the target density, HU")
    ap.add_argument("--dense-seed", type=int, default=12345)
    ap.add_argument("--open-type", action="store_true", help="also densify lesions of open type (COVID-19-CT-Seg)")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    lo, hi = (float(v) for v in a.hu.split(","))
    rng = np.random.default_rng(a.dense_seed)
    plain = training.PatchSampler.draw

    def draw(self):
        hu, allowed = plain(self)
        if a.dense > 0 and rng.random() < a.dense:
            hu = densify(hu, allowed, rng, (lo, hi), a.open_type)
        return hu, allowed

    training.PatchSampler.draw = draw
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    return cli_main(["train", *rest])


if __name__ == "__main__":
    sys.exit(run())
