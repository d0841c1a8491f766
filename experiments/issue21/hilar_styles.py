"""Issue 21, point 3: hilar false positives of the bundled model on the 12 COVID-19-NY-SBU
HU slices, under intensity styles (hypothesis a), working pixels (b) and a lung-field
restriction (d). Inference only, 1 torch thread, ~1-2 min on a shared 2-core CPU.

    python experiments/issue21/hilar_styles.py [--variants hu,medseg_fit,...] [--overlays hu,medseg_fit,px1.5]
    python experiments/issue21/hilar_styles.py --variants hu --candidate runs/X/best.pt --json OUT.json
    python experiments/issue21/hilar_styles.py --variants hu --base OLD.pt --candidate NEW.pt --overlays hu,candidate

Rule ("hilar lesion area"): the reference lung field F is the bundled model's own lung
field (GGO ∪ consolidation ∪ lung) on the HU slice at its 1.2 mm working pixel; the
mediastinum M is the largest component of the row-wise span between the outermost
pixels of F, minus F, opened 3 px (heart, great vessels, hila); the hilar band is F
within 15 mm of M (common.hilar_band). Hilar lesion area = GGO + consolidation pixels of
a run inside that fixed band, in mm². Summed over the 5 slices on which no real lesion
reaches the band (by eye; NOT_CLEAR below), where every such pixel is a false positive;
the total lesion area of the other 7 slices shows whether a variant keeps real lesions.
Writes hilar_styles.json next to this file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

import common
from common import CONS, GGO, OUT, hilar_band, hilar_metrics, ny_slices, predictor, segment
from styles import medseg_style, zenodo_style

# Slices where real lesions reach the band (by eye on the lung-window overlays): the four
# of common.DISEASED, A098752_19010127-128 (posterior consolidation), A002304_19001231-076
# (posteromedial right lower-lobe GGO) and A056642_19010107-111 (dependent posterior
# opacities beside the spine). On the other 5 any lesion in the band is a false positive.
NOT_CLEAR = common.DISEASED | {"A098752_19010127-128", "A002304_19001231-076", "A056642_19010107-111"}
# MedSeg windows. "eb": the exact inverse of EightBitConfig (round trip = 8-bit quantisation
# + JPEG only). "fit": the window of the median MedSeg slice (training_hila.py measures it:
# median lung mode grey 44 taken as -850 HU, soft-tissue mode grey 220 as +40 HU).
# "w1500": the textbook lung window W1500/L-600.
WINDOWS = {"medseg_eb": (-1000.0, 150.0), "medseg_fit": (-1073.0, 217.0), "medseg_w1500": (-1350.0, 150.0)}
ALL = ["hu", "medseg_eb", "medseg_fit", "medseg_w1500", "zenodo", "px0.8", "px1.0", "px1.5", "px1.8", "px2.0",
       "native", "sharpen", "blur", "medseg_fit@1.5", "hu+extraction"]
TITLES = {"hu": "HU, 1.2 mm (default)", "medseg_fit": "MedSeg-window round trip", "px1.5": "HU, 1.5 mm",
          "px1.8": "HU, 1.8 mm", "sharpen": "HU sharpened", "medseg_fit@1.5": "MedSeg window, 1.5 mm"}
PIXELS = (1.2, 0.8, 1.0, 1.5, 1.8, 2.0, None)


def run_variant(v: str, preds: dict, hu: np.ndarray, sp) -> np.ndarray:
    """Labels on the slice's own 512 grid for variant ``v``."""
    if v == "hu":
        return segment(preds[1.2], hu, sp)[0]
    if v in WINDOWS:
        return segment(preds[1.2], medseg_style(hu, WINDOWS[v]), sp, eight_bit=True)[0]
    if "@" in v and v.split("@")[0] in WINDOWS:
        w, px = v.split("@")
        return segment(preds[float(px)], medseg_style(hu, WINDOWS[w]), sp, eight_bit=True)[0]
    if v in ("sharpen", "blur"):  # partial-volume test: unsharp mask / Gaussian of 1 mm sigma before the network
        g = ndimage.gaussian_filter(hu, 1.0 / sp[0])
        return segment(preds[1.2], (hu + (hu - g) if v == "sharpen" else g).astype(np.float32), sp)[0]
    if v == "zenodo":
        z = zenodo_style(hu, 256)
        lab = segment(preds[1.2], z, (sp[0] * hu.shape[0] / 256, sp[1] * hu.shape[1] / 256), eight_bit=True)[0]
        return ndimage.zoom(lab, hu.shape[0] / 256, order=0, grid_mode=True, mode="nearest")
    if v == "candidate":  # another checkpoint (--candidate), HU at 1.2 mm; band and field stay the bundled model's
        return segment(preds["candidate"], hu, sp)[0]
    if v.startswith("px"):
        return segment(preds[float(v[2:])], hu, sp)[0]
    if v == "native":
        return segment(preds[None], hu, sp)[0]
    if v == "hu+extraction":  # (d): lesions only inside the thesis's lung extraction (-170 HU)
        lab = segment(preds[1.2], hu, sp)[0].copy()
        ext = common.reference_field(hu, sp)
        lab[((lab == GGO) | (lab == CONS)) & ~ext] = 0
        return lab
    raise SystemExit(f"unknown variant {v}")


