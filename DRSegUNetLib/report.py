"""Quantitative report of a segmentation: volumes (mL) and % of lung involved."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .atomic import atomic_write_bytes
from .orientation import axial_view
from .vocabulary import REGIONS

# A lung is reported separately only when the lung field splits into two 3D
# components, each at least this fraction of the field, on opposite sides.
MIN_LUNG_FRACTION = 0.1


def _stats(labels: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    vol = {r: float(np.isin(labels, v).sum() * voxel_ml) for r, v in REGIONS.items()}
    lung = vol["lung"]
    pct = {r: (100.0 * vol[r] / lung if lung > 0 else None) for r in ("ggo", "consolidation", "infection")}
    return {
        "volume_ml": {r: round(v, 3) for r, v in vol.items()},
        "percent_of_lung": {r: (round(p, 2) if p is not None else None) for r, p in pct.items()},
    }


def compute_report(labels: sitk.Image) -> dict[str, Any]:
    """Volumes of GGO, consolidation, infection and lung field; % of lung involved.

    Per lung ("right", "left") where the lung field separates into two large
    components; otherwise ``per_lung`` is null with a reason.
    """
    arr = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    rep: dict[str, Any] = {"voxel_ml": voxel_ml, "shape_zyx": list(arr.shape), **_stats(arr, voxel_ml)}
    # Axial view: axis 2 runs from the patient's right to left.
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


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())


def add_uncertainty(report: dict[str, Any], per_slice: list, top: int = 5) -> None:
    """Add each axial slice's uncertainty (inference.slice_uncertainty; slice 0 = most
    inferior, as segment and the corrections store count) and the ``top`` most uncertain
    slices: where a user's corrections teach the model most."""
    values = [round(float(u), 5) for u in per_slice]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    report["slice_uncertainty"] = values
    report["most_uncertain_slices"] = [i for i in order[:top] if values[i] > 0]
