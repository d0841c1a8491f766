"""Label maps of slice inputs saved as ``.npz``: what ``selftrain``'s levels, ``lungs`` and
``pseudolabel`` write, and what ``evaluate --predictions`` reads."""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .data import read_npz
from .errors import InputError
from .vocabulary import NUM_CLASSES

log = logging.getLogger(__name__)


def save_label_maps(path: str | Path, inputs: Sequence[str], maps: Sequence[np.ndarray]) -> None:
    """Write label maps atomically as ``.npz``.

    Layout: ``inputs`` (k,) str, the input each array belongs to; ``input_<i>``
    (n_i, H_i, W_i) uint8 per input, slices in the input's order (volumes: axial
    display frame, inferior to superior); and ``labels`` (N, H, W) uint8, all slices
    stacked, when they share one size. Values are in vocabulary.py's labels.
    """
    if len(inputs) != len(maps):
        raise ValueError("one label array per input")
    arrays: dict[str, np.ndarray] = {"inputs": np.array([str(s) for s in inputs], dtype=str)}
    for i, m in enumerate(maps):
        arrays[f"input_{i}"] = np.asarray(m, dtype=np.uint8)
    if maps and len({m.shape[1:] for m in maps}) == 1:
        arrays["labels"] = np.concatenate([np.asarray(m, dtype=np.uint8) for m in maps])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_label_maps(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """Inverse of :func:`save_label_maps`: (inputs, per-input label arrays). InputError
    with one line for a file that cannot be read or was not written by it."""
    what = "label maps .npz"
    recorded = read_npz(path, what, only=("inputs",)).get("inputs")
    if recorded is None:
        raise InputError(f"{path} has no 'inputs' array: it was not written by save_label_maps")
    inputs = [str(s) for s in recorded]
    names = [f"input_{i}" for i in range(len(inputs))]
    arrays = read_npz(path, what, only=names)  # the stacked 'labels' copy stays unread
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"{path} records {len(inputs)} inputs but has no {missing[0]!r} array")
    return inputs, [arrays[n] for n in names]


def labels_for_dataset(path: str | Path, data: str | Path, n: int) -> np.ndarray:
    """Label maps in ``path`` aligned with the ``n`` slices of dataset ``data``.

    ``path`` holds ``labels`` (N, H, W); or it was written by :func:`save_label_maps`
    for several inputs, one of which is ``data`` (then that input's array is used).
    """
    p = Path(path)
    what = "predictions .npz"
    name = "labels"
    inputs = read_npz(p, what, only=("inputs",)).get("inputs")
    if inputs is not None:  # only the array of ``data`` is decompressed, not every input's
        want = Path(data).resolve()
        same = [i for i, s in enumerate(inputs) if Path(str(s)).resolve() == want]
        if not same:  # a relative path recorded from another working folder: the file name must do
            same = [i for i, s in enumerate(inputs) if Path(str(s)).name == want.name]
        if len(same) == 1:
            name = f"input_{same[0]}"
        else:  # made for other data
            log.warning("%s records label maps of %s, not of %s; using its stacked labels",
                        p, ", ".join(map(str, inputs)), data)
    d = read_npz(p, what, only=(name, "labels"))
    chosen = d.get(name, d.get("labels"))
    if chosen is None:
        raise InputError(f"{p} has no 'labels' array (N, H, W) uint8 of label maps; it has {sorted(read_npz(p, what))}")
    if chosen.ndim != 3 or len(chosen) != n:
        raise InputError(f"{p}: 'labels' {chosen.shape} does not match {data} ({n} slices): expected ({n}, H, W)")
    if not (np.issubdtype(chosen.dtype, np.integer) or chosen.dtype == bool):
        raise InputError(f"{p}: labels are {chosen.dtype}; label maps are integers 0-3 (uint8)")
    low, high = (int(chosen.min()), int(chosen.max())) if chosen.size else (0, 0)
    if low < 0 or high >= NUM_CLASSES:
        raise InputError(f"{p}: label value {low if low < 0 else high} is not in the vocabulary (0-3)")
    return chosen.astype(np.uint8, copy=False)
