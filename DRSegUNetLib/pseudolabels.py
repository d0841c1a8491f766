"""Pseudo labels, thesis §4.4.1 steps 5-6: k-means inside the lung, then morphology.

Step 5 clusters the lung-extracted image with k-means (K=3) into "background, lungs
and ground-glass opacities". By default (``PseudoLabelConfig.cluster_domain = "image"``)
that is what runs: step 4 applied the lung mask to the image, so every pixel outside the
lung is air (the window's -1000 HU), and k-means sees the whole slice. One centre then
sits at the masked background (with the most aerated lung), and the rest of the lung is
split in two. ``cluster_domain = "lung"`` clusters the lung pixels only into three, so
the brightest cluster is the top third of the lung's intensities, mostly vessels: against
expert masks its infection Dice is lower (docs/weak_supervision.md). HU are clipped to the
thesis's air..bone window. Clusters are ranked by centre, darkest first, and mapped to
our vocabulary:

- outside the lung mask → BACKGROUND (0);
- the brightest cluster (rank k-1) → ground-glass opacity candidates, cleaned up as
  below and kept where they fall in the lung → GGO (1);
- every other lung pixel → LUNG (3). The darkest cluster is the thesis's
  "background": inside the lung mask it is the most aerated lung (and airways), which
  our vocabulary calls lung, not background (background means "not lung").

k-means never produces consolidation (2). With K=3 the brightest cluster also
catches vessels in healthy lungs; the opening with a line removes thin ones.

Step 6, on the GGO mask: ``imerode`` then ``imdilate`` with ``strel('line', 8, 50)``,
then ``imclose`` with ``strel('disk', 6)``. The structuring elements reproduce
MATLAB's: :func:`line_strel` its line (symmetric about the centre, drawn with
MATLAB's ``intline``) and :func:`disk_strel` its default disk, which is *not* the
Euclidean disk: with N=4 MATLAB builds it from periodic lines, an octagon of
half-width 5 for radius 6 (``disk_approximation=0`` gives the exact disk). Pixels
outside the image count as foreground for erosion and background for dilation, as
in MATLAB. Sizes are in pixels, as in the thesis (MosMed, 512x512).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .config import ClusterDomain, LungConfig, PseudoLabelConfig
from .errors import InputError
from .imageio import mask_on_grid
from .lungs import extract_lungs
from .orientation import axial_view
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .vocabulary import BACKGROUND, GGO, LUNG

log = logging.getLogger(__name__)


def _matlab_round(x: float) -> int:
    """MATLAB's round: halves away from zero (numpy rounds them to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _intline(x1: int, x2: int, y1: int, y2: int) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's ``intline``: integer points of the segment (x1, y1)-(x2, y2)."""
    dx, dy = abs(x2 - x1), abs(y2 - y1)
    if dx == 0 and dy == 0:
        return np.array([x1]), np.array([y1])
    if dx >= dy:
        if x1 > x2:
            x1, x2, y1, y2 = x2, x1, y2, y1
        x = np.arange(x1, x2 + 1)
        y = np.array([_matlab_round(y1 + (y2 - y1) / (x2 - x1) * (v - x1)) for v in x])
    else:
        if y1 > y2:
            x1, x2, y1, y2 = x2, x1, y2, y1
        y = np.arange(y1, y2 + 1)
        x = np.array([_matlab_round(x1 + (x2 - x1) / (y2 - y1) * (v - y1)) for v in y])
    return x, y


def line_strel(length: float, angle_deg: float) -> np.ndarray:
    """MATLAB ``strel('line', length, angle_deg).Neighborhood`` as a bool array.

    The line is symmetric about the centre pixel; the angle is counter-clockwise from
    the column axis with rows pointing down, as in MATLAB. For an even ``length`` the
    half-length (length-1)/2 is rounded per axis, so ``line_strel(8, 0)`` has 9 pixels.
    """
    if length < 1:
        return np.ones((1, 1), dtype=bool)
    theta = math.radians(angle_deg)
    x = _matlab_round((length - 1) / 2 * math.cos(theta))
    y = -_matlab_round((length - 1) / 2 * math.sin(theta))
    c, r = _intline(-x, x, -y, y)
    rmax, cmax = int(np.abs(r).max()), int(np.abs(c).max())
    out = np.zeros((2 * rmax + 1, 2 * cmax + 1), dtype=bool)
    out[r + rmax, c + cmax] = True
    return out


def _periodic_line(p: int, v: tuple[int, int]) -> np.ndarray:
    """MATLAB ``strel('periodicline', p, v)``: 2p+1 points at offsets k*v, k = -p..p."""
    k = np.arange(-p, p + 1)
    r, c = k * v[0], k * v[1]
    rmax, cmax = int(np.abs(r).max()), int(np.abs(c).max())
    out = np.zeros((2 * rmax + 1, 2 * cmax + 1), dtype=bool)
    out[r + rmax, c + cmax] = True
    return out


def _dilate_full(a: np.ndarray, se: np.ndarray) -> np.ndarray:
    """``imdilate(a, se, 'full')`` for bool arrays (Minkowski sum, output grows)."""
    out = np.zeros((a.shape[0] + se.shape[0] - 1, a.shape[1] + se.shape[1] - 1), dtype=bool)
    for dr, dc in zip(*np.nonzero(se)):
        out[dr:dr + a.shape[0], dc:dc + a.shape[1]] |= a
    return out


_DISK_BASES = {
    4: [(1, 0), (1, 1), (0, 1), (-1, 1)],
    6: [(1, 0), (1, 2), (2, 1), (0, 1), (-1, 2), (-2, 1)],
    8: [(1, 0), (2, 1), (1, 1), (1, 2), (0, 1), (-1, 2), (-1, 1), (-2, 1)],
}


def disk_strel(radius: int, approximation: int = 4) -> np.ndarray:
    """MATLAB ``strel('disk', radius, approximation).Neighborhood`` as a bool array.

    ``approximation`` is MATLAB's N: 0 gives the Euclidean disk (x²+y² <= r²); 4 (the
    MATLAB default), 6 or 8 the radial decomposition into periodic lines (Adams 1993),
    which MATLAB uses for radius >= 3.
    """
    if approximation not in (0, 4, 6, 8):
        raise ValueError(f"disk approximation must be 0, 4, 6 or 8, not {approximation}")
    if radius < 3 or approximation == 0:
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        return xx ** 2 + yy ** 2 <= radius ** 2
    theta = math.pi / (2 * approximation)
    k = 2 * radius / (1 / math.tan(theta) + 1 / math.sin(theta))
    nhood = np.ones((1, 1), dtype=bool)
    for v in _DISK_BASES[approximation]:
        nhood = _dilate_full(nhood, _periodic_line(int(math.floor(k / math.hypot(*v))), v))
    # MATLAB then widens the result with horizontal and vertical lines to reach the radius.
    length = 2 * (radius - nhood.shape[0] // 2 - 1) + 1
    if length >= 3:
        nhood = _dilate_full(_dilate_full(nhood, line_strel(length, 0)), line_strel(length, 90))
    return nhood


def rank_clusters(cluster_ids: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Replace arbitrary k-means cluster ids by the rank of their centre (0 = darkest).

    This makes the output independent of how k-means happens to number its clusters.
    """
    centres = np.asarray(centres, dtype=float).ravel()
    rank = np.empty(centres.size, dtype=np.int64)
    rank[np.argsort(centres, kind="stable")] = np.arange(centres.size)
    return rank[np.asarray(cluster_ids)]


