"""Checks of the weak-supervision experiment scripts of this folder (JOURNAL.md; summary in docs/weak_supervision.md).

They test the experiments, not the product, so they are not in Testing/; run them from the
repository root with ``.venv/bin/python -m pytest experiments/weak_supervision``. pytest puts
this folder on sys.path, so the scripts are imported as modules. Tiny networks on the real
slices of Testing/data (the settings of Testing/selftrain_helpers.py, as Testing/test_selftrain.py's), seconds each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "Testing"))  # for selftrain_helpers (experiments may use Testing's helpers, not the reverse)
# The user's model store must not leak into these checks (as Testing/conftest.py does).
os.environ["DRSEGUNET_HOME"] = tempfile.mkdtemp(prefix="drsegunet-experiments-home-")

import body_restriction_cap as bc  # noqa: E402
import weak_band as wb  # noqa: E402
import weak_by_size as wbs  # noqa: E402
import weak_ceiling as wc  # noqa: E402
import weak_lungfield as wl  # noqa: E402
import weak_openband as wo  # noqa: E402
import weak_seeds as ws  # noqa: E402
import weak_zsmooth as wz  # noqa: E402
from selftrain_helpers import FROZEN, tiny, weights  # noqa: E402

from DRSegUNetLib.labelmaps import labels_for_dataset, load_label_maps  # noqa: E402
from DRSegUNetLib.selftrain import run_selftrain  # noqa: E402

MINI = REPO / "Testing" / "data" / "zenodo_mini.npz"  # 4 COVID-19-CT-Seg slices with expert masks


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    from DRSegUNetLib import default_model_path

    return default_model_path()


def test_weak_ceiling_best_cut_matches_brute_force():
    # weak_ceiling.py's oracle bounds (docs/weak_supervision.md) take, per slice, the
    # best Dice over every cut of an integer score; it must equal trying each cut, with
    # expert pixels outside the allowed region counted as missed.
    rng = np.random.default_rng(3)
    for _ in range(20):
        score = rng.integers(0, 12, size=(9, 11))
        truth = rng.random((9, 11)) < 0.3
        inside = rng.random((9, 11)) < 0.7
        brute = max(wc.dice(inside & (score >= v), truth) for v in range(12))
        assert wc.best_cut_dice(score, inside, truth, 12) == pytest.approx(brute)
    # Hand case: scores 0,1,2,3 on a row, truth = the two highest -> cut at 2 gives Dice 1.
    row = np.array([[0, 1, 2, 3]])
    assert wc.best_cut_dice(row, np.ones_like(row, bool), row >= 2, 4) == 1.0
    # Truth wholly outside the allowed region: nothing can be found.
    assert wc.best_cut_dice(row, row < 2, row >= 2, 4) == 0.0
    # The area rules' top-k: exactly the k highest pixels, none for k = 0, all for k > size.
    score = np.array([[0.5, 0.9, 0.1], [0.7, 0.2, 0.8]])
    assert wc.top_k(score, 3).tolist() == [[False, True, False], [True, False, True]]
    assert not wc.top_k(score, 0).any() and wc.top_k(score, 99).all()


def test_weak_band_leaves_only_unsure_lung_pixels_open(tmp_path):
    # weak_band.py (docs/weak_supervision.md): level 2 taught only where level 1 is sure.
    from DRSegUNetLib.data import bit

    labels = np.array([[0, 1, 3, 1, 3, 0]], np.uint8)
    top = np.array([[0.4, 0.6, 0.6, 0.9, 0.95, 0.99]], np.float32)
    allowed = wb.allowed_sets(labels, top, 0.7)
    assert allowed.tolist() == [[bit(0), bit(1, 3), bit(1, 3), bit(1), bit(3), bit(0)]]  # background stays decided
    assert np.array_equal(wb.allowed_sets(labels, top, 0.0), (np.uint8(1) << labels))  # 0: every pixel decided
    # --infection-above: infection wherever P(GGO) + P(consolidation) > cut, the larger of the
    # two; a pixel the argmax called infection below the cut becomes the larger of lung/background.
    # (N=1, C=4, H=1, W=4): P(bg, GGO, cons, lung), exact in binary; P(infection) per pixel
    # 0.125, 0.75, 0.5, 0.375. Pixel 0 is lung below every cut and stays lung although P(bg) is
    # higher; pixel 2 lies exactly on the 0.5 cut, which is not above it.
    prob = np.array([[[[0.625, 0.125, 0.25, 0.5]], [[0.0625, 0.5, 0.125, 0.125]], [[0.0625, 0.25, 0.375, 0.25]],
                      [[0.25, 0.125, 0.25, 0.125]]]], np.float32)
    cut_labels = np.array([[[3, 3, 2, 1]]], np.uint8)
    assert wb.cut_infection(cut_labels, prob, 0.25).tolist() == [[[3, 1, 2, 2]]]
    assert wb.cut_infection(cut_labels, prob, 0.5).tolist() == [[[3, 1, 3, 0]]]

    run_selftrain([MINI], tmp_path / "st", tiny(levels=1), device="cpu")
    level1 = tmp_path / "st" / "level1" / "best.pt"
    out = tmp_path / "band"
    assert wb.main([str(MINI), str(level1), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2",
                    "--batch-size", "2", "--crop", "32", "--lr", "1e-3"]) == 0
    _, (labels2,) = load_label_maps(out / "labels.npz")
    assert labels2.shape == (4, 256, 256) and set(np.unique(labels2)) <= {0, 1, 2, 3}
    info = json.loads((out / "band.json").read_text())
    assert 0.0 <= info["unsure_fraction_of_lung_field"] <= 1.0 and info["n_train_slices"] >= 1
    w1, w2 = weights(level1), weights(out / "best.pt")
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith(FROZEN))
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)

    # --ensemble: the labels come from the mean of the models' probabilities (here level 1 and
    # the level 2 just trained), decided as one model decides them.
    from DRSegUNetLib.inference import Predictor
    from DRSegUNetLib.slices import read_slices

    ens = tmp_path / "ens"
    other = out / "best.pt"
    assert wb.main([str(MINI), str(level1), "--ensemble", str(other), "--out", str(ens), "--unsure-below", "0",
                    "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "32"]) == 0
    _, (ens1,) = load_label_maps(ens / "level1_labels.npz")
    _, (argmax1,) = load_label_maps(out / "level1_labels.npz")
    hu = read_slices(MINI).hu
    p1, p2 = (Predictor.from_checkpoint(c, "cpu", batch_size=8) for c in (level1, other))
    mean = (p1.probabilities(hu) + p2.probabilities(hu)) / 2
    assert np.array_equal(ens1, p1.decide_labels(mean, hu, eight_bit=True))
    alone2 = p2.labels(hu, eight_bit=True)[0]
    assert not np.array_equal(ens1, argmax1) and not np.array_equal(ens1, alone2)  # neither model alone
    assert json.loads((ens / "band.json").read_text())["ensemble"] == [str(other)]

    # --infection-above: level 2 learns level 1's output cut low, and, like the argmax labels,
    # that is cleared outside the body (restrict_to_body leaves it unchanged).
    from DRSegUNetLib.inference import restrict_to_body

    cut = tmp_path / "cut"
    assert wb.main([str(MINI), str(level1), "--out", str(cut), "--unsure-below", "0", "--infection-above", "0.01",
                    "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "32"]) == 0
    _, (cut1,) = load_label_maps(cut / "level1_labels.npz")
    assert np.isin(cut1, (1, 2)).sum() > np.isin(argmax1, (1, 2)).sum()
    assert np.array_equal(restrict_to_body(cut1, read_slices(MINI).hu, -500.0, eight_bit=True), cut1)
    assert json.loads((cut / "band.json").read_text())["infection_above"] == 0.01


def test_weak_lungfield_posterior_fill_and_rows(tmp_path, bundled_model):
    # weak_lungfield.py (docs/weak_supervision.md): the pseudo-labels in other lung fields.
    # Two lungs (columns 2-17 and 22-37 of 40; the halves split at column 19). The left one
    # has a notch cut into its back (rows 12-15, columns 8-11): no lung lies behind it, so it
    # is filled; a notch in its front, with lung behind it, is not.
    mask = np.zeros((20, 40), bool)
    mask[4:16, 2:18] = True
    mask[4:16, 22:38] = True
    mask[12:16, 8:12] = False  # dependent notch, open to the back
    mask[4:7, 8:12] = False  # notch in front: lung lies behind it
    filled = wl.posterior_fill(mask, 3.0)
    # A closing fills a notch up to where a 3-px disk no longer reaches round its corners:
    # rows 12-14 here, not the last row, which lies on the lung's back edge.
    assert filled[12:15, 8:12].all() and not filled[15, 8:12].any()
    assert not filled[4:7, 8:12].any()
    assert (filled & ~mask).sum() == 12
    assert np.array_equal(wl.posterior_fill(np.zeros((5, 5), bool), 3.0), np.zeros((5, 5), bool))
    # A slice stored upside down (back at the top, zenodo20_dev's group 8): the same fill, mirrored.
    assert np.array_equal(wl.posterior_fill(mask[::-1], 3.0, back_at_top=True), filled[::-1])

    out = tmp_path / "lf.json"
    assert wl.main([str(MINI), "--closing-mm", "15", "--posterior-fill", "20", "--json", str(out),
                    "--expert-field-labels", str(tmp_path / "pl.npz")]) == 0
    rows = {r["field"]: r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 6
    # The pseudo-labels written for the expert field: its row's scores, and that field exactly.
    with np.load(MINI) as z:
        lung, inf = z["lung_mask"] > 0, z["infection_mask"] > 0
    pl = labels_for_dataset(tmp_path / "pl.npz", MINI, len(lung))
    assert np.array_equal(pl > 0, lung)
    dice = [2 * (g & t).sum() / max(g.sum() + t.sum(), 1) for g, t in zip(pl == 1, inf)]
    assert rows["expert"]["pl_infection_dice"]["all"] == pytest.approx(np.mean(dice))
    assert rows["expert"]["lung_dice"]["all"] == 1.0 and rows["expert"]["infection_in_field"] == 1.0
    assert rows["extracted ∪ expert"]["infection_in_field"] == 1.0
    assert rows["extracted ∩ expert"]["infection_in_field"] == pytest.approx(rows["extracted"]["infection_in_field"])
    assert 0.5 < rows["extracted"]["lung_dice"]["all"] < 1.0
    assert all(0.0 <= r["pl_infection_dice"]["all"] <= 1.0 for r in rows.values())
    # --model: the lung field a network predicts (here the bundled model's), alone and joined
    # with the extraction; the union holds at least the infection either holds.
    assert wl.main([str(MINI), "--model", str(bundled_model), "--json", str(out)]) == 0
    rows = {r["field"]: r for r in json.loads(out.read_text())["rows"]}
    net, both = rows["network (--model), P(background) < 0.5"], rows["network ∪ extracted"]
    assert len(rows) == 6 and net["lung_dice"]["all"] > 0.8
    assert both["infection_in_field"] >= max(net["infection_in_field"], rows["extracted"]["infection_in_field"])


def test_weak_openband_leaves_only_a_band_round_the_lung_field_open(tmp_path):
    # weak_openband.py (docs/weak_supervision.md): level 1 not taught to call the tissue
    # right round the lung field background.
    from DRSegUNetLib.data import bit

    labels = np.zeros((1, 12), np.uint8)
    labels[0, 4:7] = (3, 1, 3)  # lung field: columns 4-6
    body = np.ones((1, 12), bool)
    body[0, 9:] = False  # outside the body from column 9
    allowed = wo.open_band_allowed(labels, body, 2.0)
    open_ = bit(0, 1, 3)
    assert allowed[0].tolist() == [bit(0), bit(0), open_, open_, bit(3), bit(1), bit(3), open_, open_, bit(0), bit(0),
                                   bit(0)]
    assert np.array_equal(wo.open_band_allowed(labels, body, 0.0), np.uint8(1) << labels)  # 0: as selftrain
    empty = np.zeros((3, 3), np.uint8)
    assert np.array_equal(wo.open_band_allowed(empty, np.ones((3, 3), bool), 5.0), np.full((3, 3), bit(0)))

    run_selftrain([MINI], tmp_path / "st", tiny(levels=1), device="cpu")
    out = tmp_path / "open"
    assert wo.main([str(MINI), str(tmp_path / "st" / "level0" / "labels.npz"), "--out", str(out), "--epochs", "1",
                    "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "32", "--base-filters", "4"]) == 0
    _, (labels1,) = load_label_maps(out / "labels.npz")
    assert labels1.shape == (4, 256, 256) and set(np.unique(labels1)) <= {0, 1, 2, 3}
    info = json.loads((out / "openband.json").read_text())
    assert info["n_train_slices"] >= 1 and 0.0 < info["band_pixels_per_field_pixel"] < 5.0


def test_body_restriction_cap_swaps_only_the_air_rule(capsys):
    # body_restriction_cap.py (docs/weak_supervision.md): restrict_to_body with another
    # air rule must be restrict_to_body itself when the rule is its own threshold.
    from DRSegUNetLib.inference import restrict_to_body
    from DRSegUNetLib.slices import read_slices

    hu = read_slices(MINI).hu
    labels = np.full(hu.shape, 3, np.uint8)
    for level in (-500.0, -800.0):
        expected = restrict_to_body(labels, hu, level)
        assert 0 < (expected == 0).sum() < expected.size  # the rule does clear something, not everything
        assert np.array_equal(bc.restrict_with_air(labels, hu < level), expected)
    assert bc.main([str(MINI), "--levels=-500"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| -500") or r.startswith("| otsu")]
    assert len(rows) == 2


def test_simpleitk_stub_lets_npz_inputs_through_and_refuses_simpleitk_use(tmp_path):
    # simpleitk_stub.py stands in for SimpleITK on the GPU machine, put in place as the package
    # SimpleITK by gpu_selftrain.sh: .npz slices are read as with SimpleITK, and any real use of
    # it fails loudly.
    from DRSegUNetLib.slices import read_slices

    (tmp_path / "SimpleITK").mkdir()
    shutil.copy(HERE / "simpleitk_stub.py", tmp_path / "SimpleITK" / "__init__.py")

    code = ("import SimpleITK, numpy as np\n"
            "from DRSegUNetLib.slices import read_slices\n"
            f"inp = read_slices({str(MINI)!r})\n"
            "print(SimpleITK.__version__, inp.hu.shape, round(float(inp.hu.mean()), 3), inp.eight_bit)\n"
            "try:\n    SimpleITK.ReadImage('x.nrrd')\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    real = read_slices(MINI)
    lines = res.stdout.splitlines()
    assert lines[0] == f"0+stub {real.hu.shape} {round(float(real.hu.mean()), 3)} True"
    assert lines[1].startswith("refused: SimpleITK.ReadImage was used")


def test_weak_zsmooth_averages_within_a_volume_only(tmp_path):
    # weak_zsmooth.py (docs/weak_supervision.md): probabilities averaged over neighbouring
    # slices of the same volume, Gaussian weights of sigma R/2, renormalised at a volume's ends.
    w = wz.weights(1)  # exp(-2) at offsets -1 and +1, 1 at 0
    assert np.allclose(w, np.array([np.exp(-2), 1, np.exp(-2)]) / (1 + 2 * np.exp(-2)))
    assert np.array_equal(wz.weights(0), [1.0])
    # Slices 0-2 are one volume, slice 3 another: (N=4, C=1, H=1, W=1).
    prob = np.array([0.0, 1.0, 0.5, 8.0], np.float32).reshape(4, 1, 1, 1)
    out = wz.smooth_over_slices(prob, np.array(["a", "a", "a", "b"]), 1).ravel()
    assert np.isclose(out[1], w[0] * 0.0 + w[1] * 1.0 + w[2] * 0.5)
    assert np.isclose(out[0], (w[1] * 0.0 + w[2] * 1.0) / (w[1] + w[2]))  # the volume's first slice
    assert np.isclose(out[2], (w[0] * 1.0 + w[1] * 0.5) / (w[0] + w[1]))
    assert out[3] == 8.0  # alone in its volume: unchanged, nothing from slice 2
    assert np.array_equal(wz.smooth_over_slices(prob, np.array(["a"] * 4), 0), prob)
    # The bundled slices are not consecutive slices of their volumes: refused before any model runs.
    with pytest.raises(SystemExit) as e:
        wz.main([str(MINI), "no_model_needed.pt", "--out", str(tmp_path / "zs")])
    assert e.value.code == 2 and not (tmp_path / "zs").exists()


def test_weak_seeds_table_and_its_refusals(tmp_path, capsys):
    # weak_seeds.py: the seeds' mean, sd, range per level; files on other slices refused.

    def write(folder, name, dice, n=10, groups=True):
        d = {"metrics": {"infection": {"n_slices": n, "mean": {"dice": dice}}}}
        if groups:
            d["by_group"] = {"zenodo0": {"infection": {"mean": {"dice": dice / 2}}}}
        (folder / f"{name}.json").write_text(json.dumps(d))

    a, b = tmp_path / "a" / "eval", tmp_path / "b" / "eval"
    a.mkdir(parents=True), b.mkdir(parents=True)
    write(a, "s0_level1", 0.2), write(a, "s1_level1", 0.3), write(b, "s2_level1", 0.4), write(a, "level0", 0.1)
    write(tmp_path, "ref", 0.25, groups=False)
    assert ws.main([str(a), str(b), "--ref", f"cpu={tmp_path / 'ref.json'}"]) == 0
    out = capsys.readouterr().out
    assert "| level 1, seeds | 3 | 0.300 | 0.100 | 0.200 | 0.400 | s0 0.200, s1 0.300, s2 0.400 |" in out
    assert "| level0 (a) | 1 | 0.100 |" in out and "| cpu | 1 | 0.250 |" in out
    assert "| zenodo0 | 0.150 (0.100-0.200) | 0.050 | – |" in out  # the ref has no groups
    write(b, "s1_level1", 0.5)  # a seed twice
    assert ws.main([str(a), str(b)]) == 2
    assert "seed 1, level 1 is in two folders" in capsys.readouterr().err
    (b / "s1_level1.json").unlink()
    write(tmp_path, "ref", 0.25, n=11)  # scored on other slices
    assert ws.main([str(a), str(b), "--ref", f"cpu={tmp_path / 'ref.json'}"]) == 2
    assert "different numbers of slices ([10, 11])" in capsys.readouterr().err


def test_weak_by_size_quartiles_and_table(tmp_path, capsys):
    # weak_by_size.py: slices split into quartiles of their expert infection area.
    edges, q = wbs.quartiles(np.arange(8))
    assert np.allclose(edges, [1.75, 3.5, 5.25]) and q.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # The bundled slices: the expert masks themselves score 1 in every quartile, nothing scores 0.
    with np.load(MINI) as z:
        inf = z["infection_mask"].astype(np.uint8)
    np.savez(tmp_path / "expert.npz", labels=inf)  # infection as GGO (1)
    np.savez(tmp_path / "none.npz", labels=np.zeros_like(inf))
    assert wbs.main([str(MINI), f"expert={tmp_path / 'expert.npz'}", f"none={tmp_path / 'none.npz'}"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| ") and r[2].isdigit() and "/" not in r]
    assert len(rows) == 4 and all(r.endswith("| 1.000 | 0.000 |") for r in rows)
    # The share table: the expert map's infection share of its field (its infection alone) is 1.
    assert "| expert | 1.000 | 1.000-1.000 |" in out and "| none | 0.000 | 0.000-0.000 |" in out
    assert out.count("| 1.000 / 1.000, x1.00 | 0.000 / 0.000, x0.00 |") == 4
    assert np.isclose(wbs.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 30, 20, 40])), 0.8)
