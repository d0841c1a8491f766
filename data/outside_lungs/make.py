"""Build the slices-without-lung sets (issue 21) from COVID-19-NY-SBU DICOM slices.

    .venv/bin/python data/outside_lungs/make.py DICOM_FOLDER data/outside_lungs

DICOM_FOLDER holds the six axial slices of abdomen/pelvis studies named in SLICES (from github
SaltyJoke/Image-Registration, ``data-sample/<patient>/axial/<name>.dcm``, copied flat as
``<patient>_axial_<name>.dcm``). Each slice is resampled to the 1.2 mm working pixel (Gaussian
anti-aliasing, linear), clipped to [-1024, 3071] HU, padded with air to one size and stored as int16 ``ct_hu`` with empty
lung and infection masks: every pixel is certainly background. ``train.npz`` (patients A027284,
A062055) is for training, ``check.npz`` (A058062) is never trained on.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

PIXEL_MM = 1.2
SLICES = {
    "train": [("A027284", "19000925-116"), ("A027284", "19001231-131"),
              ("A062055", "19001127-136"), ("A062055", "19001228-131")],
    "check": [("A058062", "19001231-084"), ("A058062", "19010108-078")],
}


def load(path: Path) -> np.ndarray:
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    sp, size = img.GetSpacing(), img.GetSize()
    smooth = sitk.SmoothingRecursiveGaussian(img[:, :, 0], [0.4 * PIXEL_MM] * 2)
    new = [int(round(size[0] * sp[0] / PIXEL_MM)), int(round(size[1] * sp[1] / PIXEL_MM))]
    out = sitk.Resample(smooth, new, sitk.Transform(), sitk.sitkLinear, smooth.GetOrigin(), [PIXEL_MM] * 2,
                        smooth.GetDirection(), -1024.0, sitk.sitkFloat32)
    return np.clip(np.rint(sitk.GetArrayFromImage(out)), -1024, 3071).astype(np.int16)


def main(src: str, dst: str) -> int:
    for part, items in SLICES.items():
        cts = [load(Path(src) / f"{p}_axial_{n}.dcm") for p, n in items]
        side = max(max(c.shape) for c in cts)  # one size for the stack: pad with air, centred
        cts = [np.pad(c, [((side - k) // 2, side - k - (side - k) // 2) for k in c.shape], constant_values=-1024)
               for c in cts]
        patients = sorted({p for p, _ in items})
        np.savez_compressed(
            Path(dst) / f"{part}.npz", ct_hu=np.stack(cts), lung_mask=np.zeros((len(cts), *cts[0].shape), np.uint8),
            infection_mask=np.zeros((len(cts), *cts[0].shape), np.uint8),
            group=np.array([patients.index(p) for p, _ in items]), source_index=np.arange(len(cts)),
            pixel_mm=np.float64(PIXEL_MM), source=np.str_("outside"),
            slice_ids=np.array([f"{p}/{n}" for p, n in items]))
        print(part, [c.shape for c in cts])
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
