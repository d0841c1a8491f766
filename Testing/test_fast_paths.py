"""Faster inference paths give the plain path's labels on a real CT slice.

"Plain" is the network called directly: NCHW float32, one slice at a time, numpy
normalisation, softmax, decision. The faster paths (channels_last weights, batches)
change where and in which memory order the arithmetic happens, not the arithmetic, so
the labels must agree wherever the plain path's decision is not a float-rounding tie.
The plain path's fixtures and the label check are in fast_path_helpers.py, shared with
bench/test_bench.py (which checks the benchmark's candidate pipeline, ``fast_iter_slices``, so).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import fast_path_helpers
from fast_path_helpers import _assert_same_labels, _volume

from DRSegUNetLib.config import InferenceConfig
from DRSegUNetLib.inference import Predictor, decide, restrict_to_body
from DRSegUNetLib.preprocessing import normalize

# The plain path's fixtures: pytest finds them under these names (assigned, not imported, so that a test's
# argument of the same name does not read to flake8 as a redefinition of an unused import).
model_and_config = fast_path_helpers.model_and_config
real_slices = fast_path_helpers.real_slices
plain_probabilities = fast_path_helpers.plain_probabilities


def test_device_normalisation_is_bitwise_the_numpy_one(model_and_config, real_slices):
    pp = model_and_config[1].preprocess
    x = torch.from_numpy(real_slices).float()
    on_device = (x.clamp_(pp.hu_min, pp.hu_max) - pp.mean) / pp.std
    np.testing.assert_array_equal(on_device.numpy(), normalize(real_slices, pp))


@pytest.mark.slow
def test_channels_last_on_cpu_gives_plain_labels(model_and_config, real_slices, plain_probabilities):
    model, cfg = model_and_config
    fast = Predictor(copy.deepcopy(model).to(memory_format=torch.channels_last), cfg, "cpu",
                     InferenceConfig(cpu_bf16="off"))
    labels = fast.predict_slices([real_slices[0].astype(np.float32)])[0]
    _assert_same_labels(labels[None], plain_probabilities[:1], real_slices[:1])


@pytest.mark.slow
def test_batched_volume_gives_slice_by_slice_labels(model_and_config, real_slices, plain_probabilities):
    model, cfg = model_and_config
    p = Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(batch_size=2, cpu_bf16="off", pixel_mm=None))
    labels = sitk.GetArrayFromImage(p.predict(_volume(real_slices)))
    _assert_same_labels(labels, plain_probabilities, real_slices)


@pytest.mark.slow
def test_cpu_bf16_labels_agree_with_float32_on_a_real_slice(model_and_config, real_slices, plain_probabilities):
    """bf16 autocast changes the arithmetic (8-bit mantissa), so near-ties may flip; on the
    bundled slice 0.1% of pixels flip, all with a float32 top-2 gap under 0.07. Floors: under
    0.5% of pixels, none with a gap over 0.2, and every region's Dice between paths >= 0.99."""
    model, cfg = model_and_config
    p = Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(cpu_bf16="on"))
    assert p.uses_bf16
    labels = p.predict_slices([real_slices[0].astype(np.float32)])[0][None]
    prob = plain_probabilities[:1]
    ref = restrict_to_body(decide(prob, InferenceConfig()).numpy(), real_slices[:1], InferenceConfig().body_threshold_hu)
    top2 = prob.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).numpy()
    differ = labels != ref
    assert differ.mean() < 5e-3
    assert not (differ & (gap > 0.2)).any()
    for value in (1, 2, 3):
        a, b = labels == value, ref == value
        if a.any() or b.any():
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99, value


def test_cpu_bf16_mode_is_checked_and_off_means_float32(model_and_config):
    model, cfg = model_and_config
    assert not Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(cpu_bf16="off")).uses_bf16
    assert Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(cpu_bf16="on")).uses_bf16
    with pytest.raises(ValueError, match="cpu_bf16"):
        Predictor(copy.deepcopy(model), cfg, "cpu", InferenceConfig(cpu_bf16="maybe")).uses_bf16


def test_cuda_bf16_mode_is_honoured_without_a_gpu():
    # uses_bf16 reads only the device and the config; "on"/"off" never query the GPU, so a
    # Predictor shell with a CUDA device checks the policy here (training's validation with
    # TrainConfig.bf16="off" must run float32 on a GPU too).
    import torch

    shell = object.__new__(Predictor)
    shell.device = torch.device("cuda")
    for mode, expected in (("off", False), ("on", True)):
        shell.inference = InferenceConfig(cpu_bf16="on" if mode == "off" else "off", cuda_bf16=mode)
        assert shell.uses_bf16 is expected
    shell.inference = InferenceConfig(cuda_bf16="sometimes")
    with pytest.raises(ValueError, match="cuda_bf16"):
        shell.uses_bf16
