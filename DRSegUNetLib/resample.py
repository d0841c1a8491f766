"""The one resampling between a slice's own pixel grid and the working pixel grid.

Inference resamples each batch of slices to ``InferenceConfig.pixel_mm`` and the class
probabilities back; fine-tuning (``data.resample_sample``) resamples corrections the same
way, so the network trains on the texture it is later shown.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import check_torch

check_torch(torch.__version__)  # one line (TorchVersionError) under a torch older than MIN_TORCH


def resample_bilinear(x: torch.Tensor, size: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """(N, C, H, W) → (N, C, *size), bilinear: the one resampling between a slice's grid and
    the working pixel grid (inference, fine-tuning, benchmarks). Images go antialiased;
    probabilities come back with ``antialias=False``."""
    return torch.nn.functional.interpolate(x, size=tuple(int(n) for n in size), mode="bilinear",
                                           align_corners=False, antialias=antialias)
