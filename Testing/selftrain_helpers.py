"""Tiny self-training settings shared by Testing/test_selftrain.py and
experiments/weak_supervision/test_weak_scripts.py."""
from __future__ import annotations

import torch

from DRSegUNetLib.config import SelfTrainConfig

FROZEN = ("stem.conv1.", "stem.bn1.")


def tiny(**kw) -> SelfTrainConfig:
    # 16 filters, not fewer: with torch 2.13+cpu, training channels_last (training.py) corrupts the
    # heap in the backward pass of the first encoder's 1x1 stride-2 shortcut when it has 4 or 8 input
    # channels (crashes at crop >= 64, silent below). Small crops and few steps keep this fast.
    base = dict(levels=2, level1_epochs=1, level2_epochs=1, steps_per_epoch=2, batch_size=2, crop=32,
                base_filters=16, level2_lr=1e-3)
    return SelfTrainConfig(**{**base, **kw})


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]
