"""Lung extraction, thesis §4.4.1 steps 1-4, made safe for whole CT slices.

The thesis (MATLAB) normalises with the HU of air and bone (-1000, 400), thresholds
at -170 HU, keeps the two largest blobs (``bwareafilt(bw, 2)``), fills holes
(``imfill(bw, 'holes')``) and multiplies the image by the mask. On a whole slice
that keeps the air around the patient, so this module adds (constants in LungConfig):

0. *Threshold* (``threshold_method``). "thesis": the fixed ``threshold_hu`` (-170 HU),
   for CT in Hounsfield units. "otsu": per slice, the window-normalised image is
   smoothed with a Gaussian of ``otsu_sigma_px`` pixels and thresholded at Otsu's
   level (the level that maximises the between-class variance of its
   ``otsu_bins``-bin histogram). This is for images whose grey values are not
   calibrated HU, like the 8-bit, per-slice min-max normalised, CLAHE-enhanced
   COVID-19-CT-Seg slices mapped to approx. HU (EightBitConfig): where their soft
   tissue lands moves from slice to slice (Otsu's level on zenodo20_dev runs from
   -748 to -388 approx. HU, median -530), so no fixed level separates lung from
   tissue on all of them, while the air/tissue histogram stays bimodal. The smoothing
   removes the pixel noise (strong in the Radiopaedia slices) that otherwise speckles
   the lungs and joins dark fat to them. Sigma 1 px was chosen on groups 0-4 of
   zenodo20_dev only (mean Dice 0.913 / 0.929 / 0.933 / 0.933 / 0.931 / 0.928 / 0.920
   for 0 / 0.5 / 0.75 / 1 / 1.25 / 1.5 / 2 px); groups 5-8 were held out
   (experiments/weak_supervision/JOURNAL.md, "Lung extraction: Otsu's threshold for 8-bit
   slices"). "auto" (the default) is "thesis" here: these functions
   take CT in HU; readers of 8-bit slices (``weak.lung_config_for``) resolve
   "auto" to "otsu".

1. *Inside the body only.* The body is the largest connected tissue component
   (>= threshold) with its holes filled; only air inside it can be lung. Air around
   the patient, in or under the table and outside the scan field (-3024 HU) never is.
   Air that touches the image border is never inside the body (a hole never touches
   the border), so it is never lung, whatever its size.
2. *Which blobs are lungs.* Blobs under ``min_component_mm2`` are noise. A blob
   smaller than ``airway_max_mm2`` centred within ``airway_band_fraction`` of the
   body's width from its midline is trachea, a main bronchus or the oesophagus. Of
   the rest the largest is kept, and every other blob with at least
   ``min_second_fraction`` of its area (``min_extra_fraction`` beyond the
   ``n_components`` largest). So one blob is kept when the lungs touch or only one
   is in the slice, and more than two when consolidation or a fissure splits a lung
   (seen in the COVID-19 slices; ``bwareafilt(bw, 2)`` would drop a lobe).
3. *Touching lungs.* Two lungs joined in front of and behind the mediastinum enclose
   it, and ``imfill`` would make the heart lung. A blob is eroded until it falls
   apart into two comparable cores (junctions up to ``max_junction_mm``) and each
   pixel goes to the nearer core.
4. *Filling, per side.* The pieces on each side of the body's midline are closed
   with a disk of ``closing_radius_mm`` (consolidation at the pleura makes a dent,
   not a hole, so ``imfill`` alone cannot fill it), then their holes are filled.
   Per side, so that the lungs are not bridged across the mediastinum.
5. *Volumes.* 3D blobs under ``min_volume_fraction`` of the largest are dropped:
   bowel and stomach gas below the diaphragm, the trachea above the lungs.

Limits: dense consolidation that replaces the lung out to the chest wall (dependent
consolidation with no aerated lung behind it) is not included; a tight crop that
cuts through the lungs loses them (they are no longer inside the body); at low
resolution the trachea can touch a lung and stay. On 8-bit slices (no 3D step) bowel
and stomach gas at the lung bases, and dark fat along the back of noisy slices, can
pass for lung. Everything is 2D per axial slice, as in the thesis, in radiological
display orientation (``orientation.axial_view``).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import THRESHOLD_METHODS, LungConfig, ThresholdMethod  # noqa: F401  (THRESHOLD_METHODS: re-exported)
from .errors import InputError
from .orientation import axial_spacing, axial_view
from .preprocessing import check_ct_hu

log = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)  # MATLAB's default connectivity for bwareafilt
_TWENTY_SIX = np.ones((3, 3, 3), dtype=bool)

Spacing = tuple[float, float]


def normalise_window(hu: np.ndarray, cfg: LungConfig = LungConfig()) -> np.ndarray:
    """Thesis step 1: map [window_low, window_high] HU (air..bone) linearly to [0, 1], clipped."""
    x = (np.asarray(hu, dtype=np.float32) - np.float32(cfg.window_low)) / np.float32(cfg.window_high - cfg.window_low)
    return np.clip(x, 0.0, 1.0)


def otsu_level(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values on [0, 1]: ``values < level`` is the lower class.

    The level is the upper edge of the histogram bin (``bins`` equal bins on [0, 1])
    that ends the lower class maximising the between-class variance (first maximum on
    ties), so ``values < level`` splits exactly as the histogram does. Values that are
    all in one bin give the upper edge of that bin (every value in the lower class).
    """
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    between[~np.isfinite(between)] = -1.0
    if between.max() <= 0:  # one occupied bin: no split
        return float(edges[int(np.flatnonzero(hist)[-1]) + 1]) if hist.any() else 1.0
    return float(edges[int(np.argmax(between)) + 1])


