"""The CLI end to end on the bundled real CT sample, and its answers to bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, TESTDATA

from DRSegUNetLib.cli import main


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "DRSegUNetLib", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["segment", "train", "evaluate", "info"])
def test_every_command_has_help(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and command in r.stdout


@pytest.mark.slow
def test_segment_bundled_sample_end_to_end(tmp_path, sample_ct_path, bundled_model):
    import slicerio

    out = tmp_path / "labels.nii.gz"
    r = run_cli("segment", sample_ct_path, out, "--seg-nrrd", tmp_path / "s.seg.nrrd",
                "--report", tmp_path / "r.json", "--overlay", tmp_path / "o.png", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ct, lab = sitk.ReadImage(str(sample_ct_path)), sitk.ReadImage(str(out))
    assert lab.GetSize() == ct.GetSize() and lab.GetDirection() == ct.GetDirection()
    np.testing.assert_allclose(lab.GetSpacing(), ct.GetSpacing())
    np.testing.assert_allclose(lab.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    labels = sitk.GetArrayFromImage(lab)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # The sample shows bilateral COVID-19 pneumonia: lungs and infection must be found.
    assert (labels == 3).sum() > 5000 and np.isin(labels, (1, 2)).sum() > 500

    seg = slicerio.read_segmentation(str(tmp_path / "s.seg.nrrd"))
    assert slicerio.segment_names(seg) == ["Ground-glass opacity", "Consolidation", "Lung"]
    lung = slicerio.extract_segments(seg, [("Lung", 1)])["voxels"]
    assert int((lung > 0).sum()) == int(np.isin(labels, (1, 2, 3)).sum())

    rep = json.loads((tmp_path / "r.json").read_text())
    vol_ml = np.prod(ct.GetSpacing()) / 1000
    assert rep["volume_ml"]["ggo"] == pytest.approx((labels == 1).sum() * vol_ml, rel=1e-3, abs=1e-3)
    assert rep["percent_of_lung"]["infection"] == pytest.approx(
        100 * np.isin(labels, (1, 2)).sum() / np.isin(labels, (1, 2, 3)).sum(), abs=0.01)
    assert rep["inference"]["pixel_mm"] == 1.2 and rep["inference"]["decision"] == "argmax"
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.nrrd"
    text.write_text("this is not an image\n")
    png = tmp_path / "slice.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    four = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(four))
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 2], sitk.sitkVectorUInt8, 3), str(rgb))
    nan = tmp_path / "nan.nrrd"  # NIfTI writing turns NaN into 0
    a = np.full((2, 8, 8), -1000, np.float32)
    a[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(nan))
    eight = tmp_path / "eight.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 256, (2, 8, 8)).astype(np.uint8)), str(eight))
    mr = tmp_path / "mr.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 3000, (3, 8, 8)).astype(np.int16)), str(mr))
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    return {"text": (text, "not an image"), "png": (png, "2D picture"), "4d": (four, "4D"),
            "rgb": (rgb, "components"), "nan": (nan, "NaN"), "8bit": (eight, "8-bit"), "mr": (mr, "MR"),
            "missing": (tmp_path / "nope.nii", "does not exist"), "emptydir": (empty_dir, "no DICOM series")}


@pytest.mark.parametrize("case", ["text", "png", "4d", "rgb", "nan", "8bit", "mr", "missing", "emptydir"])
def test_bad_input_one_line_error_and_nothing_written(tmp_path, capsys, case, tiny_checkpoint):
    path, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "labels.nii.gz"
    code = main(["segment", str(path), str(out), "--model", str(tiny_checkpoint), "--report", str(tmp_path / "out" / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not (tmp_path / "out" / "r.json").exists()


@pytest.mark.parametrize("content,message", [(b"garbage", "not a readable"), (None, "trained for classes")])
def test_bad_checkpoint_one_line_error(tmp_path, capsys, sample_ct_path, tiny_checkpoint, content, message):
    import torch

    bad = tmp_path / "bad.pt"
    if content is not None:
        bad.write_bytes(content)
    else:
        d = torch.load(tiny_checkpoint, weights_only=True)
        d["class_names"] = ["background", "infection", "lung"]
        torch.save(d, bad)
    out = tmp_path / "labels.nrrd"
    code = main(["segment", str(sample_ct_path), str(out), "--model", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not out.exists()


def test_segment_reads_a_dicom_series_folder(tmp_path, shared_data, tiny_checkpoint):
    series = shared_data / "hu" / "cip_copdgene" / "ct-64Dicom"
    out = tmp_path / "l.nrrd"
    assert main(["segment", str(series), str(out), "--model", str(tiny_checkpoint), "--device", "cpu"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (64, 64, 79)


def test_evaluate_on_medseg_folder_and_npz(tmp_path, tiny_checkpoint):
    for data in (TESTDATA / "medseg_mini", TESTDATA / "zenodo_mini.npz"):
        out = tmp_path / (data.stem + ".json")
        assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu"]) == 0
        m = json.loads(out.read_text())["metrics"]
        expected = {"ggo", "consolidation", "infection"} if data.is_dir() else {"infection", "lung"}
        assert set(m) == expected
        for region in m.values():
            assert set(region) == {"n_slices", "n_empty_both", "mean", "std", "pooled"}
            assert set(region["mean"]) == {"dice", "iou", "precision", "recall", "f1"}


def test_evaluate_threshold_averaged_dice_and_precision_switch(tmp_path, tiny_checkpoint, capsys):
    data = TESTDATA / "medseg_mini"
    out = tmp_path / "t.json"
    assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu",
                 "--threshold-averaged", "--cpu-bf16", "off"]) == 0
    e = json.loads(out.read_text())
    assert e["bf16"] is False and e["flip_tta"] is False
    flipped = tmp_path / "f.json"
    assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(flipped), "--device", "cpu",
                 "--flip-tta", "--cpu-bf16", "off"]) == 0
    f = json.loads(flipped.read_text())
    assert f["flip_tta"] is True  # read back from the Predictor that scored
    tad = e["threshold_averaged_dice"]["medseg"]
    assert set(tad) == {"ggo", "consolidation", "infection"}
    for r in tad.values():
        assert 0.0 <= r["mean"] <= 1.0 and r["n_slices"] == e["metrics"]["ggo"]["n_slices"]
    # It scores probabilities, so it needs a model.
    lungs = tmp_path / "l.npz"
    np.savez(lungs, labels=np.zeros((1, 4, 4), np.uint8))
    assert main(["evaluate", str(data), "--predictions", str(lungs), "--threshold-averaged", "--json", str(out)]) == 2
    assert "--threshold-averaged needs the model's probabilities" in capsys.readouterr().err


def test_info_prints_config_and_parameter_count(capsys, tiny_checkpoint):
    assert main(["info", str(tiny_checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class_names"] == ["background", "ggo", "consolidation", "lung"]
    assert info["config"]["preprocess"]["hu_min"] == -1000.0


def test_segment_many_one_load_skips_finished_and_shards(tmp_path, sample_ct_path, tiny_checkpoint, caplog):
    ct = sitk.ReadImage(str(sample_ct_path))[200:264, 200:264, :]  # a real CT patch keeps this fast
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        sitk.WriteImage(ct, str(inputs / f"case{i}.nrrd"))
    (inputs / "broken.nrrd").write_text("not an image")
    out = tmp_path / "out"
    args = ["segment", str(inputs), "--out-dir", str(out), "--model", str(tiny_checkpoint), "--device", "cpu",
            "--outputs", "labels,report,seg"]
    assert main(args) == 2  # the broken file fails, the others are done
    done = sorted(p.name for p in out.iterdir())
    assert done == sorted([f"case{i}{ext}" for i in range(3) for ext in (".nii.gz", ".json", ".seg.nrrd")])
    (inputs / "broken.nrrd").unlink()
    stamp = (out / "case1.nii.gz").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert (out / "case1.nii.gz").stat().st_mtime_ns == stamp
    assert "3 already done, 0 to segment" in caplog.text
    shard_out = tmp_path / "shard"
    assert main(["segment", str(inputs), "--out-dir", str(shard_out), "--model", str(tiny_checkpoint),
                 "--shard", "1/2", "--device", "cpu"]) == 0
    assert sorted(p.name for p in shard_out.iterdir()) == ["case1.json", "case1.nii.gz"]


def test_segment_many_checks_a_read_only_out_dir_only_when_there_is_work(tmp_path, tiny_checkpoint, capsys,
                                                                          monkeypatch):
    import os

    import DRSegUNetLib.cli.segment as segment_commands

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(CT64))[:, :, 30:33], str(inputs / "one.nrrd"))
    (out / "one.nii.gz").write_bytes(b"done earlier")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(out) else real_access(p, mode))
    loaded = []
    monkeypatch.setattr(segment_commands, "load_predictor", lambda *a: loaded.append(a))
    args = ["segment", str(inputs), "--out-dir", str(out), "--model", str(tiny_checkpoint), "--outputs", "labels"]
    assert main(args) == 0  # nothing to write: the read-only folder does not matter
    (out / "one.nii.gz").unlink()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {out} (Permission denied)"
    assert loaded == []  # refused before the model was loaded


def test_pixel_size_options(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """evaluate --slice-pixel-mm gives geometry-less slices a pixel size, so the network runs
    at --pixel-mm as segment does on CT; sizes out of range are one-line errors."""
    seen = _spy_on_the_network_grid(monkeypatch)
    data = TESTDATA / "medseg_mini"
    out = tmp_path / "p.json"
    assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu",
                 "--slice-pixel-mm", "0.6", "--pixel-mm", "1.2", "--threshold-averaged"]) == 0
    # Every slice at half its size (labels and threshold-averaged Dice come from one pass).
    assert seen and all(sp == (0.6, 0.6) and size == tuple(round(n / 2) for n in shape) for shape, sp, size in seen)
    seen.clear()
    assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(tmp_path / "q.json"),
                 "--device", "cpu"]) == 0
    assert seen and all(sp is None and size is None for _, sp, size in seen)
    e = json.loads(out.read_text())
    assert e["slice_pixel_mm"] == 0.6 and e["pixel_mm"] == 1.2
    assert e["threshold_averaged_dice"]["medseg"]["ggo"]["n_slices"] == e["metrics"]["ggo"]["n_slices"] > 0
    for bad in ("-1", "0.01", "nan"):
        assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out),
                     "--slice-pixel-mm", bad]) == 2
        assert "--slice-pixel-mm must be" in capsys.readouterr().err
    assert main(["evaluate", str(data), "--predictions", str(tmp_path / "x.npz"), "--json", str(out),
                 "--slice-pixel-mm", "1.5"]) == 2
    assert "use --model, not --predictions" in capsys.readouterr().err
    assert main(["segment", str(REPO / "DRSegUNetLib" / "data" / "ny_sbu_A002304_135.dcm"), str(tmp_path / "l.nii.gz"),
                 "--model", str(tiny_checkpoint), "--pixel-mm", "-0.5"]) == 2
    assert "--pixel-mm must be" in capsys.readouterr().err and not (tmp_path / "l.nii.gz").exists()


def _spy_on_the_network_grid(monkeypatch) -> list:
    """(slice shape, spacing given, working size) of every Predictor.probabilities call."""
    from DRSegUNetLib.inference import Predictor

    seen = []
    original = Predictor.probabilities

    def spy(self, hu, spacing=None):
        seen.append((hu.shape[-2:], spacing, self.working_size(hu.shape, spacing)))
        return original(self, hu, spacing)

    monkeypatch.setattr(Predictor, "probabilities", spy)
    return seen


def _model_with(tmp_path, checkpoint, **inference):
    """A copy of ``checkpoint`` whose ModelConfig.inference says ``inference``."""
    from dataclasses import replace

    from DRSegUNetLib.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt.config = replace(ckpt.config, inference=replace(ckpt.config.inference, **inference))
    path = tmp_path / "own.pt"
    save_checkpoint(ckpt, path)
    return path


def test_segment_and_evaluate_apply_the_models_own_working_pixel(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """segment, segment-stream and evaluate run the network at the checkpoint's working pixel and
    decide with its rule; --pixel-mm and --decision override them; info shows the working pixel."""
    model = _model_with(tmp_path, tiny_checkpoint, pixel_mm=2.0, decision="threshold")
    ct = REPO / "DRSegUNetLib" / "data" / "ny_sbu_A002304_135.dcm"
    assert main(["segment", str(ct), str(tmp_path / "a.nii.gz"), "--model", str(model), "--device", "cpu",
                 "--report", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["inference"] | {"bf16": None} == \
        {"decision": "threshold", "flip_tta": False, "pixel_mm": 2.0, "bf16": None}
    assert main(["segment", str(ct), str(tmp_path / "b.nii.gz"), "--model", str(model), "--device", "cpu",
                 "--report", str(tmp_path / "b.json"), "--pixel-mm", "0", "--decision", "argmax"]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())["inference"]
    assert rep["pixel_mm"] is None and rep["decision"] == "argmax"
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["working_pixel_mm"] == 2.0 and info["config"]["inference"]["decision"] == "threshold"
    # evaluate: COVID-19-CT-Seg slices (1.5 mm) at the model's 2.0 mm, then at --pixel-mm 3.0.
    seen = _spy_on_the_network_grid(monkeypatch)
    out = tmp_path / "e.json"
    assert main(["evaluate", str(TESTDATA / "zenodo_mini.npz"), "--model", str(model), "--json", str(out),
                 "--device", "cpu", "--split", ""]) == 0
    e = json.loads(out.read_text())
    assert (e["slice_pixel_mm"], e["pixel_mm"], e["decision"]) == (1.5, 2.0, "threshold")
    assert seen and all(size == (192, 192) for _, _, size in seen)
    seen.clear()
    assert main(["evaluate", str(TESTDATA / "zenodo_mini.npz"), "--model", str(model), "--json", str(out),
                 "--device", "cpu", "--split", "", "--pixel-mm", "3.0"]) == 0
    assert json.loads(out.read_text())["pixel_mm"] == 3.0 and all(size == (128, 128) for _, _, size in seen)


def test_evaluate_takes_the_data_sets_pixel_size_by_default(tmp_path, tiny_checkpoint, capsys, caplog, monkeypatch):
    """COVID-19-CT-Seg slices are 1.5 mm pixels unless the .npz or a sidecar JSON says otherwise,
    MedSeg folders are on their own grid; --slice-pixel-mm 0 gives the own grid (the old default)
    and the JSON and a note on stderr say which."""
    import shutil

    seen = _spy_on_the_network_grid(monkeypatch)
    out = tmp_path / "e.json"

    def evaluate(data, *extra):
        seen.clear()
        caplog.clear()
        with caplog.at_level("INFO", logger="DRSegUNetLib"):
            assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu",
                         "--split", "", *extra]) == 0
        return json.loads(out.read_text()), caplog.text

    e, err = evaluate(TESTDATA / "zenodo_mini.npz")
    assert (e["slice_pixel_mm"], e["slice_pixel_mm_from"], e["pixel_mm"]) == (1.5, "data set", 1.2)
    assert seen and all(sp == (1.5, 1.5) and size == (320, 320) for _, sp, size in seen)
    assert "1.5 mm pixels (the data set's)" in err and "1.2 mm (the model's)" in err
    e, err = evaluate(TESTDATA / "zenodo_mini.npz", "--slice-pixel-mm", "0")
    assert (e["slice_pixel_mm"], e["slice_pixel_mm_from"], e["pixel_mm"]) == (None, "option", None)
    assert seen and all(sp is None and size is None for _, sp, size in seen) and "own grid" in err
    e, err = evaluate(TESTDATA / "medseg_mini")
    assert (e["slice_pixel_mm"], e["slice_pixel_mm_from"], e["pixel_mm"]) == (None, "data set", None)
    assert seen and all(sp is None for _, sp, _ in seen) and "no pixel size" in err
    # A sidecar JSON beside the data, and a pixel_mm array inside the .npz (which wins).
    data = tmp_path / "z.npz"
    shutil.copy(TESTDATA / "zenodo_mini.npz", data)
    (tmp_path / "z.json").write_text(json.dumps({"pixel_mm": 2.4}))
    e, _ = evaluate(data)
    assert e["slice_pixel_mm"] == 2.4 and all(size == (512, 512) for _, _, size in seen)
    folder = tmp_path / "medseg"
    shutil.copytree(TESTDATA / "medseg_mini", folder)
    (tmp_path / "medseg.json").write_text(json.dumps({"pixel_mm": 0.6}))
    e, _ = evaluate(folder)
    assert e["slice_pixel_mm"] == 0.6 and all(size == tuple(round(n / 2) for n in shape) for shape, _, size in seen)
    arrays = dict(np.load(TESTDATA / "zenodo_mini.npz"))
    np.savez(data, **arrays, pixel_mm=np.array([1.5, 1.5, 2.4, 2.4]))
    e, err = evaluate(data)
    assert e["slice_pixel_mm"] == [1.5, 2.4] and {sp for _, sp, _ in seen} == {(1.5, 1.5), (2.4, 2.4)}
    for bad, message in ((np.array([1.5, 2.4]), "2 values for 4 slices"), (np.array(9.0), "pixel_mm must be")):
        np.savez(data, **arrays, pixel_mm=bad)
        assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu",
                     "--split", ""]) == 2
        assert message in capsys.readouterr().err


def test_train_takes_a_source_at_a_pixel_size(tmp_path, capsys, monkeypatch):
    """train --slice-pixel-mm zenodo=2.4 trains on COVID-19-CT-Seg slices resampled from
    2.4 mm to the 1.2 mm working pixel (256 px -> 512 px); the checkpoint records it."""
    import DRSegUNetLib.training as training
    from DRSegUNetLib.checkpoint import load_checkpoint

    seen = []
    real_train = training.train

    def spy(train_samples, val_samples, *a, **k):
        seen.extend(s.hu.shape for s in train_samples)
        return real_train(train_samples, val_samples, *a, **k)

    monkeypatch.setattr(training, "train", spy)
    out = tmp_path / "run"
    assert main(["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(out), "--split", "", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "32", "--base-filters", "16",
                 "--slice-pixel-mm", "zenodo=2.4", "--device", "cpu"]) == 0
    assert seen and set(seen) == {(512, 512)}
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.fingerprint["slice_pixel_mm"] == {"zenodo": 2.4} and ckpt.fingerprint["pixel_mm"] == 1.2
    assert ckpt.config.inference.pixel_mm == 1.2  # the model's working pixel, which segment applies
    # --pixel-mm is the model's working pixel; a run from --init keeps the starting model's.
    seen.clear()
    assert main(["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(tmp_path / "wide"), "--split", "",
                 "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "32",
                 "--slice-pixel-mm", "zenodo=1.2", "--pixel-mm", "2.4", "--device", "cpu"]) == 0
    assert set(seen) == {(128, 128)} and load_checkpoint(tmp_path / "wide" / "last.pt").config.inference.pixel_mm == 2.4
    seen.clear()
    assert main(["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(tmp_path / "again"), "--split", "",
                 "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "32",
                 "--slice-pixel-mm", "zenodo=1.2", "--init", str(tmp_path / "wide" / "last.pt"), "--device", "cpu"]) == 0
    assert set(seen) == {(128, 128)} and load_checkpoint(tmp_path / "again" / "last.pt").config.inference.pixel_mm == 2.4
    assert main(["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(tmp_path / "own"), "--split", "",
                 "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "1", "--crop", "32",
                 "--init", str(tmp_path / "wide" / "last.pt"), "--pixel-mm", "0", "--device", "cpu"]) == 0
    assert load_checkpoint(tmp_path / "own" / "last.pt").config.inference.pixel_mm == 0.0  # the own grid
    for bad, message in (("zenodo=9", "SOURCE=MM"), ("medseg=1.5", "names ['medseg']")):
        assert main(["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(tmp_path / "x"), "--split", "",
                     "--slice-pixel-mm", bad]) == 2
        assert message in capsys.readouterr().err


def test_train_resume_continues_a_stopped_run(tmp_path, capsys, monkeypatch):
    """train writes resume.pt after every epoch; a run stopped in its second epoch and run again
    with --resume ends with the weights of an uninterrupted run, and without resume.pt."""
    import torch

    import DRSegUNetLib.training as training
    from DRSegUNetLib.checkpoint import load_checkpoint

    args = lambda out: ["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(out), "--split", "",  # noqa: E731
                        "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "1", "--crop", "32",
                        "--base-filters", "4", "--ema", "0.9", "--bf16", "off", "--device", "cpu"]
    assert main(args(tmp_path / "through")) == 0
    real_train, calls = training.train, []

    def stopped(*a, **k):  # the second epoch's first step is not taken
        return real_train(*a, **{**k, "cancel": lambda: calls.append(1) or len(calls) == 3})

    monkeypatch.setattr(training, "train", stopped)
    assert main(args(tmp_path / "run")) != 0
    assert (tmp_path / "run" / "resume.pt").exists()
    monkeypatch.setattr(training, "train", real_train)
    assert main(args(tmp_path / "run") + ["--resume"]) == 0
    assert not (tmp_path / "run" / "resume.pt").exists() and not (tmp_path / "through" / "resume.pt").exists()
    a, b = (load_checkpoint(tmp_path / d / "last.pt").state_dict for d in ("through", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(args(tmp_path / "w") + ["--workers", "1", "--resume"]) == 2
    assert "workers 0" in capsys.readouterr().err


def test_train_refuses_a_split_that_leaves_no_training_slices(tmp_path, capsys):
    # The default split holds groups 3, 5 and 6 out: all four slices of zenodo_mini. Before,
    # train stopped with a ValueError traceback ("no training samples").
    assert main(["train", str(TESTDATA / "zenodo_mini.npz"), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no training slices" in err and "validation (2) or test (2)" in err and "all.json" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_segment_stream_fills_the_shared_array_and_checks_it(tmp_path, tiny_checkpoint, capsys):
    """The Slicer module's worker: the labels segment writes, one JSON line per slice written."""
    ct = TESTDATA / "cip_ct64" / "ct-64.nrrd"
    shape = sitk.ReadImage(str(ct)).GetSize()[::-1]
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(shape, np.uint8))
    assert main(["segment-stream", str(ct), str(labels), "--model", str(tiny_checkpoint), "--device", "cpu",
                 "--batch-size", "16"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    slices = [e["index"] for e in events if e["stage"] == "slice"]
    assert sorted(slices) == list(range(len(slices))) and events[-1]["stage"] == "done"
    assert events[0]["stage"] == "loaded" and events[0]["settings"]["pixel_mm"] == 1.2
    assert main(["segment", str(ct), str(tmp_path / "ref.nrrd"), "--model", str(tiny_checkpoint), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(labels), sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ref.nrrd"))))
    np.save(labels, np.zeros(shape[1:], np.uint8))  # not the CT's shape
    assert main(["segment-stream", str(ct), str(labels), "--model", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert "the CT needs uint8" in capsys.readouterr().err


CT64 = TESTDATA / "cip_ct64" / "ct-64.nrrd"


def _ct_copy(tmp_path, name="ct.nii.gz"):
    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(CT64)), str(path))
    return path


@pytest.mark.parametrize("case", ["same", "dot-path", "report", "overlay", "out-dir", "lungs", "pseudolabel", "lung-mask"])
def test_an_output_that_is_the_input_is_refused(tmp_path, capsys, case):
    ct = _ct_copy(tmp_path)
    before = ct.read_bytes()
    model = str(tmp_path / "no-model.pt")  # refused before the model would load
    argv = {"same": ["segment", ct, ct, "--model", model],
            "dot-path": ["segment", ct, tmp_path / "." / "ct.nii.gz", "--model", model],
            "report": ["segment", ct, tmp_path / "l.nii.gz", "--report", ct, "--model", model],
            "overlay": ["segment", ct, tmp_path / "l.nii.gz", "--overlay", ct, "--model", model],
            "out-dir": ["segment", ct, "--out-dir", tmp_path, "--model", model],
            "lungs": ["lungs", ct, ct],
            "pseudolabel": ["pseudolabel", ct, ct],
            "lung-mask": ["pseudolabel", ct, tmp_path / "m.nii.gz", "--lung-mask", tmp_path / "m.nii.gz"]}[case]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "is the input" in err[-1] and "Traceback" not in "\n".join(err)
    assert ct.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


@pytest.mark.parametrize("name", ["l.png", "l.hdr", "l.mhd", "l.nhdr", "l.foo", "labels", "folder"])
def test_label_map_outputs_must_be_single_file_volumes(tmp_path, capsys, name):
    ct = _ct_copy(tmp_path)
    out = tmp_path / name
    if name == "folder":
        out.mkdir()
    # Refused before the model loads (a missing model would be the other error).
    assert main(["segment", str(ct), str(out), "--model", str(tmp_path / "no-model.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("single-file 3D format" in err[0] or "is a folder" in err[0])
    assert main(["lungs", str(ct), str(out)]) == 2
    assert ".npz" in capsys.readouterr().err  # lungs also writes .npz
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"ct.nii.gz", out.name} if name == "folder" else {"ct.nii.gz"})


def test_label_map_named_like_two_extensions_is_written_there(tmp_path):
    from DRSegUNetLib.imageio import write_image

    image = sitk.ReadImage(str(CT64))
    for name in ("a.nii.nii.gz", "img.nii", "b.img.nii", "c.hdr.nrrd"):
        write_image(image, tmp_path / name)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))).sum() == sitk.GetArrayFromImage(image).sum()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.nii.gz", "b.img.nii", "c.hdr.nrrd", "img.nii"]


def test_os_errors_are_one_line(tmp_path, capsys, tiny_checkpoint):
    assert main(["segment", "--list", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing.txt'} (No such file or directory)"]
    (tmp_path / "file").write_text("")
    assert main(["segment", str(CT64), "--out-dir", str(tmp_path / "file"), "--model", str(tiny_checkpoint)]) == 2
    assert "is a file" in capsys.readouterr().err
    slab = tmp_path / "slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(CT64))[:, :, 30:33], str(slab))
    out = tmp_path / "file" / "l.nii.gz"  # in a folder that cannot be made
    assert main(["segment", str(slab), str(out), "--model", str(tiny_checkpoint), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {tmp_path / 'file'} (Not a directory)" and "Traceback" not in "\n".join(err)


def test_evaluate_never_writes_its_json_over_an_input(tmp_path, capsys, tiny_checkpoint):
    import shutil

    data = tmp_path / "z.npz"
    shutil.copy(TESTDATA / "zenodo_mini.npz", data)
    model = tmp_path / "m.pt"
    shutil.copy(tiny_checkpoint, model)
    before = data.read_bytes(), model.read_bytes()
    for json_out in (data, model, tmp_path / "." / "m.pt"):
        assert main(["evaluate", str(data), "--model", str(model), "--json", str(json_out), "--device", "cpu"]) == 2
        assert "is the input" in capsys.readouterr().err
    assert (data.read_bytes(), model.read_bytes()) == before


def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    import os


    worked = []
    monkeypatch.setattr("DRSegUNetLib.data.read_dataset", lambda *a, **k: worked.append(a))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    out = locked / "new" / "e.json"  # the missing folder would be made in "locked"
    assert main(["evaluate", str(TESTDATA / "zenodo_mini.npz"), "--model", str(tiny_checkpoint),
                 "--json", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {locked} (Permission denied)"
    assert worked == [] and list(locked.iterdir()) == []


def test_atomic_write_names_the_callers_file_when_it_cannot_write(tmp_path, monkeypatch):
    import tempfile

    from DRSegUNetLib.atomic import atomic_write_bytes

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.json.abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as e:
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert e.value.filename == str(tmp_path / "x.json")


@pytest.mark.parametrize("argv", [["finetune", "--epochs", "0"], ["finetune", "--batch-size", "0"],
                                  ["finetune", "--crop", "0"], ["finetune", "--lr", "-1"], ["finetune", "--lr", "nan"],
                                  ["finetune", "--frozen-layers", "-1"], ["finetune", "--gate-regions", "ggo,lesion"],
                                  ["finetune", "--gate-regions", ","], ["finetune", "--seed", "-1"], ["train", "x", "--out", "o", "--epochs", "0"],
                                  ["train", "x", "--out", "o", "--select-regions", "ggo,lesion"],
                                  ["evaluate", "x", "--model", "m", "--regions", "lungs"],
                                  ["segment", "a", "b", "--threads", "-2"]])
def test_option_values_out_of_range_are_argument_errors(argv, capsys):
    if argv[0] == "finetune":
        argv = [*argv, "--corrections", "c", "--store", "s"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {argv[1] if argv[0] == 'finetune' else argv[-2]}" in capsys.readouterr().err


def _corrections(root, n=2):
    from DRSegUNetLib.store import CorrectionsStore

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(CT64))).astype(np.float32)
    store = CorrectionsStore(root)
    for z in range(30, 30 + 10 * n, 10):
        labels = np.where(ct[z] < -500, 3, 0).astype(np.uint8)
        labels[20:30, 20:30] = 1
        store.add(ct[z], labels, (1.0, 1.0), "ct-64", z)
    return store


def test_finetune_that_diverges_adds_no_version(tmp_path, capsys, tiny_checkpoint):
    from DRSegUNetLib.store import ModelStore

    _corrections(tmp_path / "c")
    models = tmp_path / "models"
    argv = ["finetune", "--corrections", str(tmp_path / "c"), "--store", str(models), "--model", str(tiny_checkpoint),
            "--steps", "3", "--crop", "32", "--device", "cpu", "--activate", "always"]
    assert main(argv + ["--lr", "1e12"]) == 2
    assert "fine-tuning diverged" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not models.exists() or not any(p.name.startswith("v") for p in models.iterdir())
    assert main(argv + ["--steps", "1"]) == 0
    assert ModelStore(models).active().version == 2
    assert main(argv + ["--lr", "1e12"]) == 2
    assert ModelStore(models).active().version == 2 and [v.version for v in ModelStore(models).versions()] == [2]


def test_finetune_refuses_a_damaged_correction(tmp_path, capsys, tiny_checkpoint):
    store = _corrections(tmp_path / "c", n=1)
    (cid,) = store.ids()
    (tmp_path / "c" / f"{cid}.npz").write_bytes(b"")
    assert main(["finetune", "--corrections", str(tmp_path / "c"), "--store", str(tmp_path / "m"),
                 "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and cid in err[0] and not (tmp_path / "m").exists()


def test_an_extra_output_that_is_a_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    ct = _ct_copy(tmp_path)
    (tmp_path / "overlays").mkdir()
    argv = ["segment", ct, tmp_path / "l.nii.gz", "--report", tmp_path / "r.json", "--overlay", tmp_path / "overlays",
            "--model", tmp_path / "no-model.pt"]
    assert main([str(a) for a in argv]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "overlays"]


def test_segment_writes_its_outputs_all_or_nothing(tmp_path, sample_ct_path, tiny_checkpoint, monkeypatch, capsys):
    import DRSegUNetLib.imageio as imageio

    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(sample_ct_path))[200:232, 200:232, :], str(ct))
    outs = {"labels": tmp_path / "l.nii.gz", "seg": tmp_path / "s.seg.nrrd", "report": tmp_path / "r.json",
            "overlay": tmp_path / "o.png"}
    for p in outs.values():
        p.write_text("old")
    args = ["segment", str(ct), str(outs["labels"]), "--seg-nrrd", str(outs["seg"]), "--report", str(outs["report"]),
            "--overlay", str(outs["overlay"]), "--model", str(tiny_checkpoint), "--device", "cpu"]

    def disk_full(image, path, compress=True):  # the label map, written last, fails
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(imageio, "write_image", disk_full)
    assert main(args) == 2
    # one line naming the label map, not the temporary file it was being written to
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {outs['labels']} (No space left on device)"
    assert all(p.read_text() == "old" for p in outs.values())  # the seg, report and overlay were not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nrrd", *(p.name for p in outs.values())])
    monkeypatch.undo()
    assert main(args) == 0
    assert all(p.read_bytes() != b"old" for p in outs.values())
    assert sitk.ReadImage(str(outs["labels"])).GetSize() == (32, 32, sitk.ReadImage(str(ct)).GetSize()[2])