def vessel_hu(hu, sp, field) -> dict:
    """Median true HU and approx. HU after each 8-bit round trip of the dense band pixels
    (true HU > -400: vessels, bronchial walls) and of parenchyma (< -700) in the field."""
    band = hilar_band(field, sp)
    dense, paren = band & (hu > common.DENSE_HU), field & (hu < -700)
    out = {"true": (float(np.median(hu[dense])), float(np.median(hu[paren])))}
    for k, w in WINDOWS.items():
        a = medseg_style(hu, w)
        out[k] = (float(np.median(a[dense])), float(np.median(a[paren])))
    z = ndimage.zoom(zenodo_style(hu, 256), hu.shape[0] / 256, order=1, grid_mode=True, mode="nearest")
    out["zenodo"] = (float(np.median(z[dense])), float(np.median(z[paren])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(ALL))
    ap.add_argument("--overlays", default="", help="comma list of variants for the PNG panels, e.g. hu,zenodo,px1.5 or hu,candidate")
    ap.add_argument("--base", default=None,
                    help="checkpoint of the variants and of the band (default: the bundled model; the numbers of "
                         "HILAR.md and TRAINING.md were measured with the one of 2026-11-27, sha256 6c79a7e2...)")
    ap.add_argument("--candidate", default=None, help="checkpoint scored as the variant 'candidate' (HU, 1.2 mm)")
    ap.add_argument("--json", default=str(OUT / "hilar_styles.json"))
    ap.add_argument("--overlay-dir", default=str(OUT / "overlays"))
    ap.add_argument("--titles", default="", help="comma list of panel titles for --overlays (default: the variants')")
    ap.add_argument("--slices", default="", help="comma list of slice names to draw (default: all 12)")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if args.candidate and "candidate" not in variants:
        variants.append("candidate")
    preds = {p: predictor(p, model=args.base) for p in PIXELS}
    if args.candidate:
        preds["candidate"] = predictor(1.2, model=args.candidate)
    rows, vhu = [], {}
    for name, hu, sp in ny_slices():
        base = run_variant("hu", preds, hu, sp)
        field = base > 0
        band = hilar_band(field, sp)
        vhu[name] = vessel_hu(hu, sp, field)
        labs = {}
        for v in variants:
            lab = base if v == "hu" else run_variant(v, preds, hu, sp)
            labs[v] = lab
            m = hilar_metrics(lab, hu, sp, field=field)
            rows.append({"slice": name, "variant": v, "clear": name not in NOT_CLEAR, **m})
        if args.overlays and (not args.slices or name in args.slices.split(",")):
            ov = args.overlays.split(",")
            titles = args.titles.split(",") if args.titles else [TITLES.get(v, v) for v in ov]
            common.overlay_png(Path(args.overlay_dir) / f"{name}.png", hu, [labs[v] for v in ov], titles, band=band,
                               suptitle=f"{name} ({'hila clear' if name not in NOT_CLEAR else 'diseased'})")
    Path(args.json).write_text(json.dumps({"rows": rows, "vessel_hu": vhu}, indent=1))

    print("| variant | hilar lesion = false positive, 5 clear slices (mm², sum) | of which consolidation | dense band px called lesion (clear) "
          "| A048383 -30 / -30 (mm²) | lesion area, 7 slices with real lesions near the band (mm²) |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        r = [x for x in rows if x["variant"] == v]
        c = [x for x in r if x["clear"]]
        d = [x for x in r if not x["clear"]]
        a = [x["hilar_lesion_mm2"] for x in r if x["slice"].startswith("A048383")]
        dense = np.mean([x["hilar_dense_as_lesion_frac"] for x in c])
        print(f"| {v} | {sum(x['hilar_lesion_mm2'] for x in c):.0f} | {sum(x['hilar_cons_mm2'] for x in c):.0f} "
              f"| {dense:.3f} | {a[0]:.0f} / {a[1]:.0f} | {sum(x['lesion_mm2'] for x in d):.0f} |")
    print("\nper slice, hilar lesion mm² (band fixed by the 1.2 mm HU run):")
    print("| slice | clear | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name in dict.fromkeys(x["slice"] for x in rows):
        r = {x["variant"]: x for x in rows if x["slice"] == name}
        print(f"| {name} | {'yes' if r[variants[0]]['clear'] else 'no'} | "
              + " | ".join(f"{r[v]['hilar_lesion_mm2']:.0f}" for v in variants) + " |")
    print("\nmedian HU of dense band pixels (> -400 HU) / of parenchyma (< -700 HU), true and after each round trip:")
    keys = list(next(iter(vhu.values())))
    print("| slice | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, d in vhu.items():
        print(f"| {name} | " + " | ".join(f"{d[k][0]:.0f} / {d[k][1]:.0f}" for k in keys) + " |")
    med = {k: np.median([d[k] for d in vhu.values()], axis=0) for k in keys}
    print("| median | " + " | ".join(f"{med[k][0]:.0f} / {med[k][1]:.0f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
