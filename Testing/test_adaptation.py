"""Level 2 on accepted corrections (issue 18): BatchNorm, the loss, `known=infection`, the
corrections CLI, uncertainty, and the gate that keeps a worse model from becoming active."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TESTDATA

from DRSegUNetLib.adaptation import (REFERENCE_CACHE, CorrectionSlice, GateResult, adaptation_data_path,
                                     cached_reference, finetune, reference_key, remember_reference, score_samples,
                                     load_adaptation_data, preset, split_holdout)
from DRSegUNetLib.checkpoint import load_checkpoint
from DRSegUNetLib.config import InferenceConfig
from DRSegUNetLib.inference import Predictor
from DRSegUNetLib.cli import main
from DRSegUNetLib.data import labels_to_allowed, read_npz, read_zenodo_npz, zenodo_allowed
from DRSegUNetLib.store import CorrectionsStore, ModelStore
from DRSegUNetLib.training import marginal_soft_dice, region_soft_dice, set_train_mode
from DRSegUNetLib.vocabulary import GGO, LUNG

CT64 = TESTDATA / "cip_ct64" / "ct-64.nrrd"
LUNG64 = TESTDATA / "cip_lungs" / "wholeLung-64.nrrd"
ZENODO_MINI = TESTDATA / "zenodo_mini.npz"


def _zenodo_labels(lung: np.ndarray, infection: np.ndarray) -> np.ndarray:
    """The experts' COVID-19-CT-Seg masks in our vocabulary (the lesion type is unknown: GGO stands for it)."""
    labels = np.where(lung > 0, LUNG, 0).astype(np.uint8)
    labels[infection > 0] = GGO
    return labels


# ----------------------------------------------------------------- BatchNorm and the loss


def _batchnorm_means(model):
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("mode, kept", [("frozen", True), ("train", False)])
def test_frozen_batchnorm_keeps_the_starting_models_statistics(tiny_checkpoint, mode, kept):
    model = load_checkpoint(tiny_checkpoint).build_model()
    before = _batchnorm_means(model)
    weights = [p.clone() for p in model.parameters()]
    set_train_mode(model, [], mode)
    x = torch.from_numpy(read_zenodo_npz(ZENODO_MINI)[0].hu[None, None, :64, :64] / 500.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).mean().backward()
    opt.step()
    same = [torch.equal(a, b) for a, b in zip(before, _batchnorm_means(model))]
    assert all(same) if kept else not any(same)
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # still trained


def test_set_train_mode_refuses_an_unknown_batchnorm_mode(tiny_checkpoint):
    with pytest.raises(ValueError, match="BatchNorm mode"):
        set_train_mode(load_checkpoint(tiny_checkpoint).build_model(), [], "eval")


def test_known_infection_is_the_covid19_ct_seg_annotation():
    """A correction with lung and the lesion outline checked allows what the experts' masks allow."""
    d = read_npz(ZENODO_MINI)
    for lung, inf in zip(d["lung_mask"], d["infection_mask"]):
        labels = _zenodo_labels(lung, inf)
        np.testing.assert_array_equal(labels_to_allowed(labels, ("lung", "infection")), zenodo_allowed(lung, inf))
        # infection alone leaves lung vs background open outside the lesions
        only = labels_to_allowed(labels, ("infection",))
        assert set(np.unique(only[inf > 0])) == {0b0110} and set(np.unique(only[inf == 0])) == {0b1001}


def test_region_dice_sees_the_extent_of_a_lesion_of_open_type():
    """Class Dice is blind to an outline whose type is open (the cause of issue 18's shrinking lesions)."""
    d = read_npz(ZENODO_MINI)
    k = int(np.argmax(d["infection_mask"].sum(axis=(1, 2))))
    allowed = torch.from_numpy(zenodo_allowed(d["lung_mask"][k], d["infection_mask"][k]))[None]
    lung, inf = (torch.from_numpy(d[n][k] > 0)[None] for n in ("lung_mask", "infection_mask"))

    def logits(lesion_found: bool) -> torch.Tensor:
        out = torch.full((1, 4, *allowed.shape[1:]), -5.0)
        out[:, 0][~lung] = 5.0
        out[:, 3][lung] = 5.0
        if lesion_found:
            out[:, 1][inf] = 10.0
        return out

    assert region_soft_dice(logits(True), allowed) < region_soft_dice(logits(False), allowed) - 0.2
    assert marginal_soft_dice(logits(True), allowed) == pytest.approx(float(marginal_soft_dice(logits(False), allowed)), abs=0.02)


# ----------------------------------------------------------------- gate and hold-out


