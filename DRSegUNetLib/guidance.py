"""Accepted corrections guide the next segmentation of the same volume.

A corrected slice says more about its neighbours than any fine-tune learns from it:
lesions continue from one slice to the next. When a volume is segmented again, each slice
within reach of an accepted slice of that volume has its class probabilities pulled toward
what the nearest accepted slice says, with weight ``STRENGTH * exp(-d / REACH)`` at a
distance of ``d`` slices. What the accepted slice leaves open is not pulled: a lesion
outline whose type was not checked keeps the model's GGO:consolidation ratio, and a pixel
of a segment that was not checked keeps the model's probabilities.

A correction belongs to a volume when its stored CT slice is that volume's axial slice at
its index (same size, spacing and HU values), so a correction is never applied to another
patient or to a resampled copy. Measured on the adaptation benchmark (docs/adaptation.md).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .data import labels_to_allowed
from .vocabulary import NUM_CLASSES

# Weight of an accepted slice's labels on its next neighbour's probabilities (on the
# accepted slice itself the labels always win), and the distance in slices over which that
# weight falls by a factor e. Chosen on the development volumes (docs/adaptation.md).
STRENGTH = 0.9
REACH = 5.0
# Beyond this many REACHes a slice is left alone (weight below 0.9 * e^-4 = 0.016).
CUTOFF_REACHES = 4.0
# HU tolerance when matching a stored correction's CT slice to a volume's slice.
HU_TOLERANCE = 0.5


def pull(prob: torch.Tensor, allowed: np.ndarray, weight: float) -> torch.Tensor:
    """``(1 - weight) * prob + weight * q`` for probabilities (C, H, W), where ``q`` is ``prob``
    restricted to the classes an accepted slice allows at each pixel (``allowed``: (H, W)
    bitmask, data.labels_to_allowed) and renormalised; uniform over the allowed classes
    where the model gave them no probability."""
    bits = torch.from_numpy(np.ascontiguousarray(allowed, np.uint8)).to(prob.device).long()
    mask = ((bits[None] >> torch.arange(NUM_CLASSES, device=prob.device)[:, None, None]) & 1).to(prob.dtype)
    q = prob * mask
    total = q.sum(0, keepdim=True)
    uniform = mask / mask.sum(0, keepdim=True).clamp_min(1)
    q = torch.where(total > 1e-6, q / total.clamp_min(1e-12), uniform)
    return (1.0 - weight) * prob + weight * q


class CorrectionGuide:
    """The accepted slices of one volume, by axial slice index (``orientation.axial_view``),
    as allowed-class bitmasks on the volume's grid."""

    def __init__(self, allowed: Mapping[int, np.ndarray], strength: float = STRENGTH, reach: float = REACH):
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"strength must be in [0, 1), not {strength}")
        if not reach > 0:
            raise ValueError(f"reach must be > 0 slices, not {reach}")
        self.allowed = {int(i): a for i, a in allowed.items()}
        self.slices = sorted(self.allowed)
        self.strength, self.reach = float(strength), float(reach)

    def __len__(self) -> int:
        return len(self.slices)

    def nearest(self, index: int) -> Optional[tuple[int, float]]:
        """(the nearest accepted slice, its weight on slice ``index``), or None when none is in reach."""
        if not self.slices:
            return None
        near = min(self.slices, key=lambda s: (abs(s - index), s))
        d = abs(near - index)
        if d == 0:
            return near, 1.0
        if d > CUTOFF_REACHES * self.reach:
            return None
        return near, self.strength * math.exp(-d / self.reach)

    def apply(self, prob: torch.Tensor, first: int) -> torch.Tensor:
        """Probabilities (N, C, H, W) of the axial slices ``first`` .. ``first + N - 1``, guided."""
        out = None
        for k in range(prob.shape[0]):
            hit = self.nearest(first + k)
            if hit is None:
                continue
            near, w = hit
            if out is None:
                out = prob.clone()
            allowed = self.allowed[near]
            if allowed.shape != tuple(prob.shape[-2:]):
                raise ValueError(f"accepted slice {near} is {allowed.shape}, the probabilities {tuple(prob.shape[-2:])}")
            out[k] = pull(prob[k], allowed, w)
        return prob if out is None else out

    @classmethod
    def from_store(cls, store, ct_view: np.ndarray, spacing: Sequence[float]) -> "CorrectionGuide":
        """The corrections of ``store`` (store.CorrectionsStore) that belong to this volume:
        ``ct_view`` (Z, H, W) in the axial view, ``spacing`` its (row, column) mm. A slice
        accepted more than once counts as accepted last."""
        z, h, w = ct_view.shape
        found: dict[int, tuple[str, np.ndarray]] = {}
        if not store.root.is_dir():
            return cls({})
        for info in store.items():
            if not (0 <= info.slice_index < z and tuple(info.shape) == (h, w)
                    and np.allclose(info.spacing, spacing, rtol=1e-4, atol=1e-4)):
                continue
            c = store.load(info.id)
            same = np.allclose(c.ct_hu, ct_view[info.slice_index], rtol=0, atol=HU_TOLERANCE)
            if same and (info.slice_index not in found or found[info.slice_index][0] <= info.time):
                found[info.slice_index] = (info.time, labels_to_allowed(c.labels, c.known))
        return cls({i: a for i, (_, a) in found.items()})


def guide_for_image(store, image) -> CorrectionGuide:
    """The :class:`CorrectionGuide` of a CT (SimpleITK image) from a corrections store (None: no guide)."""
    import SimpleITK as sitk

    from .orientation import axial_spacing, axial_view

    if store is None:
        return CorrectionGuide({})
    view = axial_view(sitk.GetArrayViewFromImage(image), image.GetDirection())[0]
    return CorrectionGuide.from_store(store, view, axial_spacing(image.GetSpacing(), image.GetDirection()))


__all__ = ["STRENGTH", "REACH", "pull", "CorrectionGuide", "guide_for_image"]
