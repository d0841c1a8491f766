"""Issue 21, point 3: is the model's clean behaviour at COVID-19-CT-Seg's hila tied to that
set's CLAHE look? Inference only, 1 torch thread, ~2 min on a shared 2-core CPU.

    python experiments/issue21/zenodo_probe.py [--every 2]

Held-out COVID-19-CT-Seg slices (validation group 5, test groups 3 and 6; every n-th),
taken as 1.5 mm pixels and run at the 1.2 mm working pixel, as the product treats CT:
* "as is": the 8-bit slice through EightBitConfig (the training mapping);
* "HU look": the same slice remapped per slice, linearly, so that its normal lung (lung
  mask minus infection, median) lands at -850 HU and the soft tissue around the lungs
  (a 15-px ring outside the lung mask, median) at +40 HU, as on real CT in HU;
* "HU look, 0.75 mm": HU look at MedSeg's scale (the slice enlarged 2x for the network).
Scored in the hilar band (common.hilar_band, 15 mm; the field = the lung mask united with
the model's lung field on the "as is" input, so that lesions called on hilar structures
outside the expert lung mask count, as they do on the HU slices):
share of dense (> -400 HU in the HU-look image) non-lesion band pixels called lesion, share
of all non-lesion band pixels called lesion, and pooled infection Dice over the slices.
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

import common
from common import CONS, GGO, hilar_band, predictor
from DRSegUNetLib.data import read_zenodo_npz
from DRSegUNetLib.vocabulary import BACKGROUND
from training_hila import DATA, lesion_truth


def hu_look(s) -> np.ndarray:
    lung = (s.allowed & (1 << BACKGROUND)) == 0
    les = lesion_truth(s)
    ring = ndimage.binary_dilation(lung, iterations=15) & ~lung
    a, b = float(np.median(s.hu[lung & ~les])), float(np.median(s.hu[ring]))
    return (-850.0 + (s.hu - a) * (40.0 + 850.0) / (b - a)).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=2)
    args = ap.parse_args(argv)
    zen = [s for s in read_zenodo_npz(DATA / "zenodo20" / "zenodo20_dev.npz", groups=[3, 5, 6])][::args.every]
    p12, p075 = predictor(1.2), predictor(0.75)
    sp = (1.5, 1.5)
    acc = {}
    for s in zen:
        lung = (s.allowed & (1 << BACKGROUND)) == 0
        if lung.sum() < 500:
            continue
        les = lesion_truth(s)
        look = hu_look(s)
        dense = look > common.DENSE_HU
        band = None
        for name, pred, x, eb in (("as is", p12, s.hu, True), ("HU look", p12, look, False),
                                  ("HU look, 0.75 mm", p075, look, False)):
            lab = pred.labels(x[None], sp, eb)[0][0]
            if band is None:
                band = hilar_band(lung | (lab > 0), sp)
            pl = (lab == GGO) | (lab == CONS)
            a = acc.setdefault(name, np.zeros(6))
            a += [(band & dense & ~les & pl).sum(), (band & dense & ~les).sum(), (band & ~les & pl).sum(),
                  (band & ~les).sum(), 2 * (pl & les).sum(), pl.sum() + les.sum()]
    print(f"{len(zen)} held-out COVID-19-CT-Seg slices (groups 3, 5, 6, every {args.every})\n")
    print("| input | dense non-lesion band px called lesion | non-lesion band px called lesion | infection Dice (pooled) |")
    print("|---|---|---|---|")
    for name, a in acc.items():
        print(f"| {name} | {a[0] / a[1]:.3f} | {a[2] / a[3]:.3f} | {a[4] / a[5]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
