"""Does the model find the lungs on real CT in HU? (issue 5, third target)

For every real HU CT in ../shared/data/hu (12 COVID-19-NY-SBU DICOM slices, CIP's
native-resolution crop_ct_2slices and, for information only, the 4 mm ct-64 and
TestInput), this script segments with a model (default: the bundled one) and compares
its lung field (GGO ∪ consolidation ∪ lung) with the thesis's lung extraction
(lungs.extract_lungs, -170 HU). The target counts only slices where that extraction is
clean; which slices are clean is decided from the extraction alone, before the model
is run (``bench/hu_clean_slices.json``, with the reason for each slice), or, where CIP
gives an expert lung mask, by the extraction agreeing with it (Dice >= 0.95).

    python bench/hu_lungs.py --out out/hu_lungs [--model M] [--pixel-mm MM] [--overlays]

prints one row per slice, a summary table, for the volumes with CIP's lung mask the GGO and
consolidation labelled outside that mask, and what is labelled on the slices without lung in
``data/outside_lungs`` (abdomen/pelvis studies of COVID-19-NY-SBU, every pixel background:
``check.npz`` never trained on, ``train.npz`` for training); writes ``hu_lungs.json`` and, with
``--overlays``, one PNG per slice (extraction outline red, model outline green).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.data import read_dataset, read_npz  # noqa: E402
from DRSegUNetLib.imageio import read_ct  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.lungs import extract_lungs  # noqa: E402
from DRSegUNetLib.metrics import region_areas_cm2  # noqa: E402
from DRSegUNetLib.orientation import axial_view  # noqa: E402
from DRSegUNetLib.vocabulary import REGIONS  # noqa: E402

HU = ROOT.parent / "shared" / "data" / "hu"
OUTSIDE = ROOT / "data" / "outside_lungs"
CLEAN_FILE = Path(__file__).with_name("hu_clean_slices.json")
CIP_CLEAN_DICE = 0.95  # extraction vs CIP's expert mask at least this: "clean"
WINDOW = (-1350.0, 150.0)


def cases(hu_dir: Path):
    """(name, CT path, expert lung mask path or None, used for the target)."""
    for p in sorted((hu_dir / "covid19_ny_sbu").glob("*.dcm")):
        yield f"ny_sbu/{p.stem}", p, None, True
    cip = hu_dir / "cip_copdgene"
    yield "cip/crop_ct_2slices", cip / "crop_ct_2slices.nrrd", cip / "crop_ct_2slices_lungmask_DERIVED.nrrd", True
    # 4 mm voxels, 64 px across: far coarser than anything the model saw; information only.
    yield "cip/ct-64", cip / "ct-64.nrrd", cip / "wholeLung-64.nrrd", False


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return mask & ~ndimage.binary_erosion(mask)


def write_png(path: Path, hu: np.ndarray, extraction: np.ndarray, model: np.ndarray | None) -> None:
    from PIL import Image
    grey = np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[outline(extraction)] = (1.0, 0.1, 0.1)
    if model is not None:
        rgb[outline(model)] = (0.1, 1.0, 0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)


def outside_lungs(predictor: Predictor, folder: Path = OUTSIDE) -> list[dict]:
    """Per slice of ``folder``'s sets (slices without lung, at their stored pixel size, which is
    the working pixel): what the model labels there, in cm^2 (all of it is false positive)."""
    rows = []
    for part in ("check", "train"):
        path = folder / f"{part}.npz"
        if not path.is_file():
            continue
        ids = read_npz(path, only=("slice_ids",))["slice_ids"]  # closes the file; the slices come from read_dataset
        for s, sid in zip(read_dataset(path), ids):
            lab = predictor.predict_slices([s.hu], spacing=(s.pixel_mm,) * 2)[0]
            areas = region_areas_cm2(lab, s.pixel_mm, ("lung", "ggo", "consolidation"))
            rows.append({"slice": str(sid), "part": part, **{f"{r}_cm2": a for r, a in areas.items()}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--hu-dir", default=str(HU))
    ap.add_argument("--overlays", action="store_true", help="write one PNG per slice")
    ap.add_argument("--extraction-only", action="store_true",
                    help="only write the extraction overlays (to judge cleanliness before running the model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pixel-mm", type=float, default=None,
                    help="working pixel size of the network in mm (default: the model's own; 0 = native grid)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(CLEAN_FILE.read_text())["slices"] if CLEAN_FILE.exists() else {}
    kw = {} if args.pixel_mm is None else {"pixel_mm": args.pixel_mm or None}
    predictor = None if args.extraction_only else Predictor.from_checkpoint(args.model or default_model_path(),
                                                                             device=args.device, **kw)
    rows, volumes = [], []
    for name, ct_path, expert_path, for_target in cases(Path(args.hu_dir)):
        image = sitk.Cast(read_ct(ct_path), sitk.sitkFloat32)
        hu, _ = axial_view(sitk.GetArrayFromImage(image), image.GetDirection())
        ext, _ = axial_view(sitk.GetArrayFromImage(extract_lungs(image)), image.GetDirection())
        if predictor is not None:
            lab = predictor.predict(image)
            labels, _ = axial_view(sitk.GetArrayFromImage(lab), lab.GetDirection())
            field = np.isin(labels, REGIONS["lung"])
        expert = None
        if expert_path is not None:
            e = read_ct(expert_path)
            expert, _ = axial_view(sitk.GetArrayFromImage(e) > 0, e.GetDirection())
            if predictor is not None:  # the whole volume: lesion labels where the expert says no lung
                ml = float(np.prod(image.GetSpacing())) / 1000.0
                outside = {r: np.isin(labels, REGIONS[r]) & ~expert for r in ("ggo", "consolidation")}
                volumes.append({"volume": name, "lung_field_dice": dice(field, expert),
                                "expert_lung_ml": float(expert.sum()) * ml, "field_ml": float(field.sum()) * ml,
                                **{f"{r}_outside_expert_lung_ml": float(m.sum()) * ml for r, m in outside.items()},
                                "slices_with_consolidation_outside": int(outside["consolidation"].any(axis=(1, 2)).sum()),
                                "slices": int(hu.shape[0])})
        for z in range(hu.shape[0]):
            sname = name if hu.shape[0] == 1 else f"{name}[{z}]"
            x = ext[z].astype(bool)
            if not x.any() and (expert is None or not expert[z].any()):
                continue  # no lung in this slice by either reference
            row = {"slice": sname, "for_target": for_target, "extraction_px": int(x.sum())}
            if expert is not None:
                row["extraction_vs_expert"] = dice(x, expert[z])
                row["clean"] = row["extraction_vs_expert"] >= CIP_CLEAN_DICE
                row["why"] = f"extraction vs CIP lung mask Dice {'>=' if row['clean'] else '<'} {CIP_CLEAN_DICE}"
            else:
                verdict = clean.get(sname)
                row["clean"] = bool(verdict and verdict["clean"])
                row["why"] = verdict["why"] if verdict else "not judged"
            if predictor is not None:
                m = field[z]
                row["model_vs_extraction"] = dice(m, x)
                if expert is not None:
                    row["model_vs_expert"] = dice(m, expert[z])
            if args.overlays or args.extraction_only:
                write_png(out / "png" / (sname.replace("/", "_").replace("[", "_").replace("]", "") + ".png"),
                          hu[z], x, None if predictor is None else field[z])
            rows.append(row)
    outside = [] if predictor is None else outside_lungs(predictor)
    (out / "hu_lungs.json").write_text(json.dumps({
        "model": None if predictor is None else predictor.source,
        "pixel_mm": None if predictor is None else predictor.inference.pixel_mm, "rows": rows, "volumes": volumes,
        "outside_lungs": outside}, indent=1))
    if predictor is None:
        print(f"{len(rows)} extraction overlays in {out / 'png'}")
        return 0
    print(f"model {predictor.source}, working pixel {predictor.inference.pixel_mm or 'native'} mm\n")
    print("| slice | used for target | extraction clean | why | model vs extraction | model vs expert | extraction vs expert |")
    print("|---|---|---|---|---|---|---|")
    f = lambda r, k: "%.3f" % r[k] if k in r else ""
    for r in rows:
        print(f"| {r['slice']} | {'yes' if r['for_target'] else 'no'} | {'yes' if r['clean'] else 'no'} | {r['why']} "
              f"| {f(r, 'model_vs_extraction')} | {f(r, 'model_vs_expert')} | {f(r, 'extraction_vs_expert')} |")
    print()
    print("| set | slices | model vs extraction, mean Dice | min |")
    print("|---|---|---|---|")
    for label, sel in (("clean slices (target: >= 0.90)", [r for r in rows if r["for_target"] and r["clean"]]),
                       ("all target slices", [r for r in rows if r["for_target"]]),
                       ("ct-64, clean (information)", [r for r in rows if not r["for_target"] and r["clean"]])):
        d = [r["model_vs_extraction"] for r in sel]
        print(f"| {label} | {len(d)} | {np.mean(d):.3f} | {np.min(d):.3f} |" if d else f"| {label} | 0 | | |")
    print("\nWhole volumes with CIP's lung mask (COPD, no COVID-19): every GGO or consolidation voxel outside that\n"
          "mask is a false positive (ct-64 reaches from the upper abdomen to the neck)\n")
    print("| volume | slices | lung field vs CIP mask, Dice | CIP lung (mL) | lung field (mL) | GGO outside (mL) "
          "| consolidation outside (mL) | slices with consolidation outside |")
    print("|---|---|---|---|---|---|---|---|")
    for v in volumes:
        print(f"| {v['volume']} | {v['slices']} | {v['lung_field_dice']:.3f} | {v['expert_lung_ml']:.0f} | {v['field_ml']:.0f} "
              f"| {v['ggo_outside_expert_lung_ml']:.0f} | {v['consolidation_outside_expert_lung_ml']:.0f} "
              f"| {v['slices_with_consolidation_outside']} |")
    print("\nSlices without lung (abdomen/pelvis studies, COVID-19-NY-SBU; data/outside_lungs): everything labelled\n"
          "is false positive. check: never trained on; train: for training (see data/outside_lungs/README.md)\n")
    print("| slice | part | lung field (cm2) | GGO (cm2) | consolidation (cm2) |")
    print("|---|---|---|---|---|")
    for r in outside:
        print(f"| {r['slice']} | {r['part']} | {r['lung_cm2']:.1f} | {r['ggo_cm2']:.1f} | {r['consolidation_cm2']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
