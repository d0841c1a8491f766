"""Slice a volume along the patient's axial axis, whatever its direction matrix.

SimpleITK arrays are (z, y, x) = (k, j, i) with a direction matrix whose columns
are the LPS directions of the i, j, k index axes. The *axial view* of a volume is
the array permuted and flipped so that axis 0 runs inferior→superior, axis 1
anterior→posterior and axis 2 patient right→left: each ``view[n]`` is an axial
slice in radiological display (patient's right on the image's left, anterior up).
Only permutations and flips are used (no resampling); an oblique volume is sliced
along the index axis closest to each patient axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np


def _axis_assignment(direction: Sequence[float]) -> tuple[list[int], list[int]]:
    """For each patient axis (L, P, S) the index axis (i, j, k) closest to it and its sign."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    patient_of_index = [-1, -1, -1]
    taken: set[int] = set()
    # Assign the most clear-cut index axes first, so an oblique one takes what is left.
    for a in np.argsort(-np.abs(d).max(axis=0)):
        order = np.argsort(-np.abs(d[:, a]))
        p = next(int(q) for q in order if int(q) not in taken)
        taken.add(p)
        patient_of_index[a] = p
    index_of_patient = [patient_of_index.index(p) for p in range(3)]
    sign_of_patient = [1 if d[p, index_of_patient[p]] >= 0 else -1 for p in range(3)]
    return index_of_patient, sign_of_patient


def axial_view(array_zyx: np.ndarray, direction: Sequence[float]) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Return (view, inverse): ``view`` is (n_axial, rows, cols), a view not a copy.

    ``inverse(a)`` maps an array laid out like ``view`` back to the input layout.
    ``array_zyx`` may have trailing extra axes (e.g. channels), which are kept.
    """
    index_of_patient, sign = _axis_assignment(direction)
    # numpy axis of index axis a is 2 - a; output axis o holds patient axis 2 - o.
    axes = [2 - index_of_patient[2 - o] for o in range(3)]
    extra = list(range(3, array_zyx.ndim))
    flips = [o for o in range(3) if sign[2 - o] < 0]
    view = np.transpose(array_zyx, axes + extra)
    if flips:
        view = np.flip(view, axis=flips)
    inv_axes = [int(i) for i in np.argsort(axes)]

    def inverse(a: np.ndarray) -> np.ndarray:
        if flips:
            a = np.flip(a, axis=flips)
        return np.transpose(a, inv_axes + list(range(3, a.ndim)))

    return view, inverse


def axial_shape(size_xyz: Sequence[int], direction: Sequence[float]) -> tuple[int, int, int]:
    """(slices, rows, cols) of :func:`axial_view` of an image of ``size_xyz`` (SimpleITK's GetSize())."""
    index_of_patient, _ = _axis_assignment(direction)
    return tuple(int(size_xyz[index_of_patient[p]]) for p in (2, 1, 0))  # type: ignore[return-value]


def axial_spacing(spacing_xyz: Sequence[float] | Any,
                  direction: Optional[Sequence[float]] = None) -> tuple[float, float]:
    """(row, col) pixel size in mm of the slices of :func:`axial_view`.

    Args:
        spacing_xyz: an image's spacing (SimpleITK's ``GetSpacing()``), with its ``direction``;
            or the image itself (anything with ``GetSpacing()`` and ``GetDirection()``) and no direction.
    """
    if direction is None:
        spacing_xyz, direction = spacing_xyz.GetSpacing(), spacing_xyz.GetDirection()
    index_of_patient, _ = _axis_assignment(direction)
    # Rows run along P (patient axis 1), columns along L (patient axis 0).
    return float(spacing_xyz[index_of_patient[1]]), float(spacing_xyz[index_of_patient[0]])


def axial_slice_spacing(spacing_xyz: Sequence[float], direction: Sequence[float]) -> float:
    """Spacing in mm of the slices of :func:`axial_view` (along its axis 0)."""
    index_of_patient, _ = _axis_assignment(direction)
    return float(spacing_xyz[index_of_patient[2]])


@dataclass
class SliceResult:
    """One finished axial slice.

    ``labels`` (rows, cols) uint8 in the axial display frame; ``probabilities``
    (C, rows, cols) float16 when asked for; ``uncertainty``: inference.slice_uncertainty.
    """

    index: int
    total: int
    labels: np.ndarray
    direction: tuple[float, ...]
    probabilities: Optional[np.ndarray] = None
    uncertainty: Optional[float] = None

    def place(self, volume_zyx: np.ndarray, labels: Optional[Sequence[int]] = None) -> None:
        """Write this slice into an array laid out like ``sitk.GetArrayFromImage(input)``.

        With ``labels`` (e.g. a segment's label values), write the binary mask of
        those labels instead of the label values (e.g. into one segment's labelmap).
        """
        view, _ = axial_view(volume_zyx, self.direction)
        view[self.index] = self.labels if labels is None else np.isin(self.labels, labels)