def kmeans_ranks(values: np.ndarray, cfg: PseudoLabelConfig = PseudoLabelConfig()) -> Optional[np.ndarray]:
    """k-means (K = cfg.k, seeded, fixed restarts) on 1D values; returns each value's rank,
    or None when there are fewer than K distinct values (no K clusters to form).

    Runs on the distinct values weighted by their counts: the same objective as on every
    pixel (equal values always share a cluster), and fast when most pixels are the masked
    background or 8-bit grey levels.
    """
    from sklearn.cluster import KMeans

    distinct, inverse, counts = np.unique(np.asarray(values, dtype=np.float64).ravel(),
                                          return_inverse=True, return_counts=True)
    if distinct.size < cfg.k:
        return None
    km = KMeans(n_clusters=cfg.k, n_init=cfg.n_init, random_state=cfg.seed).fit(
        distinct.reshape(-1, 1), sample_weight=counts.astype(np.float64))
    return rank_clusters(km.labels_, km.cluster_centers_)[inverse.ravel()]


def clean_ggo(ggo: np.ndarray, cfg: PseudoLabelConfig = PseudoLabelConfig()) -> np.ndarray:
    """Thesis step 6: imerode, imdilate (line), imclose (disk), MATLAB border rules."""
    line = line_strel(cfg.line_length, cfg.line_angle_deg)
    disk = disk_strel(cfg.disk_radius, cfg.disk_approximation)
    out = ndimage.binary_erosion(ggo, structure=line, border_value=1)
    out = ndimage.binary_dilation(out, structure=line, border_value=0)
    out = ndimage.binary_dilation(out, structure=disk, border_value=0)
    return ndimage.binary_erosion(out, structure=disk, border_value=1)


