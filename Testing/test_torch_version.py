"""The library's minimum torch (``DRSegUNetLib.MIN_TORCH``): an older torch is refused with one line when a
module that needs torch is imported, and the CLI (the Slicer module's worker) prints it and exits 2."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import DRSegUNetLib
from DRSegUNetLib.errors import TorchVersionError

REPO = Path(__file__).resolve().parents[1]


def test_the_minimum_is_one_version_string_and_importing_the_package_needs_no_torch():
    assert DRSegUNetLib.MIN_TORCH == "2.0"
    code = "import sys, DRSegUNetLib; print(DRSegUNetLib.MIN_TORCH); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2.0", "False"]


@pytest.mark.parametrize("version", ["1.13.1", "1.13.1+cu117", "1.9.0", "0.4.1"])
def test_an_older_torch_is_refused_with_one_line(version):
    with pytest.raises(TorchVersionError) as e:
        DRSegUNetLib.check_torch(version)
    message = str(e.value)
    assert "\n" not in message
    assert f"PyTorch {DRSegUNetLib.MIN_TORCH} or newer" in message and f"torch {version}" in message
    assert isinstance(e.value, ImportError)  # what code probing for an optional torch catches


@pytest.mark.parametrize("version", ["2.0.0", "2.0.1+cpu", "2.1.0a0+git1234", "2.13.0+cpu", "10.0"])
def test_the_minimum_and_newer_are_accepted(version):
    DRSegUNetLib.check_torch(version)
    assert DRSegUNetLib.torch_version_problem(version) is None


def test_the_installed_torch_is_accepted():
    import torch

    DRSegUNetLib.check_torch(torch.__version__)
    importlib.import_module("DRSegUNetLib.inference")  # imports network and checkpoint, which check


def test_an_unreadable_version_is_left_to_torch():
    assert DRSegUNetLib.torch_version_problem("unknown") is None


def test_the_worker_cli_under_an_older_torch_exits_2_with_one_line(tmp_path):
    """``python -m DRSegUNetLib`` (what Slicer runs) with torch reporting 1.13.1: one line on stderr, exit 2."""
    code = ("import runpy, sys, torch\n"
            "torch.__version__ = '1.13.1'\n"
            f"sys.argv = ['DRSegUNetLib', 'segment', {str(DRSegUNetLib.sample_ct_path())!r}, "
            f"{str(tmp_path / 'out.nii.gz')!r}, '--device', 'cpu']\n"
            "runpy.run_module('DRSegUNetLib', run_name='__main__', alter_sys=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert lines == [f"error: DRSegUNet needs PyTorch {DRSegUNetLib.MIN_TORCH} or newer and this Python has torch "
                     f"1.13.1: upgrade it (in 3D Slicer with the PyTorch Utils module; elsewhere: pip install "
                     f"--upgrade \"torch>={DRSegUNetLib.MIN_TORCH}\")"], r.stderr
    assert not (tmp_path / "out.nii.gz").exists()
