"""DRSegUNet: COVID-19 lung infection segmentation on chest CT (pure Python library).

Never imports slicer, vtk or qt; the Slicer module in ``DRSegUNet/`` builds on it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__version__ = "0.1.0"

MIN_TORCH = "2.0"
"""The oldest torch the library runs on, kept here only (the Slicer module asks PyTorch Utils for
``torch>=MIN_TORCH``). What sets it: ``with torch.device("meta")`` (selftrain.check_config;
torch 2.0, the first release where a device is a context manager). The rest came earlier:
``torch.load(weights_only=True)`` (checkpoint.load_checkpoint) 1.13, ``torch.backends.mps``
1.12, ``F.interpolate(antialias=True)`` for bilinear (resample.resample_bilinear) 1.11,
``torch.autocast(device_type, dtype=torch.bfloat16)`` on CPU and ``torch.cuda.is_bf16_supported``
1.10, ``torch.inference_mode`` 1.9, ``torch.channels_last`` 1.5. Checked where the library
imports torch (:func:`check_torch`), not here: importing this package never imports torch."""

PACKAGE_DIR = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The bundled level-1 checkpoint (read-only)."""
    return PACKAGE_DIR / "models" / "drsegunet_level1.pt"


def sample_ct_path() -> Path:
    """The bundled real CT sample in HU (a COVID-19 chest CT slice, see data/PROVENANCE.md)."""
    return PACKAGE_DIR / "data" / "ny_sbu_A002304_135.dcm"


def _release(version: str) -> Optional[tuple]:
    """(major, minor) of a version string ("2.13.0+cpu", "1.13.1", "2.1.0a0+git1234"); None if it has none."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def torch_version_problem(version: str) -> Optional[str]:
    """None if torch ``version`` is at least :data:`MIN_TORCH` (or cannot be read), else a one-line message."""
    found, needed = _release(version), _release(MIN_TORCH)
    if found is None or found >= needed:
        return None
    return (f"DRSegUNet needs PyTorch {MIN_TORCH} or newer and this Python has torch {version}: upgrade it "
            f"(in 3D Slicer with the PyTorch Utils module; elsewhere: pip install --upgrade \"torch>={MIN_TORCH}\")")


def check_torch(version: str) -> None:
    """Raise :class:`~DRSegUNetLib.errors.TorchVersionError` (one line) when torch ``version`` is older than
    :data:`MIN_TORCH`; the modules that import torch call it with ``torch.__version__``."""
    problem = torch_version_problem(version)
    if problem is not None:
        from .errors import TorchVersionError

        raise TorchVersionError(problem)
