"""What runs inside 3D Slicer works on numpy 1.26 and SimpleITK 2.2 (Slicer 5.6, 5.8) as on numpy 2.

``DRSEGUNET_OLD_NUMPY_PYTHON`` may name a Python with numpy 1.x, scipy and SimpleITK; otherwise the
suite makes one (Python 3.9, as Slicer 5.6/5.8 run, when ``python3.9`` is on the PATH, else this
Python) in ``~/.cache/drsegunet/old-numpy`` with ``pip install numpy==1.26.4 scipy==1.11.4
SimpleITK==2.2.1`` and reuses it; it skips, saying why, only when that install fails (no network).

That interpreter runs Testing/old_numpy_check.py (the library parts the module uses in Slicer's process:
orientation, vocabulary, config, imageio, lungs, report, store, segio, the job's CT copy and shared label
array); this one runs it too, and both must give the same results. With torch in that interpreter
(``pip install torch==...`` there too), the slow test also runs the worker process the module starts
(``segment-stream``, ``finetune``); without torch it is skipped: those parts need torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parent / "old_numpy_check.py"
REPO = Path(__file__).resolve().parents[1]
OLD_PINS = ("numpy==1.26.4", "scipy==1.11.4", "SimpleITK==2.2.1")  # what Slicer 5.6/5.8 bundle


@pytest.fixture(scope="session")
def old_python() -> str:
    """An interpreter with Slicer 5.6/5.8's numpy, scipy and SimpleITK (see the module docstring)."""
    import shutil

    given = os.environ.get("DRSEGUNET_OLD_NUMPY_PYTHON")
    if given:
        return given
    candidates = [shutil.which("python3.9"), *sorted(map(str, Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")))]
    base = next((c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True,
                                                                timeout=60).returncode == 0), sys.executable)
    venv = Path.home() / ".cache" / "drsegunet" / "old-numpy"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import numpy, scipy, SimpleITK; assert numpy.__version__ == '1.26.4'"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        return str(python)
    shutil.rmtree(venv, ignore_errors=True)
    steps = [[base, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "-q", *OLD_PINS]]
    for step in steps:
        r = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"could not make an old-numpy Python ({' '.join(step[:4])}...): {r.stderr.strip()[-300:]}")
    return str(python)


def _run(python: str, work: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DRSEGUNET_HOME"] = str(work / "home")
    r = subprocess.run([python, str(CHECK), str(work), *args], capture_output=True, text=True, timeout=900,
                       cwd=str(REPO), env=env)
    assert r.returncode == 0, f"{python}:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _differences(a, b, path="") -> list:
    """Where two JSON values differ (floats to 1e-9 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in
                ([f"{path}/{k}: only on one side"] if (k in a) != (k in b) else _differences(a[k], b[k], f"{path}/{k}"))]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if a == pytest.approx(b, rel=1e-9, abs=1e-12) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _check_old(result: dict) -> None:
    versions = result["versions"]
    assert versions["numpy"].startswith("1."), f"DRSEGUNET_OLD_NUMPY_PYTHON has numpy {versions['numpy']}, not 1.x"
    print("old interpreter:", versions)


@pytest.mark.slow
def test_the_parts_slicer_runs_in_its_own_process_agree_on_old_numpy(tmp_path, old_python):
    old = _run(old_python, tmp_path / "old")
    _check_old(old)
    new = _run(sys.executable, tmp_path / "new")
    assert _differences(old["in_process"], new["in_process"]) == []


@pytest.mark.slow
def test_the_worker_process_runs_on_old_numpy(tmp_path, tiny_checkpoint, old_python):
    """``-m DRSegUNetLib segment-stream`` and ``finetune`` as the module starts them (PythonSlicer has Slicer's numpy).
    Needs torch in the old-numpy Python (torch==2.13.0 installs only on 3.10+ here; not in the suite's own one)."""
    probe = subprocess.run([old_python, "-c", "import torch"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("no torch in the old-numpy Python (set DRSEGUNET_OLD_NUMPY_PYTHON to one with torch): "
                    "the worker's parts need torch")
    old = _run(old_python, tmp_path / "old", "--tiny", str(tiny_checkpoint))
    _check_old(old)
    new = _run(sys.executable, tmp_path / "new", "--tiny", str(tiny_checkpoint), "--no-finetune")
    assert _differences(old["in_process"], new["in_process"]) == []
    worker = old["worker"]
    assert worker["segment_stream_events"] == ["loaded", "slice", "slice", "done"]
    if old["versions"]["torch"] == new["versions"]["torch"]:
        assert worker["segment_stream_labels"] == new["worker"]["segment_stream_labels"]
    assert (worker["finetune_rc"], worker["finetune_tail"], worker["finetune_versions"]) == (0, "", ["v0002"])


@pytest.mark.parametrize("tag, z", [("1.25", 1.25), ("2.5\\2.5 ", 2.5), (None, 1.0), ("", 1.0), ("-1.25", 1.0),
                                    ("nan", 1.0), ("abc", 1.0)])
def test_one_dicom_slice_gets_its_spacing_between_slices_on_every_simpleitk(tag, z):
    """What the old-numpy run found: SimpleITK 2.2 (Slicer 5.6, 5.8) reads one DICOM slice as 1 mm thick, 2.4+
    as its Spacing Between Slices (0018,0088); read_ct gives the latter on both, so reports agree."""
    import SimpleITK as sitk

    from DRSegUNetLib.imageio import _one_slice_spacing

    image = sitk.Image(4, 4, 1, sitk.sitkInt16)
    image.SetSpacing((0.5, 0.5, 1.0))
    assert _one_slice_spacing(image, tag).GetSpacing() == (0.5, 0.5, z)
    two = sitk.Image(4, 4, 2, sitk.sitkInt16)  # a stack keeps the spacing its slice positions gave
    assert _one_slice_spacing(two, "1.25").GetSpacing() == (1.0, 1.0, 1.0)


def test_the_bundled_dicom_slice_reads_with_its_spacing_between_slices():
    import DRSegUNetLib
    from DRSegUNetLib.imageio import read_ct

    assert read_ct(DRSegUNetLib.sample_ct_path()).GetSpacing()[2] == pytest.approx(1.25)
