"""Thesis §4.2 preprocessing, the 8-bit→HU rule, the working pixel grid, and checks that
an image is CT in HU."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from .config import EightBitConfig, PreprocessConfig
from .errors import InputError

log = logging.getLogger(__name__)


def normalize(hu: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Clip HU to [hu_min, hu_max] and z-score with the model's fixed constants.

    Returns float32 of the same shape.
    """
    x = np.clip(np.asarray(hu, dtype=np.float32), cfg.hu_min, cfg.hu_max)
    return (x - np.float32(cfg.mean)) / np.float32(cfg.std)


WORKING_SIDE = (16, 2048)  # working grids outside this (px a side) are not used

# Geometry of CT this library accepts (check_ct_geometry); anything else is refused with one line.
# Voxel sizes in mm: clinical chest CT has 0.3-1 mm pixels and 0.5-10 mm slices; the ranges leave a
# wide margin (downsampled volumes such as CIP's ct-64 at 4.2 mm pass) and still refuse headers in
# cm or m, zero or absurd spacings, whose volumes in mL would be wrong by orders of magnitude.
CT_PIXEL_MM = (0.1, 10.0)  # in-plane pixel size of the axial slices (rows and columns)
CT_SLICE_MM = (0.1, 30.0)  # spacing of the axial slices
MIN_SLICE_PX = 16  # rows and columns of an axial slice at least (WORKING_SIDE[0]); fewer: not 2D slices
# Largest |cosine| between two index axes of the direction matrix. ITK writes label maps (NIfTI) with
# an orthogonal matrix and warns above about this much shear; within it the label map's voxels lie
# within 0.0001 x the CT's extent (0.05 mm over 500 mm) of the CT's.
DIRECTION_TOLERANCE = 1e-4


def working_size(shape: Sequence[int], spacing: Optional[Sequence[float]],
                 pixel_mm: Optional[float]) -> Optional[tuple[int, int]]:
    """(rows, cols) of slices of ``shape`` (..., H, W) and pixel ``spacing`` (row, col) mm
    resampled to ``pixel_mm`` pixels (``InferenceConfig.pixel_mm``), or None to keep their
    own grid: no spacing, no ``pixel_mm``, or a grid within 5 % of it."""
    if spacing is None or not pixel_mm:
        return None
    hw = tuple(int(n) for n in shape[-2:])
    size = tuple(max(1, round(n * float(s) / pixel_mm)) for n, s in zip(hw, spacing))
    if all(abs(m / n - 1.0) <= 0.05 for m, n in zip(size, hw)):
        return None
    if not all(WORKING_SIDE[0] <= m <= WORKING_SIDE[1] for m in size):
        # A spacing no chest CT has (a header in cm, a thumbnail): keep the own grid.
        log.warning("pixel spacing %s mm would make a %s grid at %g mm; running on the image's own grid instead",
                    tuple(float(x) for x in spacing), size, pixel_mm)
        return None
    return size  # type: ignore[return-value]


def eight_bit_to_hu(values: np.ndarray, cfg: EightBitConfig = EightBitConfig()) -> np.ndarray:
    """Map 8-bit lung-window grey values (0..255) to approximate HU, linearly.

    Grey 0 → ``cfg.low`` (air, -1000 HU), 255 → ``cfg.high``. See EightBitConfig.
    """
    v = np.asarray(values, dtype=np.float32)
    return cfg.low + v / np.float32(255.0) * np.float32(cfg.high - cfg.low)


def check_ct_hu(array: np.ndarray, what: str = "image") -> None:
    """Raise InputError unless ``array`` looks like CT in Hounsfield units.

    CT in HU contains air or lung (values well below -500 HU). An 8-bit picture
    (values within 0..255), an MR image (no negative values) or a normalised image
    (values within a few units of 0) has none.
    """
    if array.size == 0:
        raise InputError(f"{what} is empty (no voxels)")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n = int((~np.isfinite(array)).sum())
        raise InputError(f"{what} contains {n} NaN or infinite voxel(s); CT in HU must be finite")
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0 and hi <= 255:
        raise InputError(
            f"{what} has values in [{lo:g}, {hi:g}]: it looks like an 8-bit picture, not CT in "
            "Hounsfield units (air is -1000 HU)"
        )
    if lo >= -200:
        raise InputError(
            f"{what} has no values below {lo:g}: CT in Hounsfield units has air and lung near "
            "-1000 HU; is this an MR or a normalised image?"
        )
    if np.percentile(array if array.size < 4_000_000 else array.ravel()[:: array.size // 4_000_000 + 1], 99) < -500:
        raise InputError(f"{what} is almost all air (99th percentile below -500 HU): no body in view")


def check_ct_geometry(size: Sequence[int], spacing: Sequence[float], direction: Sequence[float],
                      what: str = "image", slices: bool = True) -> None:
    """Raise InputError unless a 3D image of ``size``, ``spacing`` and ``direction`` (SimpleITK's
    GetSize, GetSpacing, GetDirection) has the geometry of CT this library segments:

    an orthogonal direction matrix (DIRECTION_TOLERANCE: a sheared grid cannot be given a label map
    that overlays it), voxel sizes within CT_PIXEL_MM in-plane and CT_SLICE_MM between slices, and
    (``slices``) axial slices of at least MIN_SLICE_PX pixels a side (a single row, or a coronal or
    sagittal slice, is not a stack of axial slices).
    """
    from .orientation import axial_shape, axial_slice_spacing, axial_spacing

    d = np.asarray(direction, dtype=float).reshape(3, 3)
    d = d / np.linalg.norm(d, axis=0, keepdims=True)
    cosines = np.abs(d.T @ d - np.eye(3))
    if not np.all(np.isfinite(cosines)) or cosines.max() > DIRECTION_TOLERANCE:
        a, b = np.unravel_index(int(np.nanargmax(np.nan_to_num(cosines, nan=np.inf))), cosines.shape)
        angle = float(np.degrees(np.arccos(np.clip((d.T @ d)[a, b], -1.0, 1.0))))
        raise InputError(f"{what} has a sheared (non-orthogonal) voxel grid: its axes {'ijk'[a]} and {'ijk'[b]} meet "
                         f"at {angle:.4g} degrees, not 90; a label map could not overlay it: resample the CT onto an "
                         "orthogonal grid first (e.g. Slicer's Resample Scalar Volume)")
    rows, cols = axial_spacing(spacing, direction)
    slice_mm = axial_slice_spacing(spacing, direction)
    sizes = axial_shape(size, direction)
    lo, hi = CT_PIXEL_MM
    if not (lo <= rows <= hi and lo <= cols <= hi):
        raise InputError(f"{what} has {rows:g} x {cols:g} mm pixels, outside the {lo:g}-{hi:g} mm of CT: its spacing "
                         "is wrong (or not in mm) and volumes would be wrong; fix the spacing in its header")
    lo, hi = CT_SLICE_MM
    if not lo <= slice_mm <= hi:
        raise InputError(f"{what} has axial slices {slice_mm:g} mm apart, outside the {lo:g}-{hi:g} mm of CT: its "
                         "spacing is wrong (or not in mm) and volumes would be wrong; fix the spacing in its header")
    if slices and min(sizes[1:]) < MIN_SLICE_PX:
        raise InputError(f"{what} has axial slices of {sizes[1]} x {sizes[2]} pixels (size "
                         f"{' x '.join(str(int(n)) for n in size)}): not a stack of 2D axial CT slices; give a CT "
                         f"volume whose axial slices are at least {MIN_SLICE_PX} x {MIN_SLICE_PX} pixels")
