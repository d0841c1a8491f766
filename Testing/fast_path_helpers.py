"""Fixtures and checks shared by Testing/test_fast_paths.py and bench/test_bench.py: the plain path's
probabilities on a real CT slice, and the check that a faster path's labels are the plain path's.

"Plain" is the network called directly: NCHW float32, one slice at a time, numpy normalisation,
softmax, decision. A test module uses the fixtures by importing them by name.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DRSegUNetLib import default_model_path, sample_ct_path
from DRSegUNetLib.config import InferenceConfig, ModelConfig
from DRSegUNetLib.inference import decide, restrict_to_body
from DRSegUNetLib.network import DRSegUNet
from DRSegUNetLib.preprocessing import normalize

TIE = 1e-4  # top-2 probability gap under which either class is a correct decision
SHIFT = (3, -2)  # second slice of the test volume: the real slice, shifted


@pytest.fixture(scope="module")
def model_and_config() -> tuple[DRSegUNet, ModelConfig]:
    path = default_model_path()
    if path.exists():
        from DRSegUNetLib.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        return ckpt.build_model(), ckpt.config
    torch.manual_seed(0)
    return DRSegUNet().eval(), ModelConfig()


@pytest.fixture(scope="module")
def real_slices() -> np.ndarray:
    """(2, 512, 512) int16 HU: the bundled real CT slice and a shifted copy."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_ct_path())))[0].astype(np.int16)
    return np.stack([hu, np.roll(hu, SHIFT, axis=(0, 1))])


@pytest.fixture(scope="module")
def plain_probabilities(model_and_config, real_slices) -> torch.Tensor:
    """(2, C, H, W) softmax of the plain path, one slice at a time."""
    model, cfg = model_and_config
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    out = []
    with torch.inference_mode():
        for hu in real_slices:
            x = torch.from_numpy(normalize(hu[None], cfg.preprocess)).unsqueeze(1)
            out.append(torch.softmax(model(x).float(), dim=1))
    return torch.cat(out)


def _volume(real_slices: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(real_slices)
    image.SetSpacing((0.64, 0.64, 1.25))
    return image


def _assert_same_labels(labels: np.ndarray, prob: torch.Tensor, hu: np.ndarray) -> None:
    cfg = InferenceConfig()
    ref = restrict_to_body(decide(prob, cfg).numpy(), hu, cfg.body_threshold_hu)
    top2 = prob.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]).numpy() > TIE
    assert labels.shape == ref.shape
    differ = labels != ref
    assert not (differ & decided).any(), f"{int((differ & decided).sum())} decided pixels changed label"
    assert differ.mean() < 1e-4
