"""Self-learning (thesis §4.4.2): levels, frozen layers, resuming; the lungs/pseudolabel/selftrain
commands and evaluate --predictions on their outputs. Tiny networks on real slices, seconds each."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TESTDATA
from selftrain_helpers import FROZEN, tiny, weights

from DRSegUNetLib.cli import main
from DRSegUNetLib.config import SelfTrainConfig
from DRSegUNetLib.errors import Cancelled, InputError
from DRSegUNetLib.labelmaps import labels_for_dataset, load_label_maps, save_label_maps
from DRSegUNetLib.selftrain import run_selftrain

MINI = TESTDATA / "zenodo_mini.npz"  # 4 COVID-19-CT-Seg slices with expert lung and infection masks
CT64 = TESTDATA / "cip_ct64" / "ct-64.nrrd"  # a chest CT in HU (64x64x79)


@pytest.fixture(scope="module")
def extra_npz(tmp_path_factory):
    """Two more real 8-bit slices (COVID-19-CT-Seg, groups 0 and 1) without masks: unlabelled input."""
    with np.load(TESTDATA / "zenodo_lungs.npz") as d:
        ct, group = d["ct_uint8"][:2], d["group"][:2]
    path = tmp_path_factory.mktemp("extra") / "extra.npz"
    np.savez(path, ct_uint8=ct, group=group)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, extra_npz):
    out = tmp_path_factory.mktemp("selftrain") / "out"
    events = []
    result = run_selftrain([MINI], out, tiny(), extras=[extra_npz], device="cpu",
                           progress=lambda *a, **k: events.append((a, k)))
    return out, result, events


def test_levels_write_checkpoints_labels_metrics_and_state(run):
    out, result, events = run
    for level in (0, 1, 2):
        assert (out / f"level{level}" / "labels.npz").is_file() and (out / f"level{level}" / "metrics.json").is_file()
    assert result.checkpoints == [out / "level1" / "best.pt", out / "level2" / "best.pt"]
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"level0", "level1", "level2"}
    # Level 0 pseudo-labels only the inputs; levels 1 and 2 label the extra slices too.
    inputs0, maps0 = load_label_maps(out / "level0" / "labels.npz")
    inputs1, maps1 = load_label_maps(out / "level1" / "labels.npz")
    assert len(inputs0) == 1 and len(inputs1) == 2 and maps1[1].shape == (2, 256, 256)
    assert set(np.unique(maps0[0])) <= {0, 1, 3} and maps0[0].dtype == np.uint8
    m1 = json.loads((out / "level1" / "metrics.json").read_text())
    m2 = json.loads((out / "level2" / "metrics.json").read_text())
    assert m1["n_train_slices"] == 4 and m2["n_train_slices"] > 4  # level 2 also trains on the extra slices
    assert m1["train_config"]["lr"] == pytest.approx(SelfTrainConfig().level1_lr)
    assert m2["frozen_layers"] == ["stem.conv1", "stem.bn1"] and m2["init"] == "level1/best.pt"
    assert set(m1["vs_pseudolabels"]["by_group"]) == {"zenodo3", "zenodo5", "zenodo6"}
    stages = {a[0] for a, _ in events}
    assert {"level", "pseudolabels", "train", "epoch", "predict"} <= stages
    assert {k.get("level") for _, k in events if k} >= {0, 1, 2}


def test_level2_starts_from_level1_with_first_two_layers_unchanged(run):
    out, _, _ = run
    w1, w2 = weights(out / "level1" / "best.pt"), weights(out / "level2" / "best.pt")
    frozen = [k for k in w1 if k.startswith(FROZEN)]
    assert len(frozen) == 7  # conv weight, bias; BN weight, bias, running mean, var, count
    for k in frozen:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(w1["stem.conv2.weight"], w2["stem.conv2.weight"])
    assert not torch.equal(w1["head.weight"], w2["head.weight"])


def test_rerun_skips_finished_levels_and_redoes_changed_ones(run, extra_npz):
    out, _, _ = run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_selftrain([MINI], out, tiny(), extras=[extra_npz], device="cpu")
    assert again.skipped == ["level0", "level1", "level2"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # A third level continues from level 2 without redoing anything before it.
    more = run_selftrain([MINI], out, tiny(levels=3), extras=[extra_npz], device="cpu")
    assert more.skipped == ["level0", "level1", "level2"] and (out / "level3" / "best.pt").is_file()
    w2, w3 = weights(out / "level2" / "best.pt"), weights(out / "level3" / "best.pt")
    assert all(torch.equal(w2[k], w3[k]) for k in w2 if k.startswith(FROZEN))


def test_changed_setting_redoes_that_level_and_later_ones(tmp_path):
    out = tmp_path / "out"
    run_selftrain([MINI], out, tiny(), device="cpu")
    before = (out / "level1" / "best.pt").stat().st_mtime_ns
    result = run_selftrain([MINI], out, tiny(level2_lr=5e-4), device="cpu")
    assert result.skipped == ["level0", "level1"]
    assert (out / "level1" / "best.pt").stat().st_mtime_ns == before
    assert json.loads((out / "level2" / "metrics.json").read_text())["train_config"]["lr"] == 5e-4


def test_cosine_schedule_is_part_of_every_level_and_of_its_key(tmp_path):
    out = tmp_path / "out"
    run_selftrain([MINI], out, tiny(), device="cpu")
    result = run_selftrain([MINI], out, tiny(lr_schedule="cosine"), device="cpu")
    assert result.skipped == ["level0"]  # a new schedule redoes level 1 and everything after it
    for level in (1, 2):
        assert json.loads((out / f"level{level}" / "metrics.json").read_text())["train_config"]["lr_schedule"] == "cosine"
    with pytest.raises(InputError, match="lr_schedule must be"):
        run_selftrain([MINI], tmp_path / "bad", tiny(lr_schedule="step"), device="cpu")


def test_interrupted_level_restarts_from_its_beginning(tmp_path):
    out = tmp_path / "out"
    stop = {"now": False}

    def progress(stage, step, total, message="", **info):
        if stage == "train" and info.get("level") == 2:
            stop["now"] = True

    with pytest.raises(Cancelled):
        run_selftrain([MINI], out, tiny(), device="cpu", progress=progress, cancel=lambda: stop["now"])
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"level0", "level1"}
    assert not (out / "level2" / "labels.npz").exists()
    result = run_selftrain([MINI], out, tiny(), device="cpu")
    assert result.skipped == ["level0", "level1"] and (out / "level2" / "labels.npz").is_file()


@pytest.mark.parametrize("what,message", [
    ("labels", "cannot be read"), ("metrics", "metrics.json cannot be read"), ("values", "outside the vocabulary"),
    ("shape", "not of the inputs'"), ("checkpoint", "was not trained by this stage"), (None, None)])
def test_a_finished_stages_files_are_checked_before_reuse(run, tmp_path, what, message):
    # A rerun reused any file a finished stage had left: a truncated labels.npz or metrics.json
    # gave a traceback, wrong label values a "training diverged", and another stage's
    # checkpoint in level1/ was fine-tuned as level 1.
    import shutil

    from DRSegUNetLib.errors import CheckpointError
    from DRSegUNetLib.selftrain import stage_outputs
    from DRSegUNetLib.slices import read_slices

    out, _, _ = run
    level1 = tmp_path / "level1"
    shutil.copytree(out / "level1", level1)
    key = json.loads((out / "state.json").read_text())["stages"]["level1"]["key"]
    data = [read_slices(p) for p in json.loads((out / "state.json").read_text())["inputs"]]
    data += [read_slices(p) for p in json.loads((out / "state.json").read_text())["extras"]]
    names, maps = load_label_maps(level1 / "labels.npz")
    if what == "labels":
        raw = (level1 / "labels.npz").read_bytes()
        (level1 / "labels.npz").write_bytes(raw[: len(raw) // 2])
    elif what == "metrics":
        (level1 / "metrics.json").write_text("{ not json")
    elif what == "values":
        save_label_maps(level1 / "labels.npz", names, [np.where(m == 3, 9, m) for m in maps])
    elif what == "shape":
        save_label_maps(level1 / "labels.npz", names, [m[:, :128, :128] for m in maps])
    elif what == "checkpoint":  # level 2's checkpoint where level 1's belongs
        shutil.copy(out / "level2" / "best.pt", level1 / "best.pt")
    if message is None:
        got, metrics = stage_outputs(level1, key, data, checkpoint=True)
        assert [g.shape for g in got] == [d.hu.shape for d in data] and metrics["level"] == 1
    else:
        with pytest.raises((InputError, CheckpointError), match=message):
            stage_outputs(level1, key, data, checkpoint=True)


def test_a_stage_whose_files_fail_is_done_again_with_every_later_one(tmp_path, caplog):
    import shutil

    out = tmp_path / "out"
    run_selftrain([MINI], out, tiny(), device="cpu")
    shutil.copy(out / "level2" / "best.pt", out / "level1" / "best.pt")
    with caplog.at_level("WARNING", logger="DRSegUNetLib"):
        result = run_selftrain([MINI], out, tiny(), device="cpu")
    # Level 2 is done again too, although its own files are intact: it was built on the old level 1.
    assert result.skipped == ["level0"]
    assert any("level1 finished earlier, but its files cannot be reused" in r.getMessage() for r in caplog.records)
    state = json.loads((out / "state.json").read_text())
    from DRSegUNetLib.checkpoint import load_checkpoint

    assert load_checkpoint(out / "level1" / "best.pt").fingerprint["selftrain_key"] == state["stages"]["level1"]["key"]
    state["stages"]["level2"] = "finished"  # a record that is not a record
    (out / "state.json").write_text(json.dumps(state))
    assert run_selftrain([MINI], out, tiny(), device="cpu").skipped == ["level0", "level1"]


def test_an_input_without_lung_is_named_and_one_with_none_writes_nothing(tmp_path, caplog):
    blank = tmp_path / "blank.npz"  # a uniform body in air: no lung anywhere
    body = np.zeros((2, 64, 64), np.uint8)
    body[:, 8:56, 8:56] = 200
    np.savez(blank, ct_uint8=body)
    with caplog.at_level("WARNING", logger="DRSegUNetLib"):
        result = run_selftrain([MINI, blank], tmp_path / "out", tiny(levels=1), device="cpu")
    assert any("no lung found in" in r.getMessage() and "blank.npz" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out" / "level1" / "metrics.json").read_text())["n_train_slices"] == 4
    assert result.checkpoints
    with pytest.raises(InputError, match="no slice has lung in any input"):
        run_selftrain([blank], tmp_path / "none", tiny(levels=1), device="cpu")
    assert not (tmp_path / "none" / "level0").exists() and not (tmp_path / "none" / "state.json").exists()


def test_freezing_every_layer_is_refused_before_level1(tmp_path):
    from DRSegUNetLib.network import DRSegUNet
    from DRSegUNetLib.config import NetworkConfig
    from DRSegUNetLib.training import freeze_first_layers, weight_layers

    n = len(weight_layers(DRSegUNet(NetworkConfig(base_filters=16))))
    with pytest.raises(InputError, match=f"leaves level 2 nothing to train: the network has {n} layers"):
        run_selftrain([MINI], tmp_path / "out", tiny(frozen_layers=n), device="cpu")
    assert not (tmp_path / "out").exists()
    run_selftrain([MINI], tmp_path / "ok", tiny(levels=1, frozen_layers=n), device="cpu")  # level 1 freezes nothing
    with pytest.raises(InputError, match="leaves nothing to train"):
        freeze_first_layers(DRSegUNet(NetworkConfig(base_filters=16)), n)
    assert len(freeze_first_layers(DRSegUNet(NetworkConfig(base_filters=16)), n - 1)) == n - 1


def test_ct_volume_in_hu_is_sliced_axially(tmp_path):
    out = tmp_path / "out"
    result = run_selftrain([CT64], out, tiny(levels=1), device="cpu")
    inputs, (labels,) = load_label_maps(out / "level0" / "labels.npz")
    assert labels.shape == (79, 64, 64) and (labels == 3).sum() > 1000  # real lungs: pseudo-labelled lung
    assert result.metrics[1]["n_train_slices"] == int(labels.any(axis=(1, 2)).sum())


def test_ct_volume_in_hu_trains_and_predicts_at_the_working_pixel_size(tmp_path, monkeypatch):
    """CT with a geometry is trained on and labelled at InferenceConfig.pixel_mm, as segment
    applies the model; the labels come back on the CT's grid (ct-64: 4.17 mm pixels)."""
    import DRSegUNetLib.selftrain as st
    from DRSegUNetLib.config import InferenceConfig
    from DRSegUNetLib.inference import Predictor
    from DRSegUNetLib.orientation import axial_spacing
    from DRSegUNetLib.preprocessing import working_size

    ct = sitk.ReadImage(str(CT64))
    expected = working_size((64, 64), axial_spacing(ct.GetSpacing(), ct.GetDirection()), InferenceConfig.pixel_mm)
    assert expected is not None and expected[0] > 150
    trained, predicted = [], []
    resample, probabilities = st.resample_sample, Predictor.probabilities

    def spy_resample(sample, spacing, mm):
        out = resample(sample, spacing, mm)
        trained.append(out.hu.shape)
        return out

    def spy_probabilities(self, hu, spacing=None):
        predicted.append(self.working_size(hu.shape, spacing))
        return probabilities(self, hu, spacing)

    monkeypatch.setattr(st, "resample_sample", spy_resample)
    monkeypatch.setattr(Predictor, "probabilities", spy_probabilities)
    run_selftrain([CT64], tmp_path / "out", tiny(levels=1), device="cpu")
    assert trained and set(trained) == {expected}
    assert predicted and set(predicted) == {expected}
    _, (level1,) = load_label_maps(tmp_path / "out" / "level1" / "labels.npz")
    assert level1.shape == (79, 64, 64)


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("no_ct", "no 'ct_uint8' array (N, H, W) uint8 of 8-bit slices; it has ['images']"), ("float_ct", "uint8"), ("png", "2D picture"),
    ("twice", "given twice"), ("levels", "levels must be >= 1"), ("lr", "level2_lr must be a positive"),
    ("out_file", "not a folder"), ("no_lung", "no slice has lung"),
])
def test_bad_input_gives_one_clear_error(tmp_path, capsys, case, message):
    from PIL import Image

    no_ct = tmp_path / "no_ct.npz"
    np.savez(no_ct, images=np.zeros((2, 8, 8), np.uint8))
    float_ct = tmp_path / "float_ct.npz"
    np.savez(float_ct, ct_uint8=np.zeros((2, 8, 8), np.float32))
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    blank = tmp_path / "blank.npz"  # a uniform body in air: no lung anywhere
    body = np.zeros((2, 64, 64), np.uint8)
    body[:, 8:56, 8:56] = 200
    np.savez(blank, ct_uint8=body)
    (tmp_path / "afile").write_text("x")
    args = {"missing": [str(tmp_path / "nope.npz")], "no_ct": [str(no_ct)], "float_ct": [str(float_ct)],
            "png": [str(png)], "twice": [str(MINI), "--extra", str(MINI)], "levels": [str(MINI), "--levels", "0"],
            "lr": [str(MINI), "--level2-lr", "-1"], "out_file": [str(MINI)], "no_lung": [str(blank)]}[case]
    out = tmp_path / ("afile" if case == "out_file" else "out")
    code = main(["selftrain", *args, "--out", str(out), "--base-filters", "16", "--device", "cpu",
                 "--level1-epochs", "1", "--steps-per-epoch", "1", "--crop", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)


def test_selftrain_command_runs_and_reports_json_progress(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["selftrain", str(MINI), "--out", str(out), "--levels", "2", "--level1-epochs", "1",
                 "--level2-epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "32",
                 "--base-filters", "16", "--device", "cpu", "--json-progress"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["stage"] == "done" and len(lines[-1]["checkpoints"]) == 2
    assert {line.get("level") for line in lines if line["stage"] == "train"} == {1, 2}


# ---- lungs, pseudolabel, evaluate --predictions --------------------------------------------

def test_lungs_and_pseudolabel_of_a_ct_volume_keep_its_geometry(tmp_path):
    ct = sitk.ReadImage(str(CT64))
    for command, values in (("lungs", {0, 3}), ("pseudolabel", {0, 1, 3})):
        out = tmp_path / f"{command}.nrrd"
        assert main([command, str(CT64), str(out)]) == 0
        lab = sitk.ReadImage(str(out))
        assert lab.GetSize() == ct.GetSize() and lab.GetDirection() == ct.GetDirection()
        np.testing.assert_allclose(lab.GetSpacing(), ct.GetSpacing())
        a = sitk.GetArrayFromImage(lab)
        assert set(np.unique(a)) <= values and (a == 3).sum() > 1000
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TESTDATA / "cip_lungs" / "wholeLung-64.nrrd"))) > 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lungs.nrrd"))) > 0
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    # The expert lung mask instead of the extracted one: GGO only inside it.
    expert = TESTDATA / "cip_lungs" / "wholeLung-64.nrrd"
    assert main(["pseudolabel", str(CT64), str(tmp_path / "pe.nrrd"), "--lung-mask", str(expert)]) == 0
    pe = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pe.nrrd")))
    np.testing.assert_array_equal(pe > 0, truth)
    assert main(["lungs", str(CT64), str(tmp_path / "m.nrrd"), "--value", "1"]) == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.nrrd"))))) == {0, 1}


