"""The scripts that make the bundled model keep working (issue 21, points 1 and 5).

``scripts/train_bundled.sh`` is the CPU command that reproduces the bundled model
(MODEL_CARD.md); ``bench/gpu_crossval.sh`` with ``CV=0`` runs the same script for a lent GPU
(``bench/device_run.sh``); ``bench/pack_zenodo.py`` makes the COVID-19-CT-Seg subset small enough
to travel to that machine. Each runs here for real, on the tiny real samples in Testing/data and
the slices without lung in data/outside_lungs, with a few steps of a step each (``EPOCH_STEPS=1``)
instead of thousands: what is checked is the plumbing (stages, data, options, resumption, export),
not the model's accuracy.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from DRSegUNetLib.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "Testing" / "data"


def _env(**kw) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, MEDSEG=str(DATA / "medseg_mini"),
               ZENODO=str(DATA / "zenodo_mini.npz"), EPOCH_STEPS="1", BATCH="2", THREADS="1")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _bash(script: str, out: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), str(out)], env=_env(**kw), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_bundled_runs_its_three_stages_exports_and_skips_finished_stages(tmp_path):
    out = tmp_path / "bundled"
    r = _bash("scripts/train_bundled.sh", out, STEPS1=2, STEPS2=1, STEPS3=1)
    assert r.returncode == 0, r.stderr + (out / "run.log").read_text()
    for n in (1, 2, 3):
        assert (out / f"stage{n}" / "DONE").is_file()
        assert not (out / f"stage{n}" / "resume.pt").exists()  # no optimiser state left behind
    model = load_checkpoint(out / "drsegunet_level1.pt")
    stage = {n: load_checkpoint(out / f"stage{n}" / "last.pt") for n in (1, 2, 3)}
    last = stage[3]
    # the export is stage 3's last epoch, in float16 where float16 holds it
    for k, v in last.state_dict.items():
        if v.dtype.is_floating_point and model.state_dict[k].dtype == torch.float16:
            assert torch.allclose(model.state_dict[k].float(), v.float(), rtol=1e-3, atol=1e-3), k
    # stage 3 adds the slices without lung, drawn a tenth as often; each stage starts from the one before
    assert sorted(Path(k).name for k in model.fingerprint["data"]) == ["medseg_mini", "train.npz", "zenodo_mini.npz"]
    assert model.fingerprint["split"] is None  # SPLIT="" : every slice trains, as for the bundled model
    assert "outside=0.1" in last.extra["command"] and "--hard-negatives 0.25" in last.extra["command"]
    assert f"--init {out / 'stage2' / 'last.pt'}" in last.extra["command"]
    assert f"--init {out / 'stage1' / 'last.pt'}" in stage[2].extra["command"]
    assert "--init" not in stage[1].extra["command"]  # from scratch
    assert [len(stage[n].extra["history"]) for n in (1, 2, 3)] == [2, 1, 1]

    # called again, it trains nothing and exports the same weights
    r = _bash("scripts/train_bundled.sh", out, STEPS1=2, STEPS2=1, STEPS3=1)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("finished before; skipped") == 3, r.stderr
    again = load_checkpoint(out / "drsegunet_level1.pt")
    assert all(torch.equal(again.state_dict[k], v) for k, v in model.state_dict.items())


@pytest.mark.parametrize("env, says", [({"STEPS1": 150}, "multiples of EPOCH_STEPS (100)"),
                                       ({"EPOCH_STEPS": 0}, "EPOCH_STEPS must be a positive whole number"),
                                       ({"MEDSEG": "/nonexistent/train50"}, "missing data: /nonexistent/train50")])
def test_train_bundled_refuses_bad_settings_before_training(tmp_path, env, says):
    kw = {"EPOCH_STEPS": 100, **env}
    r = _bash("scripts/train_bundled.sh", tmp_path / "x", **kw)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "x" / "stage1").exists()


@pytest.mark.slow
def test_the_gpu_script_trains_the_bundled_recipe_when_run_on_the_cpu(tmp_path):
    """bench/gpu_crossval.sh with CV=0 is what bench/device_run.sh runs for issue 21 on a lent GPU."""
    out = tmp_path / "gc"
    r = _bash("bench/gpu_crossval.sh", out, DEVICE="cpu", CV=0, WORKERS=0, LIMIT_S=500, FINAL_BATCH=2,
              FINAL_STEPS1=2, FINAL_STEPS2=1, FINAL_STEPS3=1)
    assert r.returncode == 0, r.stderr + (out / "run.log").read_text()
    model = load_checkpoint(out / "final" / "drsegunet_level1.pt")
    assert sorted(Path(k).name for k in model.fingerprint["data"]) == ["medseg_mini", "train.npz", "zenodo_mini.npz"]
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["cv"], settings["device"], settings["final_batch"], settings["final_steps"]) == ("0", "cpu", 2,
                                                                                                    [2, 1, 1])
    assert not (out / "crossval").exists()


def test_pack_zenodo_raises_k_until_the_subset_fits(tmp_path):
    """Six real slices made into two volumes of three; keeping every slice is over the limit that
    every 2nd slice meets, so K goes from 1 to 2 and each volume keeps its 1st and 3rd slice."""
    with np.load(DATA / "zenodo_mini.npz") as z:
        a = {k: z[k] for k in z.files}
    idx = np.array([0, 1, 2, 3, 0, 1])
    a = {k: v[idx] for k, v in a.items()}
    a["group"] = np.array([7, 7, 7, 9, 9, 9], a["group"].dtype)
    src = tmp_path / "six.npz"
    np.savez_compressed(src, **a)
    pack = [sys.executable, str(ROOT / "bench" / "pack_zenodo.py"), str(src)]
    one = tmp_path / "every1.npz"
    assert subprocess.run(pack + [str(one), "--every", "1"], capture_output=True).returncode == 0
    limit = one.stat().st_size - 1
    r = subprocess.run(pack + [str(tmp_path / "fit.npz"), "--every", "1", "--max-bytes", str(limit)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "K = 2" in r.stdout
    assert (tmp_path / "fit.npz").stat().st_size <= limit
    with np.load(tmp_path / "fit.npz") as z:
        assert z["group"].tolist() == [7, 7, 9, 9]
        assert np.array_equal(z["ct_uint8"], a["ct_uint8"][[0, 2, 3, 5]])
    r = subprocess.run(pack + [str(tmp_path / "none.npz"), "--max-bytes", "1000"], capture_output=True, text=True)
    assert r.returncode == 2 and "even one slice of each volume" in r.stderr
    assert not (tmp_path / "none.npz").exists() and list(tmp_path.glob("tmp*")) == []