def pseudolabel_slice(hu: np.ndarray, lung_mask: np.ndarray,
                      cfg: PseudoLabelConfig = PseudoLabelConfig()) -> np.ndarray:
    """Pseudo label of one axial slice (module docstring: mapping and clean-up).

    Args:
        hu: (H, W) CT slice in HU.
        lung_mask: (H, W) bool lung mask of that slice (e.g. from extract_lungs_slice).
        cfg: k-means and morphology constants.

    Returns:
        (H, W) uint8 labels: 0 background, 1 GGO, 3 lung.
    """
    hu = np.asarray(hu)
    lung = np.asarray(lung_mask).astype(bool)
    if hu.ndim != 2 or hu.shape != lung.shape:
        raise InputError(f"pseudo labels need a 2D slice and a lung mask of its shape; got {hu.shape} and {lung.shape}")
    if not np.isfinite(hu).all():
        raise InputError("CT slice contains NaN or infinite values")
    labels = np.full(hu.shape, BACKGROUND, dtype=np.uint8)
    labels[lung] = LUNG
    # Step 4 applied the mask to the image (outside the lung is air); k-means sees all of
    # it ("image") or the lung pixels only ("lung"; PseudoLabelConfig checks the name).
    masked = np.where(lung, np.clip(hu.astype(np.float64), cfg.hu_min, cfg.hu_max), cfg.hu_min)
    clustered = np.ones(hu.shape, dtype=bool) if cfg.cluster_domain == ClusterDomain.IMAGE else lung
    ranks = kmeans_ranks(masked[clustered], cfg)
    if ranks is None:
        return labels  # too few distinct values to form K clusters: all lung
    ggo = np.zeros(hu.shape, dtype=bool)
    ggo[clustered] = ranks == cfg.k - 1
    labels[clean_ggo(ggo & lung, cfg) & lung] = GGO
    return labels


def pseudolabel_volume(image: sitk.Image, cfg_lung: LungConfig = LungConfig(),
                       cfg_pl: PseudoLabelConfig = PseudoLabelConfig(), *,
                       lung_mask: Optional[sitk.Image] = None,
                       progress: Optional[ProgressCallback] = None,
                       cancel: Optional[CancelCheck] = None) -> sitk.Image:
    """Pseudo labels of a CT volume in HU, per axial slice (thesis §4.4.1 steps 1-6).

    Args:
        image: 3D CT in HU, any direction matrix.
        cfg_lung: lung extraction constants (ignored when ``lung_mask`` is given).
        cfg_pl: k-means and morphology constants.
        lung_mask: a lung mask of ``image`` to use instead of extracting one: on the CT's
            voxels, stored in any axis order (imageio.mask_on_grid); InputError otherwise.
        progress: called as ``progress("pseudolabels", slice, n_slices)``.
        cancel: returns True to stop (raises Cancelled).

    Returns:
        uint8 label image (0 background, 1 GGO, 3 lung) with the input's geometry.
    """
    if image.GetDimension() != 3:
        raise InputError(f"CT image is {image.GetDimension()}D; pseudo labels need a 3D volume")
    if lung_mask is None:
        lung_array = sitk.GetArrayFromImage(extract_lungs(image, cfg_lung))  # a copy: the image is temporary
    else:  # on the CT's voxels, however the mask's file orders them
        lung_array = mask_on_grid(lung_mask, image, "lung mask")
    direction = image.GetDirection()
    hu, inverse = axial_view(sitk.GetArrayViewFromImage(image), direction)
    lung, _ = axial_view(lung_array, direction)
    out = np.zeros(hu.shape, dtype=np.uint8)
    n = hu.shape[0]
    for z in range(n):
        check_cancel(cancel)
        if lung[z].any():
            out[z] = pseudolabel_slice(np.asarray(hu[z], dtype=np.float32), lung[z] > 0, cfg_pl)
        report(progress, "pseudolabels", z + 1, n)
    log.info("pseudo labels: %d GGO and %d lung voxels", int((out == GGO).sum()), int((out == LUNG).sum()))
    labels = sitk.GetImageFromArray(np.ascontiguousarray(inverse(out)))
    labels.CopyInformation(image)
    return labels