def test_a_lung_mask_stored_in_another_axis_order_is_used_where_its_voxels_lie(tmp_path, capsys):
    """The CIP expert mask written flipped and permuted (as another tool might store it) gives the
    same pseudo-labels as the mask itself; a mask on other voxels (shifted origin) is refused."""
    expert = sitk.ReadImage(str(TESTDATA / "cip_lungs" / "wholeLung-64.nrrd"))
    assert main(["pseudolabel", str(CT64), str(tmp_path / "plain.nrrd"), "--lung-mask",
                 str(TESTDATA / "cip_lungs" / "wholeLung-64.nrrd")]) == 0
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain.nrrd")))
    other = sitk.Flip(sitk.PermuteAxes(expert, [1, 0, 2]), [True, False, True])
    assert other.GetDirection() != expert.GetDirection()
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    assert main(["pseudolabel", str(CT64), str(tmp_path / "other.nrrd"), "--lung-mask", str(tmp_path / "other.nii.gz")]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "other.nrrd"))), plain)
    from DRSegUNetLib.pseudolabels import pseudolabel_volume

    ct = sitk.ReadImage(str(CT64))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pseudolabel_volume(ct, lung_mask=other)), plain)
    shifted = sitk.Image(expert)
    shifted.SetOrigin([o + 5.0 for o in expert.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nrrd"))
    capsys.readouterr()
    assert main(["pseudolabel", str(CT64), str(tmp_path / "s.nrrd"), "--lung-mask", str(tmp_path / "shifted.nrrd")]) == 2
    assert "does not lie on the CT's voxels" in capsys.readouterr().err and not (tmp_path / "s.nrrd").exists()
    with pytest.raises(InputError, match="does not lie on the CT's voxels"):
        pseudolabel_volume(ct, lung_mask=shifted)


@pytest.mark.parametrize("command,case,message", [
    (command, case, message) for case, message in [
        ("no_lung", "no lung found in"), ("coronal", "not a stack of 2D axial CT slices"),
        ("threshold", "between the HU of air and bone"), ("nan", "between the HU of air and bone"),
        ("npz_out", "write a volume")] for command in ("lungs", "pseudolabel")
] + [("pseudolabel", "empty_mask", "is empty")])
def test_lungs_and_pseudolabel_refuse_inputs_without_lung(tmp_path, capsys, command, case, message):
    """A body without lung, a one-voxel-thick coronal cut of a real chest CT, a threshold outside
    [air, bone], geometry-less output of a volume and an empty lung mask: exit 2, one line, nothing written."""
    ct = sitk.ReadImage(str(CT64))
    below = tmp_path / "body.nrrd"  # CT64's geometry, a soft-tissue body in air: HU, but no lung
    yy, xx = np.mgrid[:64, :64]
    body = np.where((yy - 32) ** 2 / 26 ** 2 + (xx - 32) ** 2 / 30 ** 2 < 1, 40, -1000).astype(np.int16)
    phantom = sitk.GetImageFromArray(np.repeat(body[None], 3, axis=0))
    phantom.CopyInformation(ct[:, :, :3])
    sitk.WriteImage(phantom, str(below))
    coronal = tmp_path / "coronal.nrrd"
    sitk.WriteImage(ct[:, 32:33, :], str(coronal))
    empty = tmp_path / "empty.nrrd"
    mask = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(ct)
    sitk.WriteImage(mask, str(empty))
    out = tmp_path / ("out.npz" if case == "npz_out" else "out.nrrd")
    args = {"no_lung": [str(below)], "coronal": [str(coronal)], "threshold": [str(CT64), "--threshold-hu", "500"],
            "nan": [str(CT64), "--threshold-hu", "nan"], "npz_out": [str(CT64)],
            "empty_mask": [str(CT64), "--lung-mask", str(empty)]}[case]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(TESTDATA / "cip_lungs" / "wholeLung-64.nrrd")))
    assert truth[:, 32, :].any()  # the coronal cut goes through the lungs
    capsys.readouterr()
    assert main([command, args[0], str(out), *args[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not out.exists()


def test_mask_on_grid_follows_voxels_through_permutations_and_flips_and_refuses_other_grids():
    """Geometry only (a random mask on an anisotropic grid)."""
    from DRSegUNetLib.imageio import mask_on_grid

    rng = np.random.default_rng(0)
    a = (rng.random((5, 6, 7)) > 0.5).astype(np.uint8)
    image = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.float32))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    mask = sitk.GetImageFromArray(a)
    mask.CopyInformation(image)
    for stored in (mask, sitk.Flip(mask, [True, False, False]), sitk.Flip(mask, [False, True, True]),
                   sitk.PermuteAxes(mask, [1, 0, 2]), sitk.Flip(sitk.PermuteAxes(mask, [2, 0, 1]), [True, False, True])):
        np.testing.assert_array_equal(mask_on_grid(stored, image), a)
    for change in (lambda m: m.SetOrigin((10.5, -20.0, 30.0)), lambda m: m.SetSpacing((0.7, 0.8, 2.0)),
                   lambda m: m.SetSpacing((0.8, 0.7, 2.5))):
        other = sitk.Image(mask)
        change(other)
        with pytest.raises(InputError, match="does not lie on the CT's voxels"):
            mask_on_grid(other, image)
    with pytest.raises(InputError, match="does not lie on the CT's voxels"):
        mask_on_grid(sitk.GetImageFromArray(a[:, :, :6].copy()), image)


def test_evaluate_scores_lungs_and_pseudolabels_of_an_npz_against_expert_masks(tmp_path):
    lungs, pl = tmp_path / "lungs.npz", tmp_path / "pl.npz"
    assert main(["lungs", str(MINI), str(lungs)]) == 0
    assert main(["pseudolabel", str(MINI), str(pl)]) == 0
    with np.load(pl) as d:
        assert d["labels"].shape == (4, 256, 256) and set(np.unique(d["labels"])) <= {0, 1, 3}
    out = tmp_path / "e.json"
    assert main(["evaluate", str(MINI), "--predictions", str(lungs), "--regions", "lung", "--by-group",
                 "--json", str(out)]) == 0
    e = json.loads(out.read_text())
    assert set(e["metrics"]) == {"lung"} and e["predictions"] == str(lungs) and e["model"] is None
    assert e["metrics"]["lung"]["mean"]["dice"] > 0.9  # Otsu's level (the default for 8-bit slices)
    assert set(e["by_group"]) == {"zenodo3", "zenodo5", "zenodo6"}
    assert e["by_group"]["zenodo5"]["lung"]["n_slices"] == 2
    # Pseudo-labels: the lung field is the same mask; their GGO is scored as infection.
    assert main(["evaluate", str(MINI), "--predictions", str(pl), "--json", str(out)]) == 0
    e2 = json.loads(out.read_text())
    assert e2["metrics"]["lung"]["pooled"] == e["metrics"]["lung"]["pooled"]
    assert set(e2["metrics"]) == {"infection", "lung"}


def test_evaluate_by_group_with_a_model_keeps_the_plain_metrics(tmp_path, tiny_checkpoint):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", str(MINI), "--model", str(tiny_checkpoint), "--json", str(a), "--device", "cpu"]) == 0
    assert main(["evaluate", str(MINI), "--model", str(tiny_checkpoint), "--json", str(b), "--device", "cpu",
                 "--by-group"]) == 0
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert "by_group" not in ja and ja["metrics"] == jb["metrics"]
    assert set(ja) == {"data", "model", "model_sha256", "decision", "bf16", "flip_tta", "slice_pixel_mm",
                       "slice_pixel_mm_from", "pixel_mm", "n_slices", "split_part", "split", "n_slices_in_training_part",
                       "metrics"}
    assert sum(g["lung"]["n_slices"] for g in jb["by_group"].values()) == 4


@pytest.mark.parametrize("case,message", [("count", "does not match"), ("both", "not both"),
                                          ("nolabels", "no 'labels'"), ("value", "not in the vocabulary")])
def test_evaluate_predictions_bad_input(tmp_path, capsys, tiny_checkpoint, case, message):
    bad = tmp_path / "p.npz"
    if case == "nolabels":
        np.savez(bad, masks=np.zeros((4, 256, 256), np.uint8))
    else:
        np.savez(bad, labels=np.full((3 if case == "count" else 4, 256, 256), 7 if case == "value" else 0, np.uint8))
    extra = ["--model", str(tiny_checkpoint)] if case == "both" else []
    code = main(["evaluate", str(MINI), "--predictions", str(bad), *extra, "--json", str(tmp_path / "e.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "e.json").exists()


def test_labels_for_dataset_picks_the_dataset_among_several_inputs(tmp_path):
    a, b = np.zeros((4, 8, 8), np.uint8), np.full((2, 8, 8), 3, np.uint8)
    path = tmp_path / "l.npz"
    save_label_maps(path, [str(tmp_path / "other.npz"), str(MINI)], [b, a + 1])
    np.testing.assert_array_equal(labels_for_dataset(path, MINI, 4), a + 1)
    with pytest.raises(InputError, match="does not match"):
        labels_for_dataset(path, tmp_path / "unknown.npz", 4)  # falls back to the stacked 'labels' (6 slices)


def test_label_maps_made_for_other_data_are_scored_with_a_warning(tmp_path, caplog):
    # Label maps of another file with the same slice count were scored without a word.
    maps = np.full((4, 8, 8), 3, np.uint8)
    path = tmp_path / "l.npz"
    save_label_maps(path, [str(tmp_path / "other.npz")], [maps])
    with caplog.at_level("WARNING", logger="DRSegUNetLib"):
        np.testing.assert_array_equal(labels_for_dataset(path, MINI, 4), maps)
    assert any("not of" in r.getMessage() and "other.npz" in r.getMessage() for r in caplog.records)
    caplog.clear()
    for recorded in (str(MINI), "../elsewhere/" + MINI.name):  # the second: a relative path from another folder
        save_label_maps(path, [recorded], [maps])
        with caplog.at_level("WARNING", logger="DRSegUNetLib"):
            np.testing.assert_array_equal(labels_for_dataset(path, MINI, 4), maps)
        assert not caplog.records


def test_labels_for_dataset_decompresses_only_the_chosen_input(tmp_path, monkeypatch):
    import DRSegUNetLib.labelmaps as lm

    a, b = np.zeros((4, 8, 8), np.uint8), np.full((2, 8, 8), 3, np.uint8)
    path = tmp_path / "l.npz"
    save_label_maps(path, [str(tmp_path / "other.npz"), str(MINI)], [b, a + 1])
    read = []
    real = lm.read_npz
    monkeypatch.setattr(lm, "read_npz", lambda *args, **kw: read.append(sorted(r := real(*args, **kw))) or r)
    np.testing.assert_array_equal(lm.labels_for_dataset(path, MINI, 4), a + 1)
    assert read and all("input_0" not in names for names in read), read  # the other input's labels stay packed


@pytest.mark.parametrize("command", ["lungs", "pseudolabel", "selftrain"])
def test_new_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and command in capsys.readouterr().out


def _mini(**changes):
    with np.load(MINI) as d:
        arrays = {k: d[k] for k in d.files}
    arrays.update(changes)
    return arrays


@pytest.mark.parametrize("case,message", [
    ("empty", "cannot read"), ("truncated", "cannot read"), ("not-npz", "cannot read"),
    ("text", "^\\S+d\\.npz is not an \\.npz file \\(it is not a zip archive\\); give the"),
    ("gzip", "^\\S+d\\.npz is not an \\.npz file"),
    ("lung-size", "'lung_mask' is \\(4, 256, 200\\)"), ("infection-slices", "'infection_mask' is \\(3, 256, 256\\)"),
    ("ct-2d", "non-empty \\(N, H, W\\) uint8"), ("ct-float", "not float32"), ("short-group", "'group' has shape \\(2,\\)"),
])
def test_broken_slice_npz_is_one_line_error(tmp_path, capsys, case, message):
    from DRSegUNetLib.data import read_zenodo_npz
    from DRSegUNetLib.slices import read_slices

    path = tmp_path / "d.npz"
    ct = _mini()["ct_uint8"]
    if case in ("empty", "truncated", "not-npz", "text", "gzip"):  # gzip: a .nii.gz given for an .npz
        path.write_bytes({"empty": b"", "truncated": MINI.read_bytes()[:5000], "not-npz": b"PK\x03\x04 nope",
                          "text": b"labels, not an archive\n", "gzip": b"\x1f\x8b\x08\x00 nifti"}[case])
    else:
        np.savez(path, **_mini(**{"lung-size": {"lung_mask": ct[:, :, :200]},
                                  "infection-slices": {"infection_mask": ct[:3]},
                                  "ct-2d": {"ct_uint8": ct[0]}, "ct-float": {"ct_uint8": ct.astype(np.float32)},
                                  "short-group": {"group": np.zeros(2, int)}}[case]))
    with pytest.raises(InputError, match=message):
        read_zenodo_npz(path)
    if case not in ("lung-size", "infection-slices"):  # read_slices needs no masks
        with pytest.raises(InputError, match=message):
            read_slices(path)
    out = tmp_path / "m.json"
    assert main(["evaluate", str(path), "--predictions", str(tmp_path / "p.npz"), "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not out.exists()


@pytest.mark.parametrize("labels,message", [
    (np.full((4, 256, 256), np.nan, np.float32), "float32"), (np.ones((4, 256, 256), np.float64), "float64"),
    (np.full((4, 256, 256), -1, np.int16), "label value -1 "), (np.full((4, 256, 256), 3, np.int16), None),
])
def test_evaluate_predictions_must_be_label_values(tmp_path, capsys, labels, message):
    pred = tmp_path / "p.npz"
    np.savez(pred, labels=labels)
    if message is None:
        assert labels_for_dataset(pred, MINI, 4).dtype == np.uint8
        return
    with pytest.raises(InputError, match=message):
        labels_for_dataset(pred, MINI, 4)
    pred.write_bytes(pred.read_bytes()[:300])
    assert main(["evaluate", str(MINI), "--predictions", str(pred), "--json", str(tmp_path / "m.json")]) == 2
    assert "as predictions .npz" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"val": [1]}', ""])
def test_a_bad_split_file_is_one_line_error(tmp_path, capsys, text):
    split = tmp_path / "split.json"
    split.write_text(text)
    pred = tmp_path / "p.npz"
    np.savez(pred, labels=np.zeros((4, 256, 256), np.uint8))
    assert main(["evaluate", str(MINI), "--predictions", str(pred), "--json", str(tmp_path / "m.json"),
                 "--split", str(split), "--split-part", "test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"split file {split}" in err[0]


def test_read_slices_reads_only_the_arrays_it_uses(tmp_path):
    from DRSegUNetLib.data import read_npz
    from DRSegUNetLib.slices import read_slices

    # An array that cannot be loaded (a pickle, refused with allow_pickle=False) stands in for
    # the expert masks: read_slices must never decompress it.
    path = tmp_path / "d.npz"
    np.savez(path, **_mini(), notes=np.array([{"not": "loadable"}], dtype=object))
    with pytest.raises(InputError, match="cannot read"):
        read_npz(path)
    inp = read_slices(path)
    assert inp.hu.shape == (4, 256, 256) and len(inp.groups) == 4


def test_a_state_file_of_another_format_is_refused(tmp_path):
    # An older self-training's state.json (its stage keys made otherwise) is not resumed.
    out = tmp_path / "st"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"format": "drsegunet-selftrain/1", "stages": {}}))
    with pytest.raises(InputError, match="not a state file of this version's self-training"):
        run_selftrain([MINI], out, tiny(levels=1), device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["state.json"]


