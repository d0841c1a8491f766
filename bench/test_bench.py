"""The benchmark's candidate pipeline (bench.py's ``fast_iter_slices``: raw HU to the device,
normalised there, one batch in flight) gives the library's labels on a real CT slice.

A check of benchmark code, so not in Testing/; run it from the repository root with
``.venv/bin/python -m pytest bench``. pytest puts this folder on sys.path, so bench.py is
imported as the module ``bench``. The plain path is the network called directly (as
Testing/test_fast_paths.py has it): NCHW float32, one slice at a time, numpy
normalisation, softmax, decision.
"""
from __future__ import annotations

import copy
import os
import tempfile
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import bench

from DRSegUNetLib import default_model_path, sample_ct_path
from DRSegUNetLib.config import InferenceConfig, ModelConfig
from DRSegUNetLib.inference import Predictor, decide, restrict_to_body
from DRSegUNetLib.network import DRSegUNet
from DRSegUNetLib.preprocessing import normalize

# The user's model store must not leak into these checks (as Testing/conftest.py does).
os.environ["DRSEGUNET_HOME"] = tempfile.mkdtemp(prefix="drsegunet-bench-home-")
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


@pytest.mark.slow
def test_pipelined_device_normalised_path_gives_plain_labels(model_and_config, real_slices, plain_probabilities):
    model, cfg = model_and_config
    p = Predictor(copy.deepcopy(model).to(memory_format=torch.channels_last), cfg, "cpu",
                  InferenceConfig(batch_size=2, cpu_bf16="off", pixel_mm=None))
    p.iter_slices = types.MethodType(bench.fast_iter_slices, p)
    events = []
    out = p.predict(_volume(real_slices), progress=lambda s, i, n, m="", **k: events.append((s, i, n)))
    assert events[0] == ("segment", 0, 2) and events[-1] == ("segment", 2, 2)
    _assert_same_labels(sitk.GetArrayFromImage(out), plain_probabilities, real_slices)


def test_pipelined_path_resamples_like_the_library(model_and_config, real_slices):
    """With the working pixel size on (the default), bench's pipelined path and the library
    path resample the same way and give the same labels."""
    model, cfg = model_and_config
    lib = Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(batch_size=2, cpu_bf16="off"))
    fast = Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(batch_size=2, cpu_bf16="off"))
    fast.iter_slices = types.MethodType(bench.fast_iter_slices, fast)
    assert lib.working_size(real_slices.shape, (0.64, 0.64)) == (273, 273)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(fast.predict(_volume(real_slices))),
                                  sitk.GetArrayFromImage(lib.predict(_volume(real_slices))))
