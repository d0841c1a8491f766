"""The benchmark's candidate pipeline (bench.py's ``fast_iter_slices``: raw HU to the device,
normalised there, one batch in flight) gives the library's labels on a real CT slice.

A check of benchmark code, so not in Testing/; run it from the repository root with
``.venv/bin/python -m pytest bench``. pytest puts this folder on sys.path, so bench.py is
imported as the module ``bench``. The plain path is the network called directly (as
Testing/test_fast_paths.py has it): NCHW float32, one slice at a time, numpy
normalisation, softmax, decision; its fixtures and the label check are Testing/fast_path_helpers.py's,
shared with Testing/test_fast_paths.py.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import bench

from DRSegUNetLib.config import InferenceConfig
from DRSegUNetLib.inference import Predictor

# The user's model store must not leak into these checks (as Testing/conftest.py does).
os.environ["DRSEGUNET_HOME"] = tempfile.mkdtemp(prefix="drsegunet-bench-home-")
TESTING = Path(__file__).resolve().parents[1] / "Testing"
if str(TESTING) not in sys.path:
    sys.path.insert(0, str(TESTING))

import fast_path_helpers  # noqa: E402
from fast_path_helpers import _assert_same_labels, _volume  # noqa: E402

# The plain path's fixtures, found by pytest under these names (as in Testing/test_fast_paths.py).
model_and_config = fast_path_helpers.model_and_config
real_slices = fast_path_helpers.real_slices
plain_probabilities = fast_path_helpers.plain_probabilities


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
