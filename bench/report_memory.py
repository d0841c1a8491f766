"""Peak memory and time of the segment report (report.compute_report) on a 512x512x300 label volume.

The volume tiles a real label map -- the bundled model's segmentation of the bundled CT slice
(DRSegUNetLib/data/ny_sbu_A002304_135.dcm, 512x512) -- 300 times along z. Each variant runs in a
fresh process that first builds the volume (the baseline, as a segment run holds it), then computes
the report; the peak is the process's VmHWM after resetting it (Linux clear_refs; ru_maxrss elsewhere),
and tracemalloc's peak of numpy's allocations in a second fresh process. "before" is compute_report as it was until issue "What a new
user and bad input still hit" item 12 (np.isin over the whole volume per region, ndimage.label into
int32, ndimage.sum_labels/center_of_mass on the whole field), kept here verbatim; "after" is
DRSegUNetLib.report.compute_report. Both reports must be identical.

    .venv/bin/python bench/report_memory.py [--slices 300] [--labels LABELS.nii.gz] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compute_report_before(labels):
    """DRSegUNetLib.report.compute_report before the change (commit d803814), verbatim but for names."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from DRSegUNetLib.orientation import axial_view
    from DRSegUNetLib.report import MIN_LUNG_FRACTION
    from DRSegUNetLib.vocabulary import REGIONS

    def _stats(labels, voxel_ml):
        vol = {r: float(np.isin(labels, v).sum() * voxel_ml) for r, v in REGIONS.items()}
        lung = vol["lung"]
        pct = {r: (100.0 * vol[r] / lung if lung > 0 else None) for r in ("ggo", "consolidation", "infection")}
        return {
            "volume_ml": {r: round(v, 3) for r, v in vol.items()},
            "percent_of_lung": {r: (round(p, 2) if p is not None else None) for r, p in pct.items()},
        }

    arr = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    rep = {"voxel_ml": voxel_ml, "shape_zyx": list(arr.shape), **_stats(arr, voxel_ml)}
    view, _ = axial_view(np.asarray(arr), labels.GetDirection())
    field = np.isin(view, REGIONS["lung"])
    comp, n = ndimage.label(field)
    rep["per_lung"] = None
    if n < 2:
        rep["per_lung_note"] = "lung field does not separate into two lungs" if n else "no lung found"
        return rep
    sizes = ndimage.sum_labels(field, comp, index=np.arange(1, n + 1))
    order = np.argsort(-sizes)[:2]
    if sizes[order[1]] < MIN_LUNG_FRACTION * field.sum():
        rep["per_lung_note"] = "second lung component too small to report separately"
        return rep
    centres = ndimage.center_of_mass(field, comp, [int(o) + 1 for o in order])
    a, b = (int(o) + 1 for o in order)
    right, left = (a, b) if centres[0][2] < centres[1][2] else (b, a)
    rep["per_lung"] = {}
    for side, c in (("right", right), ("left", left)):
        sel = np.where(comp == c, view, 0)
        rep["per_lung"][side] = _stats(sel, voxel_ml)
    rep["per_lung_note"] = "two largest lung-field components; smaller pieces are in the totals only"
    return rep


def real_label_slice(labels_path: str | None, threads: int):
    """(labels (H, W) uint8, spacing (x, y) mm) of a real segmentation."""
    import numpy as np
    import SimpleITK as sitk

    if labels_path:
        image = sitk.ReadImage(labels_path)
    else:
        import torch

        from DRSegUNetLib import default_model_path, sample_ct_path
        from DRSegUNetLib.imageio import read_ct
        from DRSegUNetLib.inference import Predictor

        torch.set_num_threads(threads)
        image = Predictor.from_checkpoint(default_model_path(), "cpu").predict(read_ct(sample_ct_path()))
    arr = sitk.GetArrayFromImage(image)
    z = int(np.argmax(np.isin(arr, (1, 2, 3)).sum(axis=(1, 2))))
    return arr[z].astype(np.uint8), image.GetSpacing()[:2]


def _status_gb(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in GB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(variant: str, slice_npy: str, spacing: list[float], n_slices: int, traced: bool) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from DRSegUNetLib.report import compute_report

    one = np.load(slice_npy)
    volume = sitk.GetImageFromArray(np.broadcast_to(one, (n_slices, *one.shape)).copy())
    volume.SetSpacing((*spacing, 1.0))
    run = compute_report_before if variant == "before" else compute_report
    if traced:  # numpy's allocations are traced: the largest amount held at once during the report
        import tracemalloc

        tracemalloc.start()
        rep = run(volume)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {"variant": variant, "traced_peak_gb": peak / 2**30, "report": rep}
    import resource  # Unix only; here, so that Testing/test_report.py can load compute_report_before anywhere

    reset = _reset_peak()
    base = _status_gb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    rep = run(volume)
    seconds = time.perf_counter() - t0
    peak = (_status_gb("VmHWM") if reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": variant, "baseline_gb": base, "peak_gb": peak, "added_gb": peak - base, "seconds": seconds,
            "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss", "report": rep}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300, help="slices of the tiled volume (default 300)")
    p.add_argument("--labels", default=None, help="a real label map to tile (its most involved slice; default: "
                                                  "segment the bundled CT slice with the bundled model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for that segmentation (default 1)")
    p.add_argument("--variants", default="before,after", help="comma list of before, after (default before,after)")
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "SLICE_NPY", "SPACING", "TRACED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        variant, npy, spacing, traced = args.child
        print(json.dumps(child(variant, npy, json.loads(spacing), args.slices, traced == "1")))
        return 0
    import numpy as np

    one, spacing = real_label_slice(args.labels, args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npy = os.path.join(tmp, "slice.npy")
        np.save(npy, one)
        for variant in args.variants.split(","):
            runs = []
            for traced in ("0", "1"):  # a fresh process each: tracemalloc's bookkeeping stays out of the RSS
                r = subprocess.run([sys.executable, __file__, "--slices", str(args.slices), "--child", variant, npy,
                                    json.dumps(list(spacing)), traced], capture_output=True, text=True, check=True)
                runs.append(json.loads(r.stdout.splitlines()[-1]))
            rows.append({**runs[1], **runs[0]})
    shape = f"{one.shape[1]}x{one.shape[0]}x{args.slices}"
    print(f"compute_report on a {shape} uint8 label volume ({one.shape[0] * one.shape[1] * args.slices / 1e6:.1f} M "
          f"voxels), a real segmentation tiled; each variant in fresh processes (peak RSS: {rows[0]['peak_source']}; "
          f"traced: tracemalloc's peak of numpy's allocations during the report)\n")
    print("| variant | RSS before the report (GB) | peak RSS (GB) | added by the report (GB) | traced peak (GB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['baseline_gb']:.2f} | {r['peak_gb']:.2f} | {r['added_gb']:.2f} | "
              f"{r['traced_peak_gb']:.2f} | {r['seconds']:.1f} |")
    if len(rows) > 1:
        same = all(r["report"] == rows[0]["report"] for r in rows[1:])
        print(f"\nreports identical: {same}")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
