"""Weak labels of slice inputs (``slices.read_slices``): lung masks and k-means pseudo-labels.

What self-training's level 0 makes for its inputs, and what the ``lungs`` and
``pseudolabel`` commands write: lungs.py and pseudolabels.py applied slice by slice,
with the lung threshold rule resolved per input (:func:`lung_config_for`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .config import THRESHOLD_METHODS, LungConfig, PseudoLabelConfig, SelfTrainConfig, ThresholdMethod
from .errors import InputError
from .lungs import extract_lungs, extract_lungs_slice
from .orientation import axial_view
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .pseudolabels import pseudolabel_slice
from .slices import SliceInput


def lung_config_for(inp: SliceInput, cfg: SelfTrainConfig = SelfTrainConfig(),
                    lung: LungConfig = LungConfig(), threshold_hu: Optional[float] = None,
                    method: Optional[str] = None) -> LungConfig:
    """The lung-extraction constants for an input, with the threshold rule resolved.

    ``method`` (default ``lung.threshold_method``): "auto" is "otsu" for 8-bit slices
    and "thesis" for CT in HU; "thesis" is a fixed level, ``lung.threshold_hu`` for CT
    in HU and ``cfg.eight_bit_lung_threshold_hu`` for 8-bit slices; "otsu" is Otsu's
    level per slice (lungs.py). ``threshold_hu`` is a fixed level for every input
    ("thesis"; not with "otsu"). The result never says "auto".
    """
    method = lung.threshold_method if method is None else method
    if method not in THRESHOLD_METHODS:
        raise InputError(f"lung threshold must be one of {', '.join(THRESHOLD_METHODS)}, not {method!r}")
    if threshold_hu is not None:
        if method == ThresholdMethod.OTSU:
            raise InputError("a fixed lung threshold (threshold_hu) and the Otsu threshold exclude each other")
        changes = dict(threshold_method=ThresholdMethod.THESIS.value, threshold_hu=float(threshold_hu))
    else:
        if method == ThresholdMethod.AUTO:
            method = (ThresholdMethod.OTSU if inp.eight_bit else ThresholdMethod.THESIS).value
        changes = dict(threshold_method=method)
        if method == ThresholdMethod.THESIS and inp.eight_bit:
            changes["threshold_hu"] = cfg.eight_bit_lung_threshold_hu
    try:
        return dataclasses.replace(lung, **changes)
    except ValueError as e:  # e.g. a threshold outside [air, bone]
        raise InputError(str(e)) from None


def lung_masks(inp: SliceInput, cfg: LungConfig, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelCheck] = None) -> np.ndarray:
    """(n, H, W) bool lung masks of an input's slices (volumes: with the 3D clean-up)."""
    if inp.image is not None:
        check_cancel(cancel)
        mask = extract_lungs(inp.image, cfg)
        view, _ = axial_view(sitk.GetArrayViewFromImage(mask), inp.image.GetDirection())
        report(progress, "lungs", len(inp), len(inp), Path(inp.path).name)
        return np.ascontiguousarray(view) > 0
    out = np.zeros(inp.hu.shape, dtype=bool)
    for i in range(len(inp)):
        check_cancel(cancel)
        try:
            out[i] = extract_lungs_slice(inp.hu[i], cfg, spacing=inp.spacing)
        except InputError as e:
            raise InputError(f"{inp.path}, slice {i}: {e}") from None
        report(progress, "lungs", i + 1, len(inp), Path(inp.path).name)
    return out


def pseudo_labels(inp: SliceInput, lungs: np.ndarray, cfg: PseudoLabelConfig = PseudoLabelConfig(),
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None) -> np.ndarray:
    """(n, H, W) uint8 pseudo-labels (0 background, 1 GGO, 3 lung) of an input's slices."""
    out = np.zeros(inp.hu.shape, dtype=np.uint8)
    for i in range(len(inp)):
        check_cancel(cancel)
        if lungs[i].any():
            out[i] = pseudolabel_slice(inp.hu[i], lungs[i], cfg)
        report(progress, "pseudolabels", i + 1, len(inp), Path(inp.path).name)
    return out