def test_gate_refuses_a_reference_drop_beyond_the_tolerance():
    ok = GateResult({"ggo": 0.55, "lung": 0.97}, {"ggo": 0.54, "lung": 0.97}, {}, {}, 0.02, 14, 0)
    bad = GateResult({"ggo": 0.55, "lung": 0.97}, {"ggo": 0.50, "lung": 0.98}, {}, {}, 0.02, 14, 0)
    worse_held = GateResult({"ggo": 0.55}, {"ggo": 0.56}, {"infection": 0.6}, {"infection": 0.55}, 0.02, 14, 1)
    assert ok.passed and not bad.passed and not worse_held.passed
    assert "ggo" in bad.reasons[0] and "held-out" in worse_held.reasons[0]


def test_the_gate_holds_only_the_regions_it_is_given():
    before, after = {"ggo": 0.55, "consolidation": 0.35}, {"ggo": 0.55, "consolidation": 0.30}
    assert GateResult(before, after, {}, {}, 0.02, 14, 0, regions=("ggo", "infection", "lung")).passed
    held = GateResult(before, after, {}, {}, 0.02, 14, 0, regions=("ggo", "consolidation"))
    assert not held.passed and "consolidation" in held.reasons[0]
    assert held.to_dict()["regions"] == ["ggo", "consolidation"]
    assert not GateResult(before, after, {}, {}, 0.02, 14, 0).passed  # the default holds consolidation too


def test_one_corrected_slice_in_five_of_a_volume_is_held_out():
    slices = [CorrectionSlice(np.zeros((2, 2)), np.zeros((2, 2), np.uint8), (1, 1), None, f"c{i}", "ct A", i)
              for i in range(7)]
    slices += [CorrectionSlice(np.zeros((2, 2)), np.zeros((2, 2), np.uint8), (1, 1), None, "b", "ct B", 3)]
    train, held = split_holdout(slices, 5)
    assert [c.name for c in held] == ["c2"] and len(train) == 7
    assert split_holdout(slices, 0) == (slices, [])


def test_presets_keep_the_thesis_level_2_one_option_away():
    thesis = preset("thesis")
    assert (thesis.lr, thesis.frozen_layers, thesis.bn, thesis.replay_fraction, thesis.soup) == (9.8e-6, 2, "train", 0.0, 1)
    assert preset("default", lr=3e-4).lr == 3e-4
    with pytest.raises(Exception, match="preset"):
        preset("fast")


def test_the_bundled_model_ships_replay_and_reference_slices(bundled_model):
    data = load_adaptation_data(adaptation_data_path(bundled_model))
    assert len(data.replay) >= 10 and len(data.reference) >= 10
    assert {s.group for s in data.reference}.isdisjoint({s.group for s in data.replay} - {"medseg"})
    assert {s.name for s in data.reference}.isdisjoint({s.name for s in data.replay})
    assert all(s.region_truth("ggo") is not None for s in data.reference if s.group == "medseg")


# ----------------------------------------------------------------- real fine-tunes


def _zenodo_corrections(rows, shift: int = 0) -> list[CorrectionSlice]:
    d = read_npz(ZENODO_MINI)
    from DRSegUNetLib.preprocessing import eight_bit_to_hu

    out = []
    for i in rows:
        labels = _zenodo_labels(d["lung_mask"][i], d["infection_mask"][i])
        if shift:  # a harmful "correction": lesions and lungs moved away from where they are, lesions everywhere
            labels = np.roll(labels, shift, axis=(0, 1))
            labels[labels == LUNG] = GGO
        out.append(CorrectionSlice(eight_bit_to_hu(d["ct_uint8"][i]), labels, (1.5, 1.5), ("lung", "infection"),
                                   f"z{i}", f"group {int(d['group'][i])}", i))
    return out


