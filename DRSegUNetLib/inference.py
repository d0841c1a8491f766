"""Inference: a CT volume in HU → exclusive label map, slice by slice.

Data flow: SimpleITK image (any direction) → axial view → batches of slices →
window + z-score → (resampled to the working pixel ``InferenceConfig.pixel_mm``, by default
the model's own) → network → softmax → (resampled back) → decision → yield per slice →
labels placed back in the input's geometry. Class probabilities exist only for one batch at a
time, so memory does not grow with the number of slices.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import Checkpoint, load_checkpoint
from .config import Bf16, Decision, InferenceConfig, LungConfig, ModelConfig, ThresholdMethod
from .device import bf16_enabled, resolve_device
from .errors import InputError
from .network import DRSegUNet
from .orientation import SliceResult, axial_spacing, axial_view  # noqa: F401  (SliceResult: re-exported)
from .preprocessing import check_ct_geometry, check_ct_hu, normalize, working_size
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .resample import resample_bilinear
from .vocabulary import BACKGROUND

if TYPE_CHECKING:
    from .guidance import CorrectionGuide

log = logging.getLogger(__name__)


def decide(prob: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Class probabilities (N, C, H, W) → labels (N, H, W) uint8.

    ``argmax``: the most probable class. ``threshold`` (thesis §4.5): a pixel takes
    class c only when P(c) > threshold, else background (0).
    """
    conf, lab = prob.max(dim=1)
    if cfg.decision == Decision.THRESHOLD:
        lab = torch.where(conf > cfg.threshold, lab, torch.full_like(lab, BACKGROUND))
    elif cfg.decision != Decision.ARGMAX:
        raise ValueError(f"unknown decision {cfg.decision!r}; use {' or '.join(map(repr, Decision.values()))}")
    return lab.to(torch.uint8)


def restrict_to_body(labels: np.ndarray, hu: np.ndarray, threshold_hu: float,
                     min_border_air: float = 0.5, eight_bit: bool = False) -> np.ndarray:
    """Set labels outside the body to background, slice by slice; (N, H, W) arrays.

    Only where the whole body is in view (at least ``min_border_air`` of the slice's
    border is air): on a slice cropped through the chest (MedSeg), the lungs reach
    the border and cannot be told from outside air. Measured: full-field CT slices
    have 0.75-1.0 of their border in air, MedSeg crops at most 0.33.

    Air is below ``threshold_hu`` for CT in HU. For ``eight_bit`` slices (8-bit images
    mapped to approximate HU, whose grey values are not calibrated) it is below each
    slice's Otsu level, as the lung extraction takes it (``lungs.air_mask``): there fat
    can fall below -500, and a fixed level then ends the body at the fat and clears the
    lung behind it (46 of the 1,233 zenodo20_dev slices lose over 10 % of their expert
    infection; experiments/weak_supervision/body_restriction_cap.py).
    """
    from .lungs import air_mask, body_mask

    otsu = LungConfig(threshold_method=ThresholdMethod.OTSU.value)
    out = labels.copy()
    for k in range(labels.shape[0]):
        air = air_mask(hu[k], otsu) if eight_bit else hu[k] < threshold_hu
        border = np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]])
        if border.mean() >= min_border_air:
            out[k][~body_mask(air)] = BACKGROUND
    return out


