"""DRSegUNet: COVID-19 lung infection segmentation on chest CT (pure Python library).

Never imports slicer, vtk or qt; the Slicer module in ``DRSegUNet/`` builds on it.
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The bundled level-1 checkpoint (read-only)."""
    return PACKAGE_DIR / "models" / "drsegunet_level1.pt"


def sample_ct_path() -> Path:
    """The bundled real CT sample in HU (a COVID-19 chest CT slice, see data/PROVENANCE.md)."""
    return PACKAGE_DIR / "data" / "ny_sbu_A002304_135.dcm"