@pytest.mark.slow
def test_a_harmful_fine_tune_is_saved_but_not_made_active(tmp_path, bundled_model, capsys):
    """Labels shifted and every lung pixel called a lesion: the gate must refuse the result."""
    store = CorrectionsStore(tmp_path / "corrections")
    for c in _zenodo_corrections([2, 3], shift=60):
        store.add(c.ct_hu, c.labels, c.spacing, c.source, c.slice_index, known=c.known)
    models = tmp_path / "models"
    rc = main(["finetune", "--corrections", str(store.root), "--store", str(models), "--steps", "12",
               "--lr", "1e-3", "--device", "cpu", "--pixel-mm", "1.2", "--json", str(tmp_path / "out.json")])
    assert rc == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["activated"] is False and out["gate"]["reasons"]
    ms = ModelStore(models, bundled=bundled_model)
    assert [v.version for v in ms.versions()] == [1, 2] and ms.active().version == 1
    assert "NOT make it active" in capsys.readouterr().err
    assert main(["models", "activate", "2", "--store", str(models)]) == 0  # the user may still override
    assert ModelStore(models, bundled=bundled_model).active().version == 2

    # The reference scores of both versions are kept in the store: a fine-tune from version 2
    # does not score its starting model again, and the kept scores are those of the saved file.
    cache = models / REFERENCE_CACHE
    data_path = adaptation_data_path(bundled_model)
    v2 = ModelStore(models, bundled=bundled_model).path_of(2)
    kept = cached_reference(cache, reference_key(v2, data_path, 1.2, "cpu"))
    assert kept == pytest.approx(out["gate"]["reference"]["after"])
    assert cached_reference(cache, reference_key(bundled_model, data_path, 1.2, "cpu")) == pytest.approx(
        out["gate"]["reference"]["before"])
    ck2 = load_checkpoint(v2)
    data = load_adaptation_data(data_path, ck2.config.eight_bit)
    fresh = score_samples(Predictor(ck2.build_model(), ck2.config, "cpu", InferenceConfig(pixel_mm=1.2)), data.reference,
                          dict(data.spacing))
    assert fresh == pytest.approx(kept, abs=1e-6)
    capsys.readouterr()
    assert main(["finetune", "--corrections", str(store.root), "--store", str(models), "--model", "2", "--steps", "1",
                 "--no-interpolation", "--device", "cpu", "--pixel-mm", "1.2", "--json-progress", "--activate", "never",
                 "--json", str(tmp_path / "again.json")]) == 0
    assert "scoring the starting model" not in capsys.readouterr().out
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["gate"]["reference"]["before"] == pytest.approx(kept)
    assert again["reference_cached"] is True and out["reference_cached"] is False
    assert (out["steps"], out["soup"]) == (12, 2) and (again["steps"], again["soup"]) == (1, 2)  # steps of each member


def test_reference_cache_round_trip_and_unreadable_files(tmp_path):
    cache = tmp_path / "reference_scores.json"
    assert cached_reference(cache, "k") is None
    remember_reference(cache, "k", {"ggo": 0.5, "lung": 0.9})
    assert cached_reference(cache, "k") == {"ggo": 0.5, "lung": 0.9} and cached_reference(cache, "other") is None
    cache.write_text("{not json")
    assert cached_reference(cache, "k") is None
    remember_reference(cache, "k2", {"ggo": 0.25})  # a garbled cache is replaced, not fatal
    assert cached_reference(cache, "k2") == {"ggo": 0.25}


@pytest.mark.slow
def test_a_short_real_fine_tune_keeps_the_reference(bundled_model):
    """Defaults, fewer steps, on two real COVID-19-CT-Seg slices of volumes outside the reference set."""
    ckpt = load_checkpoint(bundled_model)
    data = load_adaptation_data(adaptation_data_path(bundled_model), ckpt.config.eight_bit)
    outcome = finetune(ckpt, _zenodo_corrections([2, 3]), preset("default", steps=10), data, device="cpu")
    gate = outcome.gate
    assert gate.n_reference == len(data.reference) and outcome.n_replay == len(data.replay)
    for region in ("ggo", "infection", "lung"):
        assert gate.reference_after[region] >= gate.reference_before[region] - gate.tolerance, gate.summary()
    assert gate.passed


def test_a_fine_tune_trains_at_the_starting_models_working_pixel_and_keeps_it(tiny_checkpoint, monkeypatch):
    """pixel_mm None: the corrections are resampled to the model's own working pixel (2.4 mm here:
    1.5 mm slices of 256 px become 160 px) and the new model carries it; 0: the own grid."""
    from dataclasses import replace

    import DRSegUNetLib.adaptation as adaptation
    from DRSegUNetLib.config import ModelInference

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt.config = replace(ckpt.config, inference=ModelInference(pixel_mm=2.4))
    shapes = []
    monkeypatch.setattr(adaptation, "_train_steps", lambda model, init, train_s, *a, **kw: shapes.extend(
        s.hu.shape for s in train_s) or [])
    config = preset("default", steps=1, alphas=(1.0,), holdout_every=0, soup=1)
    outcome = finetune(ckpt, _zenodo_corrections([2]), config, device="cpu")
    assert shapes == [(160, 160)] and outcome.checkpoint.config.inference.pixel_mm == 2.4
    shapes.clear()
    outcome = finetune(ckpt, _zenodo_corrections([2]), config, pixel_mm=0, device="cpu")
    assert shapes == [(256, 256)] and outcome.checkpoint.config.inference.pixel_mm == 0.0