def slice_uncertainty(prob: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Per slice: mean entropy of the class probabilities over the predicted lung field,
    divided by log(classes) (0 = certain, 1 = uniform); 0 for a slice without lung.

    Where to correct next: the slices the model is least sure of (README, issue 18)."""
    p = prob.float().clamp_min(1e-8)
    entropy = -(p * p.log()).sum(dim=1) / math.log(prob.shape[1])  # (N, H, W)
    field = torch.from_numpy(np.asarray(labels) != 0).to(entropy.device)
    n = field.sum(dim=(1, 2))
    total = (entropy * field).sum(dim=(1, 2))
    return torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total)).cpu().numpy().astype(np.float64)


class Predictor:
    """Applies a trained DRSegUNet to CT slices and volumes."""

    def __init__(self, model: DRSegUNet, config: ModelConfig, device: str | torch.device = "auto",
                 inference: Optional[InferenceConfig] = None, checkpoint: Optional[Checkpoint] = None,
                 channels_last: bool = True) -> None:
        """``inference``: None applies the model's own rule (``InferenceConfig.for_model(config)``)."""
        self.device = resolve_device(device)
        self.config = config
        self.inference = inference if inference is not None else InferenceConfig.for_model(config)
        self.checkpoint = checkpoint
        self.source: Optional[str] = None  # where the weights came from, for reports
        # channels_last is the layout cuDNN and oneDNN on CPU prefer; it gives the same labels
        # (Testing/test_fast_paths.py); bench/bench.py --variants times the layouts (bench/README.md).
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device).eval().to(memory_format=self.memory_format)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", **inference_kw) -> "Predictor":
        """The checkpoint's network applied with its own working pixel, decision rule and body
        restriction (``ModelConfig.inference``); ``inference_kw`` (InferenceConfig fields)
        override them, e.g. ``pixel_mm=None`` for the slices' own grid."""
        ckpt = load_checkpoint(path)
        predictor = cls(ckpt.build_model(), ckpt.config, device, InferenceConfig.for_model(ckpt.config, **inference_kw),
                        ckpt)
        predictor.source = str(path)
        return predictor

    @property
    def uses_bf16(self) -> bool:
        """Whether the forward pass runs under bfloat16 autocast on this device, as
        ``InferenceConfig.cuda_bf16`` (CUDA) or ``cpu_bf16`` (CPU) says."""
        if self.device.type == "cuda":
            return bf16_enabled(self.device, self.inference.cuda_bf16, "cuda_bf16")
        return bf16_enabled(self.device, self.inference.cpu_bf16, "cpu_bf16")

    def settings(self) -> dict[str, Any]:
        """The decision rule and numerics of this predictor, for reports."""
        inf = self.inference
        return {"decision": inf.decision, "flip_tta": inf.flip_tta, "pixel_mm": inf.pixel_mm, "bf16": self.uses_bf16}

    def _autocast(self):
        if self.uses_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def working_size(self, shape: Sequence[int], spacing: Optional[Sequence[float]]) -> Optional[tuple[int, int]]:
        """(rows, cols) the network sees for slices of ``shape`` with pixel ``spacing`` (row,
        col) mm, or None for their own grid (``preprocessing.working_size``)."""
        return working_size(shape, spacing, self.inference.pixel_mm)

    def probabilities(self, hu: np.ndarray, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
        """Softmax probabilities (N, C, H, W) float32 on the device for HU slices (N, H, W).

        With ``spacing`` (row, col) mm and ``InferenceConfig.pixel_mm``, the network runs
        on the slices resampled to that pixel size (bilinear, antialiased) and the
        probabilities are resampled back (bilinear) to (H, W).
        """
        x = torch.from_numpy(normalize(hu, self.config.preprocess)).unsqueeze(1)
        x = x.to(self.device, non_blocking=True)
        size = self.working_size(hu.shape, spacing)
        if size is not None:
            x = resample_bilinear(x, size)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), self._autocast():
            prob = torch.softmax(self.model(x).float(), dim=1)
            if self.inference.flip_tta:
                prob = 0.5 * (prob + torch.softmax(self.model(x.flip(-1)).float(), dim=1).flip(-1))
            if size is not None:
                prob = resample_bilinear(prob, hu.shape[-2:], antialias=False)
            return prob

    def labels(self, hu: np.ndarray, spacing: Optional[Sequence[float]] = None,
               eight_bit: bool = False) -> tuple[np.ndarray, torch.Tensor]:
        """(labels (N, H, W) uint8 as numpy, probabilities on the device) for HU slices (N, H, W)
        of pixel size ``spacing`` (row, col) mm when known (see :meth:`probabilities`);
        ``eight_bit``: the slices are 8-bit images in approximate HU (see :func:`restrict_to_body`)."""
        prob = self.probabilities(hu, spacing)
        return self.decide_labels(prob, hu, eight_bit), prob

    def decide_labels(self, prob: torch.Tensor, hu: np.ndarray, eight_bit: bool = False) -> np.ndarray:
        """Labels (N, H, W) uint8 as numpy from probabilities (N, C, H, W) of the HU slices ``hu``
        (N, H, W), as :meth:`labels` decides them: ``decide``, then the body restriction
        (``eight_bit`` as there). For probabilities made otherwise, e.g. averaged over models."""
        labels = decide(prob, self.inference).cpu().numpy()
        if self.inference.restrict_to_body:
            labels = restrict_to_body(labels, hu, self.inference.body_threshold_hu, eight_bit=eight_bit)
        return labels

    def predict_slices(self, slices: Sequence[np.ndarray],
                       spacing: Optional[Sequence[float]] = None, eight_bit: bool = False) -> list[np.ndarray]:
        """Labels for 2D HU slices of any sizes (same-size neighbours are batched), of pixel
        size ``spacing`` (row, col) mm when known (see :meth:`probabilities`); ``eight_bit``
        as for :meth:`labels`."""
        out: list[np.ndarray] = []
        i = 0
        while i < len(slices):
            j = i + 1
            while j < len(slices) and j - i < self.inference.batch_size and slices[j].shape == slices[i].shape:
                j += 1
            out.extend(self.labels(np.stack(slices[i:j]), spacing, eight_bit)[0])
            i = j
        return out

    def iter_slices(self, image: sitk.Image, progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelCheck] = None, with_probabilities: bool = False,
                    guide: Optional["CorrectionGuide"] = None) -> Iterator[SliceResult]:
        """Yield one :class:`SliceResult` per axial slice, inferior to superior. ``guide``: the
        volume's accepted corrections, which pull their neighbours' probabilities (guidance.py)."""
        array = validate_ct_image(image)
        view, _ = axial_view(array, image.GetDirection())
        spacing = axial_spacing(image.GetSpacing(), image.GetDirection())
        n = view.shape[0]
        bs = max(1, self.inference.batch_size)
        report(progress, "segment", 0, n, "segmenting")
        for start in range(0, n, bs):
            check_cancel(cancel)
            batch = np.ascontiguousarray(view[start:start + bs], dtype=np.float32)
            prob = self.probabilities(batch, spacing)
            if guide is not None and len(guide):
                prob = guide.apply(prob, start)
            labels = self.decide_labels(prob, batch)
            probs = prob.half().cpu().numpy() if with_probabilities else None
            uncertain = slice_uncertainty(prob, labels)
            for k in range(labels.shape[0]):
                yield SliceResult(start + k, n, labels[k], image.GetDirection(),
                                  probs[k] if probs is not None else None, float(uncertain[k]))
            report(progress, "segment", min(start + bs, n), n, f"slice {min(start + bs, n)}/{n}")

    def predict(self, image: sitk.Image, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelCheck] = None, uncertainty: Optional[list] = None,
                guide: Optional["CorrectionGuide"] = None) -> sitk.Image:
        """Label map (uint8, values 0-3) with the input's size, spacing, origin and direction.
        ``uncertainty``: a list that receives each axial slice's :func:`slice_uncertainty`, in slice order;
        ``guide``: as for :meth:`iter_slices`."""
        out = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
        for r in self.iter_slices(image, progress, cancel, guide=guide):
            r.place(out)
            if uncertainty is not None:
                uncertainty.append(r.uncertainty)
        labels = sitk.GetImageFromArray(out)
        labels.CopyInformation(image)
        return labels


def validate_ct_image(image: sitk.Image, what: Optional[str] = None) -> np.ndarray:
    """Check that ``image`` is a scalar 3D CT in HU with CT geometry (preprocessing.check_ct_geometry:
    orthogonal axes, plausible spacing, axial slices of a sane size); return its (z, y, x) array.

    ``what`` names the image in messages; by default the file imageio.read_ct read it from, else
    "input image"."""
    if what is None:
        from .imageio import SOURCE_KEY

        what = image.GetMetaData(SOURCE_KEY) if image.HasMetaDataKey(SOURCE_KEY) else "input image"
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per pixel (RGB?); "
                         "a CT has one")
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}D; a CT volume is 3D")
    if 0 in image.GetSize():
        raise InputError(f"{what} is empty (size {image.GetSize()})")
    array = sitk.GetArrayViewFromImage(image)
    check_ct_hu(array, what)  # values first: an 8-bit picture is named so, whatever its size
    check_ct_geometry(image.GetSize(), image.GetSpacing(), image.GetDirection(), what)
    return array