def threshold_level(hu: np.ndarray, cfg: LungConfig = LungConfig()) -> tuple[np.ndarray, float]:
    """The image the threshold is applied to (window-normalised, [0, 1]) and the level.

    "thesis"/"auto": ``threshold_hu`` on the normalised scale. "otsu": the normalised
    slice smoothed with a Gaussian of ``otsu_sigma_px`` pixels, and its Otsu level.
    """
    x = normalise_window(hu, cfg)
    if cfg.threshold_method != ThresholdMethod.OTSU:
        return x, float(np.float32((cfg.threshold_hu - cfg.window_low) / (cfg.window_high - cfg.window_low)))
    if cfg.otsu_sigma_px > 0:
        x = ndimage.gaussian_filter(x, cfg.otsu_sigma_px)
    return x, otsu_level(x, cfg.otsu_bins)


def air_mask(hu: np.ndarray, cfg: LungConfig = LungConfig()) -> np.ndarray:
    """Thesis step 1: pixels below the threshold (``threshold_level``), on the normalised scale."""
    x, level = threshold_level(hu, cfg)
    if cfg.threshold_method == ThresholdMethod.OTSU:
        return x.astype(np.float64) < level  # exactly as the histogram split
    return x < np.float32(level)


def level_hu(hu: np.ndarray, cfg: LungConfig = LungConfig()) -> float:
    """The threshold ``air_mask`` uses on this slice, in (approx.) HU."""
    return cfg.window_low + threshold_level(hu, cfg)[1] * (cfg.window_high - cfg.window_low)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes(mask)`` (imfill 'holes'), the same pixels, about three times
    faster on a 512x512 slice: the background is labelled once (face-connected, as
    ``binary_fill_holes`` propagates it) and what does not touch the array's border is a hole."""
    mask = np.asarray(mask, dtype=bool)
    background, n = ndimage.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            outside[np.take(background, end, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[background]


def body_mask(air: np.ndarray) -> np.ndarray:
    """The largest connected non-air component with its holes filled (the patient's body)."""
    labels, n = ndimage.label(~air, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(air)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return fill_holes(labels == int(np.argmax(sizes)))


def apply_mask(hu: np.ndarray, mask: np.ndarray, cfg: LungConfig = LungConfig()) -> np.ndarray:
    """Thesis step 4: keep the lung pixels; everything else becomes ``window_low`` (air).

    Returns float32 of ``hu``'s shape (a slice or a volume).
    """
    hu = np.asarray(hu, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if hu.shape != mask.shape:
        raise InputError(f"image {hu.shape} and lung mask {mask.shape} differ in shape")
    return np.where(mask, hu, np.float32(cfg.window_low))


def assumed_spacing(shape: tuple[int, ...], cfg: LungConfig = LungConfig()) -> Spacing:
    """(row, col) pixel size in mm of a slice of ``shape`` (H, W) whose spacing is unknown:
    ``cfg.assumed_fov_mm`` across its larger side."""
    return (cfg.assumed_fov_mm / max(shape),) * 2


def disk_closing(mask: np.ndarray, radius_px: tuple[float, float]) -> np.ndarray:
    """Binary closing of a 2D mask with a disk of ``radius_px`` (row, col) pixels: a round
    disk in mm also for anisotropic pixels (distances in units of the radius)."""
    pad = int(np.ceil(max(radius_px))) + 1
    unit = (1.0 / radius_px[0], 1.0 / radius_px[1])
    dilated = ndimage.distance_transform_edt(~np.pad(mask, pad), sampling=unit) <= 1.0
    return mask | (ndimage.distance_transform_edt(dilated, sampling=unit) > 1.0)[pad:-pad, pad:-pad]


def extract_lungs_slice(
    hu: np.ndarray,
    cfg: LungConfig = LungConfig(),
    *,
    spacing: Optional[Spacing] = None,
    require: bool = False,
) -> np.ndarray:
    """Lung mask of one axial CT slice (thesis §4.4.1 steps 1-3; module docstring).

    Args:
        hu: (H, W) CT slice in HU, rows anterior→posterior, columns right→left
            (or an 8-bit slice mapped to approx. HU, with ``threshold_method="otsu"``).
        cfg: lung extraction constants (``threshold_method``: module docstring, point 0).
        spacing: (row, col) pixel size in mm; None assumes ``cfg.assumed_fov_mm`` across.
        require: raise InputError when no lung is found (otherwise return an empty mask).

    Returns:
        (H, W) bool mask: both lungs with holes and border lesions filled; no outside
        air, table, trachea or main bronchi.
    """
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise InputError(f"a CT slice must be 2D (H, W); got an array of shape {hu.shape}")
    _check_hu(hu, cfg, "CT slice")
    if spacing is None:
        spacing = assumed_spacing(hu.shape, cfg)
    mask = _lungs_of_slice(hu.astype(np.float32, copy=False), cfg, (float(spacing[0]), float(spacing[1])))
    if require and not mask.any():
        raise InputError("no lung found in this CT slice: no air region inside the body large enough "
                         f"(>= {cfg.min_component_mm2:g} mm²) and away from the airway")
    return mask


def extract_lungs(image: sitk.Image, cfg: LungConfig = LungConfig()) -> sitk.Image:
    """Lung mask of a CT volume in HU, per axial slice of the patient.

    Args:
        image: 3D scalar CT in HU, any direction matrix.
        cfg: lung extraction constants.

    Returns:
        uint8 image (1 = lung) with the input's size, spacing, origin and direction.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"CT image has {image.GetNumberOfComponentsPerPixel()} components per pixel; a CT has one")
    if image.GetDimension() != 3:
        raise InputError(f"CT image is {image.GetDimension()}D; lung extraction needs a 3D volume")
    array = sitk.GetArrayViewFromImage(image)
    _check_hu(array, cfg, "CT image")
    view, inverse = axial_view(array, image.GetDirection())
    spacing = axial_spacing(image.GetSpacing(), image.GetDirection())
    out = np.zeros(view.shape, dtype=np.uint8)
    for z in range(view.shape[0]):
        out[z] = _lungs_of_slice(np.asarray(view[z], dtype=np.float32), cfg, spacing)
    out = _drop_small_volumes(out, cfg)
    log.info("lungs found in %d of %d axial slices", int(out.any(axis=(1, 2)).sum()), view.shape[0])
    mask = sitk.GetImageFromArray(np.ascontiguousarray(inverse(out)))
    mask.CopyInformation(image)
    return mask


def _check_hu(array: np.ndarray, cfg: LungConfig, what: str) -> None:
    check_ct_hu(array, what)  # empty, NaN, 8-bit picture, MR, all air
    lo = float(np.min(array))
    if lo >= cfg.min_air_hu:
        raise InputError(f"{what} has no air (lowest value {lo:g}, expected some below {cfg.min_air_hu:g} HU): "
                         "is it CT in Hounsfield units?")


def _midline(body: np.ndarray) -> tuple[float, float]:
    """Column of the body's left-right centre, and the body's width in columns."""
    cols = np.flatnonzero(body.any(axis=0))
    if cols.size == 0:
        return body.shape[1] / 2.0, float(body.shape[1])
    return (cols[0] + cols[-1]) / 2.0, float(cols[-1] - cols[0] + 1)


def _lungs_of_slice(hu: np.ndarray, cfg: LungConfig, spacing: Spacing) -> np.ndarray:
    air = air_mask(hu, cfg)
    body = body_mask(air)
    labels, n = ndimage.label(air & body, structure=_EIGHT)
    mid, width = _midline(body)
    sides = np.zeros((2,) + hu.shape, dtype=bool)  # patient's right, left
    for lid in _select_lungs(labels, n, mid, width, spacing, cfg):
        for part in _split_touching(labels == lid, spacing, cfg):
            sides[int(np.flatnonzero(part.any(axis=0)).mean() >= mid)] |= part
    out = np.zeros(hu.shape, dtype=bool)
    for side in sides:
        if side.any():
            out |= _close_and_fill(side, spacing, cfg)
    return out


def _select_lungs(labels: np.ndarray, n: int, mid: float, width: float, spacing: Spacing,
                  cfg: LungConfig) -> list[int]:
    """Label ids of the blobs that are lung (module docstring, point 2)."""
    if n == 0:
        return []
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    areas = counts * (spacing[0] * spacing[1])
    col_sums = np.bincount(flat, weights=np.tile(np.arange(labels.shape[1], dtype=float), labels.shape[0]),
                           minlength=n + 1)[1:]
    airway = (areas < cfg.airway_max_mm2) & (np.abs(col_sums / counts - mid) < cfg.airway_band_fraction * width)
    candidates = np.flatnonzero((areas >= cfg.min_component_mm2) & ~airway)
    if candidates.size == 0:
        return []
    candidates = candidates[np.argsort(-areas[candidates], kind="stable")]
    largest = areas[candidates[0]]
    keep = [int(candidates[0]) + 1]
    for rank, c in enumerate(candidates[1:], start=1):
        fraction = cfg.min_second_fraction if rank < cfg.n_components else cfg.min_extra_fraction
        if areas[c] >= fraction * largest:
            keep.append(int(c) + 1)
    return keep


def _split_touching(blob: np.ndarray, spacing: Spacing, cfg: LungConfig) -> list[np.ndarray]:
    """Split a blob at its narrowest junction (at most ``max_junction_mm`` thick) into two.

    A single lung with a narrow neck may be split too; that changes only how it is
    filled, not which pixels it has.
    """
    (r0, r1), (c0, c1) = _bbox(blob)
    crop = np.pad(blob[r0:r1, c0:c1], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=spacing)
    step = min(spacing)
    for radius in np.arange(step, cfg.max_junction_mm / 2.0 + 1e-6, step):
        cores, k = ndimage.label(dist > radius, structure=_EIGHT)
        if k == 0:
            break
        if k == 1:
            continue
        sizes = np.bincount(cores.ravel())[1:]
        a, b = np.argsort(-sizes, kind="stable")[:2]
        if sizes[b] < cfg.min_second_fraction * sizes[a]:
            continue
        seeds = np.where(cores == a + 1, 1, np.where(cores == b + 1, 2, 0))
        _, (ri, ci) = ndimage.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
        nearest = seeds[ri, ci][1:-1, 1:-1]
        parts = []
        for s in (1, 2):
            part = np.zeros_like(blob)
            part[r0:r1, c0:c1] = blob[r0:r1, c0:c1] & (nearest == s)
            parts.append(part)
        return parts
    return [blob]


def _bbox(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


def _close_and_fill(lung: np.ndarray, spacing: Spacing, cfg: LungConfig) -> np.ndarray:
    """Close with a disk (lesions at the border), then fill holes (imfill 'holes').

    Both stay within the bounding box (a closing never leaves the convex hull).
    """
    (r0, r1), (c0, c1) = _bbox(lung)
    crop = lung[r0:r1, c0:c1]
    radius_px = (cfg.closing_radius_mm / spacing[0], cfg.closing_radius_mm / spacing[1])
    if min(radius_px) >= 1:
        crop = disk_closing(crop, radius_px)
    out = np.zeros_like(lung)
    out[r0:r1, c0:c1] = fill_holes(crop)
    return out


def _drop_small_volumes(mask: np.ndarray, cfg: LungConfig) -> np.ndarray:
    """Remove 3D blobs under ``min_volume_fraction`` of the largest (bowel gas, trachea)."""
    labels, n = ndimage.label(mask, structure=_TWENTY_SIX)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= cfg.min_volume_fraction * sizes.max()) + 1
    return np.isin(labels, keep).astype(mask.dtype)
