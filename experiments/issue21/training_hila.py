"""Issue 21, point 3, hypothesis (c) and the domain-shift check: what the training data
say about the hila, and whether the bundled model makes hilar false positives on its
own (8-bit) data too. Inference only, 1 torch thread, ~3 min on a shared 2-core CPU.

    python experiments/issue21/training_hila.py [--every 3]

1. MedSeg grey levels: median over the 50 images of the lung-parenchyma mode (grey < 128)
   and the soft-tissue mode (grey >= 128) -> the window of the median MedSeg slice.
2. Hilar negatives in the labels. Lung field: the bundled model's lung field on the slice's
   own grid united with the lesion mask (and, for COVID-19-CT-Seg, its lung mask). Hilar band as for the HU slices (common.hilar_band, 15 mm), with assumed
   pixels of 0.75 mm (MedSeg crops, near native) and 1.5 mm (COVID-19-CT-Seg, 512 halved).
   Dense = approx. HU > -400 (EightBitConfig). Reported: share of dense band pixels that are
   labelled lesion, and how many slices have a band free of any lesion label.
3. The model on held-out slices of its own data (validation + test parts): predicted
   lesion on non-lesion truth inside the hilar band, as a share of the band's non-lesion
   pixels; the same number for the 5 clear NY-SBU slices comes from hilar_styles.json.
"""
from __future__ import annotations

import argparse
import glob
import json

import numpy as np

import common
from common import CONS, GGO, OUT, hilar_band, predictor
from DRSegUNetLib.data import apply_split, load_split, read_medseg_folder, read_zenodo_npz
from DRSegUNetLib.config import EightBitConfig
from DRSegUNetLib.vocabulary import BACKGROUND, LUNG

DATA = common.ROOT.parent / "shared" / "data"
ASSUMED_MM = {"medseg": 0.75, "zenodo": 1.5}
INF_BITS = (1 << GGO) | (1 << CONS)


def medseg_window() -> dict:
    from PIL import Image
    lung, tissue = [], []
    for f in sorted(glob.glob(str(DATA / "medseg" / "train50" / "images" / "*.jpg"))):
        h = np.bincount(np.asarray(Image.open(f).convert("L")).ravel(), minlength=256)
        lung.append(int(np.argmax(h[:128])))
        tissue.append(128 + int(np.argmax(h[128:])))
    gl, gt = float(np.median(lung)), float(np.median(tissue))
    per_grey = (40.0 - (-850.0)) / (gt - gl)  # lung mode = -850 HU, tissue mode = +40 HU (assumed)
    lo = -850.0 - gl * per_grey
    eb = EightBitConfig()
    to_eb = lambda g: eb.low + g / 255 * (eb.high - eb.low)
    return {"lung_mode_grey": gl, "tissue_mode_grey": gt, "lung_mode_range": [min(lung), max(lung)],
            "tissue_mode_range": [min(tissue), max(tissue)], "window_hu": [lo, lo + 255 * per_grey],
            "lung_mode_eightbit_hu": to_eb(gl), "tissue_mode_eightbit_hu": to_eb(gt)}


def lesion_truth(s) -> np.ndarray:
    """Pixels that can only be GGO or consolidation."""
    return ((s.allowed & INF_BITS) != 0) & ((s.allowed & ((1 << BACKGROUND) | (1 << LUNG))) == 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=3, help="every n-th COVID-19-CT-Seg slice (speed)")
    args = ap.parse_args(argv)
    win = medseg_window()
    print("MedSeg grey modes:", json.dumps(win))
    pred = predictor(None)  # 8-bit slices on their own grid, as evaluate scores them
    medseg = read_medseg_folder(DATA / "medseg" / "train50")
    zen = read_zenodo_npz(DATA / "zenodo20" / "zenodo20_dev.npz")[::args.every]
    split = load_split(common.ROOT / "DRSegUNetLib" / "splits" / "default.json")
    held = set()
    for part in (apply_split(medseg + zen, split)[1:]):
        held |= {s.name for s in part}
    rows = []
    for s in medseg + zen:
        src = s.source
        sp = (ASSUMED_MM[src],) * 2
        lab = pred.predict_slices([s.hu], eight_bit=True)[0]
        les = lesion_truth(s)
        # the model's own field is part of it, so that lesions called on hilar structures outside
        # an expert lung mask count, as on the HU slices
        field = (lab > 0) | les
        if src == "zenodo":
            field |= (s.allowed & (1 << BACKGROUND)) == 0
        band = hilar_band(field, sp)
        if band.sum() == 0:
            continue
        dense = s.hu > common.DENSE_HU
        predles = (lab == GGO) | (lab == CONS)
        rows.append({"name": s.name, "source": src, "held_out": s.name in held,
                     "band_px": int(band.sum()), "dense_band_px": int((band & dense).sum()),
                     "dense_band_lesion_px": int((band & dense & les).sum()),
                     "band_lesion_px": int((band & les).sum()),
                     "fp_band_px": int((band & predles & ~les).sum()),
                     "dense_nonlesion_band_px": int((band & dense & ~les).sum()),
                     "fp_dense_band_px": int((band & dense & predles & ~les).sum()), "band_nonlesion_px": int((band & ~les).sum()),
                     "periph_dense_px": int((field & ~band & dense).sum()),
                     "periph_dense_lesion_px": int((field & ~band & dense & les).sum())})
    nys = json.loads((OUT / "hilar_styles.json").read_text())["rows"]
    ny = [r for r in nys if r["variant"] == "hu" and r["clear"]]
    (OUT / "training_hila.json").write_text(json.dumps({"medseg_window": win, "rows": rows}, indent=1))
    print("\n| data | slices | dense band px labelled lesion | dense px away from the hila labelled lesion "
          "| slices with a lesion-free hilar band | held-out slices: band non-lesion px predicted lesion "
          "| held-out: dense non-lesion band px predicted lesion |")
    print("|---|---|---|---|---|---|---|")
    for src in ("medseg", "zenodo"):
        r = [x for x in rows if x["source"] == src]
        h = [x for x in r if x["held_out"]]
        f = lambda a, b: sum(x[a] for x in r) / max(1, sum(x[b] for x in r))
        fp = sum(x["fp_band_px"] for x in h) / max(1, sum(x["band_nonlesion_px"] for x in h))
        fpd = sum(x["fp_dense_band_px"] for x in h) / max(1, sum(x["dense_nonlesion_band_px"] for x in h))
        free = sum(1 for x in r if x["band_lesion_px"] == 0)
        print(f"| {src} | {len(r)} | {f('dense_band_lesion_px', 'dense_band_px'):.3f} "
              f"| {f('periph_dense_lesion_px', 'periph_dense_px'):.3f} | {free} | {fp:.3f} ({len(h)} slices) | {fpd:.3f} |")
    fp_ny = sum(x["hilar_lesion_mm2"] for x in ny) / sum(x["band_mm2"] for x in ny)
    fpd_ny = np.mean([x["hilar_dense_as_lesion_frac"] for x in ny])
    print(f"| NY-SBU HU, 5 clear slices, 1.2 mm | 5 | no labels | no labels | (5 by eye) | {fp_ny:.3f} | {fpd_ny:.3f} (mean of slices) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
