"""Quantitative report of a segmentation: volumes (mL) and % of lung involved."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .atomic import atomic_write_bytes
from .orientation import axial_view
from .progress import ProgressCallback, report as report_progress
from .vocabulary import CONSOLIDATION_NAME, GGO_NAME, INFECTION_NAME, LUNG_NAME, REGIONS

# next_slice_to_check: the share of the largest distance to the accepted slices within which
# the model's uncertainty chooses (1 = evenly spread, 0 = the most uncertain slice).
SPREAD = 0.8

# A lung is reported separately only when the lung field splits into two 3D
# components, each at least this fraction of the field, on opposite sides.
MIN_LUNG_FRACTION = 0.1


# Voxels per block of axial slices in the passes over a volume: the temporaries (counts cast
# to intp, coordinates as float64) stay a few tens of MB whatever the volume's size.
BLOCK_VOXELS = 1 << 21


def _stats(counts: np.ndarray, voxel_ml: float) -> dict[str, Any]:
    """Volumes and % of lung from ``counts[v]``, the number of voxels of label value v."""
    vol = {r: float(int(sum(counts[v] for v in values if v < len(counts))) * voxel_ml)
           for r, values in REGIONS.items()}
    lung = vol[LUNG_NAME]
    pct = {r: (100.0 * vol[r] / lung if lung > 0 else None) for r in (GGO_NAME, CONSOLIDATION_NAME, INFECTION_NAME)}
    return {
        "volume_ml": {r: round(v, 3) for r, v in vol.items()},
        "percent_of_lung": {r: (round(p, 2) if p is not None else None) for r, p in pct.items()},
    }


def _value_counts(block: np.ndarray, n_values: int) -> np.ndarray:
    """Voxels of each label value 0..n_values-1 in ``block`` (other values are not counted)."""
    flat = block.ravel()
    if flat.dtype == np.uint8:
        return np.bincount(flat, minlength=256)[:n_values]
    return np.array([np.count_nonzero(flat == v) for v in range(n_values)], dtype=np.int64)


def _label_field(field: np.ndarray) -> tuple[np.ndarray, int]:
    """3D connected components of ``field`` in the smallest label type that holds them (uint16
    unless there are more than 65,535 components; ndimage.label's default is int32)."""
    try:
        return ndimage.label(field, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth in requested output type"
        return ndimage.label(field, output=np.int32)


def compute_report(labels: sitk.Image, progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """Volumes of GGO, consolidation, infection and lung field; % of lung involved.

    Per lung ("right", "left") where the lung field separates into two large
    components; otherwise ``per_lung`` is null with a reason.

    Works through the volume a block of axial slices at a time: besides the labels it
    holds the lung field (1 byte per voxel) and its components (2 bytes per voxel) and
    reports its progress as stage "report".
    """
    arr = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    # Axial view: axis 2 runs from the patient's right to left.
    view, _ = axial_view(np.asarray(arr), labels.GetDirection())
    n_values = max(max(v) for v in REGIONS.values()) + 1
    is_lung = np.zeros(256, bool)  # by uint8 label value
    is_lung[list(REGIONS[LUNG_NAME])] = True
    step = max(1, BLOCK_VOXELS // max(1, view.shape[1] * view.shape[2]))
    blocks = [slice(z, min(z + step, view.shape[0])) for z in range(0, view.shape[0], step)]
    total = 2 * len(blocks) + 1
    done = 0

    def tick(message: str) -> None:
        nonlocal done
        done += 1
        report_progress(progress, "report", done, total, message)

    counts = np.zeros(n_values, np.int64)
    field = np.empty(view.shape, bool)
    for b in blocks:
        block = np.asarray(view[b])
        counts += _value_counts(block, n_values)
        if block.dtype == np.uint8:
            field[b] = is_lung[block]
        else:
            field[b] = np.isin(block, REGIONS[LUNG_NAME])
        tick("volumes")
    rep: dict[str, Any] = {"voxel_ml": voxel_ml, "shape_zyx": list(arr.shape), **_stats(counts, voxel_ml)}
    comp, n = _label_field(field)
    del field
    tick("lung components")
    # One pass over the components: their sizes, the sums of their voxels' column (right-left)
    # coordinates, and the label values in each (a component holds lung-field values only).
    sizes = np.zeros(n + 1, np.int64)
    col_sums = np.zeros(n + 1, np.float64)
    values = np.zeros((n + 1) * n_values, np.int64)
    cols = np.arange(view.shape[2], dtype=np.float64)
    for b in blocks:
        c = comp[b].ravel()
        sizes += np.bincount(c, minlength=n + 1)
        col_sums += np.bincount(c, weights=np.broadcast_to(cols, comp[b].shape).ravel(), minlength=n + 1)
        inside = c != 0
        v = np.asarray(view[b]).ravel()[inside].astype(np.intp)
        values += np.bincount(c[inside].astype(np.intp) * n_values + v, minlength=(n + 1) * n_values)
        tick("per lung")
    del comp
    rep["per_lung"] = None
    if n < 2:
        rep["per_lung_note"] = "lung field does not separate into two lungs" if n else "no lung found"
        return rep
    # float64 sizes, as ndimage.sum_labels gives them: argsort then breaks ties as it always did.
    order = np.argsort(-sizes[1:].astype(np.float64))[:2]
    if sizes[order[1] + 1] < MIN_LUNG_FRACTION * int(sizes[1:].sum()):
        rep["per_lung_note"] = "second lung component too small to report separately"
        return rep
    a, b = (int(o) + 1 for o in order)
    centre = {c: col_sums[c] / np.float64(sizes[c]) for c in (a, b)}
    right, left = (a, b) if centre[a] < centre[b] else (b, a)
    by_value = values.reshape(n + 1, n_values)
    rep["per_lung"] = {side: _stats(by_value[c], voxel_ml) for side, c in (("right", right), ("left", left))}
    rep["per_lung_note"] = "two largest lung-field components; smaller pieces are in the totals only"
    return rep


def write_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(report, indent=1) + "\n").encode())


def next_slice_to_check(uncertainty: Sequence[float], accepted: Iterable[int] = ()) -> Optional[int]:
    """The slice to correct next: spread over the lung first, the model's doubt second.

    ``uncertainty[i]``: slice i's ``inference.slice_uncertainty`` (0 = no lung there);
    ``accepted``: slices already accepted as corrections. Each lung slice not yet accepted
    is as far from the accepted ones as its distance to the nearest of them, with the ends
    of the lung's range counting double (so that pressing again and accepting each slice
    spaces the picks evenly, as ``bench/adaptation.py``'s evenly spaced slices are). Of
    the slices at least ``SPREAD`` times as far as the farthest, the most uncertain is
    returned; None when every lung slice is accepted. On the adaptation benchmark (K = 5,
    docs/adaptation.md) fine-tuning on the most uncertain slices alone gained half as much
    as on evenly spaced ones, and spreading with SPREAD = 0.5 still gained less than even
    spacing; hence 0.8, close to even spacing."""
    lung = [i for i, u in enumerate(uncertainty) if u > 0]
    taken = set(int(a) for a in accepted)
    candidates = [i for i in lung if i not in taken]
    if not candidates:
        return None
    lo, hi = lung[0], lung[-1]

    def room(i: int) -> float:
        return min([2 * (i - lo) + 1, 2 * (hi - i) + 1] + [abs(i - a) for a in taken])

    rooms = {i: room(i) for i in candidates}
    far = max(rooms.values())
    return max((i for i in candidates if rooms[i] >= SPREAD * far), key=lambda i: (uncertainty[i], rooms[i], -i))


def slices_to_check(uncertainty: Sequence[float], k: int, accepted: Iterable[int] = ()) -> list[int]:
    """The first ``k`` slices :func:`next_slice_to_check` points to, each taken as accepted in turn."""
    taken, out = list(accepted), []
    for _ in range(k):
        i = next_slice_to_check(uncertainty, taken)
        if i is None:
            break
        out.append(i)
        taken.append(i)
    return out


def add_uncertainty(report: dict[str, Any], per_slice: list, top: int = 5) -> None:
    """Add each axial slice's uncertainty (inference.slice_uncertainty; slice 0 = most
    inferior, as segment and the corrections store count), the ``top`` most uncertain
    slices (where the model is least sure), and ``slices_to_check``: the ``top`` slices
    that *Next slice to check* visits, spread over the lung (:func:`next_slice_to_check`),
    the ones to correct for fine-tuning."""
    values = [round(float(u), 5) for u in per_slice]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    report["slice_uncertainty"] = values
    report["most_uncertain_slices"] = [i for i in order[:top] if values[i] > 0]
    report["slices_to_check"] = slices_to_check(values, top)
