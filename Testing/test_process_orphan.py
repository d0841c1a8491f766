"""A segment or fine-tune process outlives a crashed Slicer only until its next output line.

The Slicer module starts its work with ``DRSegUNetSlicer.processes.Subprocess`` in a
session of its own (so that Cancel ends the process and what it started). Nothing then
ends it when Slicer itself dies. What does: its stdout and stderr are pipes that only
Slicer reads, so once Slicer is gone, the next progress line it writes fails (EPIPE) and
the process exits. This test kills a real parent holding a real training process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "Testing" / "data" / "zenodo_mini.npz"

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs POSIX signals and /proc (Linux)")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "?")
    return state not in ("Z", "X")


def test_the_work_process_ends_when_its_parent_is_killed(tmp_path):
    parent_code = textwrap.dedent(f"""
        import importlib.util, os, sys, time
        spec = importlib.util.spec_from_file_location(
            "processes", {str(REPO / "DRSegUNet" / "DRSegUNetSlicer" / "processes.py")!r})
        processes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(processes)
        args = [sys.executable, "-m", "DRSegUNetLib", "train", {str(MINI)!r}, "--out", {str(tmp_path / "run")!r},
                "--split", "", "--epochs", "100000", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "32",
                "--base-filters", "4", "--threads", "1", "--device", "cpu", "--json-progress"]
        env = dict(os.environ, PYTHONPATH={str(REPO)!r})
        proc = processes.SubprocessRunner().start(args, env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(stream == "out" and line.startswith("{{") for stream, line in proc.readLines()):
                break
            time.sleep(0.05)
        else:
            sys.exit("the work process printed no progress in 120 s")
        print(proc._proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"parent said {line!r}"
        child = int(line)
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)  # Slicer crashes
        parent.wait(timeout=30)
        deadline = time.time() + 60
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the work process kept running after its parent died"
        # It stopped training: no checkpoint of a late epoch appears any more.
        done = sorted((tmp_path / "run").glob("*"))
        time.sleep(1.0)
        assert sorted((tmp_path / "run").glob("*")) == done
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=30)
        parent.stdout.close()
        if child is not None and _alive(child):
            try:
                os.killpg(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
