"""Shared fixtures: repository paths, the bundled sample and model, the shared data folder."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(__file__).resolve().parent / "data"
SHARED_DATA = REPO.parent / "shared" / "data"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The user's model and corrections stores must not leak into the tests (segment uses the store's
# active model by default): every test, and every process a test starts, gets an empty data folder.
if "DRSEGUNET_TEST_HOME" not in os.environ:
    import tempfile

    os.environ["DRSEGUNET_TEST_HOME"] = tempfile.mkdtemp(prefix="drsegunet-test-home-")
os.environ["DRSEGUNET_HOME"] = os.environ["DRSEGUNET_TEST_HOME"]




@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail("../shared/data must be beside the clone in CI: real-data checks are never skipped there")
        pytest.skip("../shared/data is not beside this clone")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_ct_path() -> Path:
    from DRSegUNetLib import sample_ct_path

    return sample_ct_path()


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    from DRSegUNetLib import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained 4-filter DRSegUNet checkpoint, for mechanics (not accuracy)."""
    import torch

    from DRSegUNetLib.checkpoint import Checkpoint, save_checkpoint
    from DRSegUNetLib.config import ModelConfig, NetworkConfig
    from DRSegUNetLib.network import DRSegUNet

    torch.manual_seed(0)
    cfg = ModelConfig(network=NetworkConfig(base_filters=4))
    model = DRSegUNet(cfg.network)
    # Give BatchNorm non-trivial running statistics so eval mode differs from train mode.
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32) * 3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(Checkpoint.from_model(model.eval(), cfg), path)
    return path
