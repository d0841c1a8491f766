"""The headless script DRSegUNet/Scripts/segment.py refuses outputs it could not write before any work:
one line, exit 2 (before, it segmented the whole volume and then failed with a VTK error and a traceback)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, TESTDATA

SCRIPT = REPO / "DRSegUNet" / "Scripts" / "segment.py"
CT64 = TESTDATA / "cip_ct64" / "ct-64.nrrd"


def _run_script(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


def _script(monkeypatch):
    """The script as a module, with slicer made unimportable: the checks must come before the work."""
    monkeypatch.setitem(sys.modules, "slicer", None)
    spec = importlib.util.spec_from_file_location("drsegunet_segment_script_checks", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_missing_output_folder_is_one_line_and_exit_2_before_the_work(tmp_path, tiny_checkpoint):
    out = tmp_path / "missing" / "ct.seg.nrrd"
    t0 = time.perf_counter()
    r = _run_script("--", "--input", CT64, "--output", out, "--model", tiny_checkpoint, "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"segment.py: error: the folder of --output {tmp_path / 'missing'} does not exist; create it or write elsewhere"]
    assert time.perf_counter() - t0 < 30  # nothing was segmented (not even slicer imported)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--output", "--report"])
def test_a_read_only_output_folder_is_one_line_and_exit_2_before_the_work(tmp_path, monkeypatch, capsys, option):
    script = _script(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    paths = {"--output": tmp_path / "ct.seg.nrrd", "--report": tmp_path / "r.json"}
    paths[option] = locked / paths[option].name
    argv = ["--input", str(CT64), "--output", str(paths["--output"]), "--report", str(paths["--report"])]
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"segment.py: error: cannot write {option} {paths[option]}: the folder {locked} is not writable"]
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("case", ["folder", "parent-is-file", "suffix"])
def test_other_unwritable_outputs_are_refused_before_the_work(tmp_path, monkeypatch, capsys, case):
    script = _script(monkeypatch)
    (tmp_path / "file").write_text("")
    (tmp_path / "x.seg.nrrd").mkdir()
    out = {"folder": tmp_path / "x.seg.nrrd", "parent-is-file": tmp_path / "file" / "x.seg.nrrd",
           "suffix": tmp_path / "x.nrrd"}[case]
    assert script.main(["--input", str(CT64), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"folder": "is a folder", "parent-is-file": "is not a folder", "suffix": "must end with .seg.nrrd"}[case]
    assert len(err) == 1 and err[0].startswith("segment.py: error: ") and expected in err[0]