# ----------------------------------------------------------------- corrections from the command line


def _labels_file(tmp_path: Path, values=None, spacing=None) -> Path:
    lung = sitk.ReadImage(str(LUNG64))
    arr = (sitk.GetArrayFromImage(lung) > 0).astype(np.uint8) * LUNG
    if values is not None:
        arr[arr == LUNG] = values
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(lung)
    if spacing is not None:
        img.SetSpacing(spacing)
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(img, str(path))
    return path


def test_corrections_add_list_remove(tmp_path, capsys):
    labels = _labels_file(tmp_path)
    store = tmp_path / "store"
    assert main(["corrections", "add", str(CT64), str(labels), "--slices", "30,40", "--known", "lung",
                 "--store", str(store)]) == 0
    ids = capsys.readouterr().out.split()
    c = CorrectionsStore(store)
    assert len(ids) == 2 and c.ids() == sorted(ids)
    first = c.load(ids[0])
    assert first.known == ("lung",) and first.slice_index == 30 and (first.labels == LUNG).any()
    assert first.ct_hu.min() < -500  # CT in HU
    assert main(["corrections", "list", "--store", str(store), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["slice"] for x in listed] == [30, 40]
    assert main(["corrections", "remove", ids[0], "--store", str(store)]) == 0
    assert CorrectionsStore(store).ids() == [ids[1]]


@pytest.mark.parametrize("case, message", [
    ("geometry", "another spacing"), ("labels", "labels [7]"), ("range", "out of range"),
    ("known", "--known"), ("notastore", "not a corrections store")])
def test_corrections_add_refuses_bad_input_and_adds_nothing(tmp_path, capsys, case, message):
    labels = _labels_file(tmp_path, values=7 if case == "labels" else None,
                          spacing=(5.0, 5.0, 5.0) if case == "geometry" else None)
    store = tmp_path / "store"
    if case == "notastore":
        store.mkdir()
        (store / "thesis.pdf").write_bytes(b"%PDF")
    argv = ["corrections", "add", str(CT64), str(labels), "--slices", "30" if case != "range" else "30,79",
            "--store", str(store)]
    if case == "known":
        argv += ["--known", "lung,tumour"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert CorrectionsStore(store).ids() == []


def test_corrections_remove_of_an_unknown_id_says_so(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    assert main(["corrections", "remove", "nope", "--store", str(tmp_path / "store")]) == 2
    assert "no correction nope" in capsys.readouterr().err


def test_finetune_on_a_missing_corrections_folder_says_it_does_not_exist(tmp_path, capsys):
    assert main(["finetune", "--corrections", str(tmp_path / "typo"), "--store", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------- uncertainty


@pytest.mark.slow
def test_segment_report_names_the_most_uncertain_slices(tmp_path, bundled_model):
    """On a real CT volume every slice gets an uncertainty, and the report lists where to correct."""
    rep = tmp_path / "r.json"
    assert main(["segment", str(CT64), str(tmp_path / "l.nii.gz"), "--report", str(rep), "--device", "cpu"]) == 0
    r = json.loads(rep.read_text())
    u = r["slice_uncertainty"]
    assert len(u) == 79 and all(0 <= x <= 1 for x in u) and max(u) > 0
    assert r["most_uncertain_slices"][0] == int(np.argmax(u))


# ----------------------------------------------------------------- the store's active model everywhere


def _fake_version(models: Path, bundled_model: Path) -> ModelStore:
    ms = ModelStore(models, bundled=bundled_model)
    v = ms.add_version(bundled_model, {"note": "a copy of the bundled model"}, parent=1)
    ms.set_active(v)
    return ms


def test_segment_uses_the_stores_active_model_and_takes_version_numbers(tmp_path, bundled_model, sample_ct_path, caplog):
    ms = _fake_version(tmp_path / "models", bundled_model)
    rep = tmp_path / "r.json"
    assert main(["segment", str(sample_ct_path), str(tmp_path / "l.nii.gz"), "--store", str(ms.root),
                 "--report", str(rep), "--device", "cpu"]) == 0
    assert json.loads(rep.read_text())["model"] == str(ms.path_of(2))
    assert main(["segment", str(sample_ct_path), str(tmp_path / "l.nii.gz"), "--store", str(ms.root), "--model", "1",
                 "--report", str(rep), "--device", "cpu"]) == 0
    assert json.loads(rep.read_text())["model"] == str(bundled_model)


def test_segment_model_version_that_does_not_exist_says_which_there_are(tmp_path, sample_ct_path, capsys):
    assert main(["segment", str(sample_ct_path), str(tmp_path / "l.nii.gz"), "--store", str(tmp_path / "m"),
                 "--model", "7"]) == 2
    assert "has no version 7" in capsys.readouterr().err


def test_a_garbled_active_pointer_is_reported_not_silently_replaced(tmp_path, bundled_model, caplog):
    ms = _fake_version(tmp_path / "models", bundled_model)
    (ms.root / "active.json").write_text("{garbled")
    with caplog.at_level("WARNING"):
        assert ms.active().version == 1
    assert "active-model pointer" in caplog.text and "unreadable" in caplog.text
    (ms.root / "active.json").write_text('{"version": 9}')
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert ms.active().version == 1
    assert "not there" in caplog.text


# ----------------------------------------------------------------- distillation and interpolation


def test_distillation_is_zero_for_the_starting_model_and_grows_with_change():
    from DRSegUNetLib.adaptation import distillation_loss

    torch.manual_seed(0)
    old = torch.randn(2, 4, 8, 8)
    assert float(distillation_loss(old, old)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < float(distillation_loss(old + 0.1 * torch.randn_like(old), old)) < float(
        distillation_loss(old + torch.randn_like(old), old))


def test_interpolated_weights_lie_between_start_and_end(tiny_checkpoint):
    from DRSegUNetLib.adaptation import interpolate

    start = load_checkpoint(tiny_checkpoint).state_dict
    end = {k: (v + 1.0 if v.is_floating_point() else v + 5) for k, v in start.items()}
    half = interpolate(start, end, 0.5)
    k = next(k for k, v in start.items() if v.is_floating_point())
    assert torch.allclose(half[k], start[k].float() + 0.5)
    counter = next(k for k, v in start.items() if not v.is_floating_point())
    assert torch.equal(half[counter], end[counter])
    assert all(torch.equal(interpolate(start, end, 1.0)[k], end[k]) for k in start)


def test_open_type_loss_only_watches_the_ggo_consolidation_split_of_open_lesions():
    from DRSegUNetLib.adaptation import open_type_loss

    d = read_npz(ZENODO_MINI)
    allowed = torch.from_numpy(zenodo_allowed(d["lung_mask"][2], d["infection_mask"][2]))[None]
    assert bool((allowed == 0b0110).any())
    torch.manual_seed(0)
    old = torch.randn(1, 4, *allowed.shape[1:])
    assert float(open_type_loss(old, old, allowed)) == pytest.approx(0.0, abs=1e-6)
    more_lung = old.clone()
    more_lung[:, 3] += 5.0  # the lesion's extent changes, its type split does not
    assert float(open_type_loss(more_lung, old, allowed)) == pytest.approx(0.0, abs=1e-5)
    swapped = old[:, [0, 2, 1, 3]]
    assert float(open_type_loss(swapped, old, allowed)) > 0.05
    assert float(open_type_loss(swapped, old, torch.zeros_like(allowed) + 1)) == 0.0


def test_info_describes_the_stores_active_version_and_takes_version_numbers(tmp_path, bundled_model, capsys, monkeypatch):
    monkeypatch.setenv("DRSEGUNET_HOME", str(tmp_path))
    ms = _fake_version(tmp_path / "models", bundled_model)
    assert main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(ms.path_of(2)) and out["store"]["active"] == 2 and out["store"]["versions"] == [1, 2]
    assert main(["info", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(bundled_model)


def test_a_soup_averages_the_weights_of_fine_tunes_with_consecutive_seeds(tiny_checkpoint):
    """soup = 2: the new weights are the mean of the fine-tunes with seeds s and s + 1, each
    trained from the start as if alone (before the gate's interpolation, here none)."""
    import torch

    ckpt = load_checkpoint(tiny_checkpoint)
    corrections = _zenodo_corrections([2])

    def weights(**kw):
        config = preset("default", steps=2, alphas=(1.0,), holdout_every=0, crop=64, **kw)
        outcome = finetune(ckpt, corrections, config, pixel_mm=0, device="cpu")
        return outcome, outcome.checkpoint.state_dict

    _, a = weights(seed=0, soup=1)
    _, b = weights(seed=1, soup=1)
    outcome, soup = weights(seed=0, soup=2)
    changed = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert changed, "the two seeds must train differently for this test to mean anything"
    for k in changed:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2, rtol=1e-4, atol=1e-6)
    assert [h["member"] for h in outcome.history] == [0, 0, 1, 1]
