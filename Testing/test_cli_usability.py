"""What a new user and bad input still hit: help that names defaults, evaluate's split note and progress,
export's check of its metrics, progress lines in files, batch inputs that are skipped, errors while writing,
stale temporary files, info into a closed pipe or on a model store, a picture named .nii.gz, the overlay's slice."""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, TESTDATA

from DRSegUNetLib.cli import build_parser, main
from DRSegUNetLib.cli.common import ProgressPrinter
from DRSegUNetLib.cli.files import expand_inputs

CT64 = TESTDATA / "cip_ct64" / "ct-64.nrrd"


def _slab(tmp_path: Path, name: str = "slab.nrrd") -> Path:
    """Three real CT slices (CIP COPDGene), fast to segment."""
    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(CT64))[:, :, 30:33], str(path))
    return path


# ----------------------------------------------------------------- help (item 4)


def _commands(parser: argparse.ArgumentParser, prog: str = ""):
    yield prog or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prog} {name}".strip())


def _names_default(action: argparse.Action, text: str) -> bool:
    default = action.default
    if default is None or default is False or default == argparse.SUPPRESS:
        return True
    if "default" not in text:
        return False
    if isinstance(default, (str, list, tuple)) and not default:  # "nothing": the word is enough
        return True
    values = {str(default)} | ({f"{default:g}"} if isinstance(default, float) else set())
    if isinstance(default, str) and "/" in default:
        values.add(Path(default).name)
    return any(re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w-])", text) for v in values)


def test_every_option_of_every_command_has_help_that_names_its_default():
    problems = []
    for command, parser in _commands(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            option = "/".join(action.option_strings)
            if not action.help:
                problems.append(f"{command} {option}: no help")
                continue
            text = action.help % dict(vars(action), prog=parser.prog)  # as argparse shows it
            if not _names_default(action, text):
                problems.append(f"{command} {option}: default {action.default!r} not named in {text!r}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------- evaluate (item 4)


def test_evaluate_says_which_scored_slices_trained_the_model_and_shows_progress(tmp_path, tiny_checkpoint, capsys,
                                                                                 caplog):
    data = TESTDATA / "zenodo_mini.npz"  # 4 real slices of CT volumes (groups) 5, 5, 3 and 6
    split = tmp_path / "mine.json"
    split.write_text(json.dumps({"val": {"zenodo_groups": [5]}}))  # groups 3 and 6 train
    out = tmp_path / "e.json"
    with caplog.at_level("INFO"):
        assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu",
                     "--split", str(split)]) == 0
    e = json.loads(out.read_text())
    assert e["n_slices"] == 4 and e["n_slices_in_training_part"] == 2
    assert e["split"] == {"file": "mine.json", "model_trained_with": None, "train": 2, "val": 2, "test": 0}
    (note,) = [r for r in caplog.records if "split mine.json" in r.getMessage()]
    assert note.levelname == "WARNING"
    assert "scoring 4 slices; the split mine.json puts 2 of them in the model's training part, 2 in validation " \
           "and 0 in test: training slices inflate the scores" in note.getMessage()
    err = capsys.readouterr().err
    assert "evaluate 4/4 slice " in err  # progress on stderr
    caplog.clear()
    with caplog.at_level("INFO"):  # the default split (the bundled model's) holds all four slices out
        assert main(["evaluate", str(data), "--model", str(tiny_checkpoint), "--json", str(out), "--device", "cpu",
                     "--split-part", "test"]) == 0
    e = json.loads(out.read_text())
    assert e["n_slices"] == 2 and e["n_slices_in_training_part"] == 0 and e["split"]["test"] == 2
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("the split default.json puts 0 of them in the model's training part" in r.getMessage()
               for r in caplog.records)


def test_evaluate_says_when_the_model_was_trained_on_every_slice_of_the_data(tmp_path, caplog):
    """A model trained with ``train --split ""`` (the bundled all-data model) has no held-out slice
    in its data: the default split's test part is then training data, and evaluate says so."""
    import torch

    from DRSegUNetLib.checkpoint import Checkpoint, save_checkpoint
    from DRSegUNetLib.config import ModelConfig, NetworkConfig
    from DRSegUNetLib.data import fingerprint
    from DRSegUNetLib.network import DRSegUNet

    data = TESTDATA / "zenodo_mini.npz"
    torch.manual_seed(0)
    cfg = ModelConfig(network=NetworkConfig(base_filters=4))
    model = DRSegUNet(cfg.network).eval()
    paths = {}
    for name, fp in (("all", {"data": fingerprint([data]), "split": None}),
                     ("other_data", {"data": {"x.npz": "0" * 64}, "split": None}),
                     ("split", {"data": fingerprint([data]), "split": "default.json"})):
        paths[name] = tmp_path / f"{name}.pt"
        save_checkpoint(Checkpoint.from_model(model, cfg, fingerprint=fp), paths[name])
    out = tmp_path / "e.json"
    results = {}
    for name, path in paths.items():
        caplog.clear()
        with caplog.at_level("INFO"):
            assert main(["evaluate", str(data), "--model", str(path), "--json", str(out), "--device", "cpu",
                         "--split-part", "test"]) == 0
        results[name] = (json.loads(out.read_text()), [r for r in caplog.records if r.levelname == "WARNING"])
    e, warnings = results["all"]
    assert e["n_slices"] == 2 and e["n_slices_in_training_part"] == 2 and e["split"]["model_trained_on_every_slice"]
    assert len(warnings) == 1 and "trained on in full" in warnings[0].getMessage()
    assert "none of them is held out" in warnings[0].getMessage()
    for name in ("other_data", "split"):  # another data set, or a split that held these slices out
        e, warnings = results[name]
        assert e["n_slices_in_training_part"] == 0 and "model_trained_on_every_slice" not in e["split"], name
        assert not warnings, name


# ----------------------------------------------------------------- export (item 13)


def _other_checkpoint(tmp_path: Path) -> Path:
    import torch

    from DRSegUNetLib.checkpoint import Checkpoint, save_checkpoint
    from DRSegUNetLib.config import ModelConfig, NetworkConfig
    from DRSegUNetLib.network import DRSegUNet

    torch.manual_seed(1)
    cfg = ModelConfig(network=NetworkConfig(base_filters=4))
    path = tmp_path / "other.pt"
    save_checkpoint(Checkpoint.from_model(DRSegUNet(cfg.network).eval(), cfg), path)
    return path


def test_export_keeps_float32_where_float16_would_overflow(tmp_path):
    """A BatchNorm running variance beyond float16's range (the all-data model's decoders reach
    9e4) stays float32 in the exported file; everything else is float16, and the export gives the
    same labels as the checkpoint it came from."""
    import torch

    from DRSegUNetLib.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from DRSegUNetLib.config import ModelConfig, NetworkConfig
    from DRSegUNetLib.network import DRSegUNet

    torch.manual_seed(0)
    cfg = ModelConfig(network=NetworkConfig(base_filters=4))
    model = DRSegUNet(cfg.network).eval()
    (key,) = [k for k in model.state_dict() if k.endswith("decoders.0.block.shortcut_bn.running_var")]
    bn = model.get_submodule(key.rsplit(".", 1)[0])
    bn.running_var[:] = 9e4
    bn.weight.data[:] = 300.0  # keeps the branch's output where it was
    src, out = tmp_path / "last.pt", tmp_path / "export.pt"
    save_checkpoint(Checkpoint.from_model(model, cfg), src)
    assert main(["export", str(src), str(out)]) == 0
    ck = load_checkpoint(out)  # loads: no inf
    sd = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert sd[key].dtype == torch.float32 and float(sd[key].max()) == 9e4
    halves = [k for k, v in sd.items() if v.is_floating_point() and v.dtype == torch.float16]
    assert len(halves) == sum(v.is_floating_point() for v in sd.values()) - 1
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        a, b = model(x).argmax(1), ck.build_model().eval()(x).argmax(1)
    assert (a == b).float().mean() > 0.99


def test_export_records_only_metrics_of_the_checkpoint_it_exports(tmp_path, tiny_checkpoint, capsys):
    from DRSegUNetLib.checkpoint import load_checkpoint

    model = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, model)
    other = _other_checkpoint(tmp_path)
    data = TESTDATA / "zenodo_mini.npz"
    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    assert main(["evaluate", str(data), "--model", str(model), "--json", str(ours), "--device", "cpu"]) == 0
    assert main(["evaluate", str(data), "--model", str(other), "--json", str(theirs), "--device", "cpu"]) == 0
    assert json.loads(ours.read_text())["model"] == str(model)
    capsys.readouterr()

    out = tmp_path / "export.pt"
    assert main(["export", str(model), str(out), "--test-metrics", str(ours), str(theirs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --test-metrics {theirs} holds metrics of {other}, not of {model}: run evaluate "
                   f"--model {model} and record its JSON"]
    assert not out.exists()

    old = json.loads(ours.read_text())  # written before evaluate recorded the sha256: the path decides
    old.pop("model_sha256")
    (tmp_path / "old.json").write_text(json.dumps(old))
    old["model"] = str(other)
    (tmp_path / "old_other.json").write_text(json.dumps(old))
    predictions = dict(json.loads(ours.read_text()), model=None, model_sha256=None, predictions="l.npz")
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    for name, message in (("old_other.json", f"holds metrics of {other}"), ("pred.json", "scores saved label maps")):
        assert main(["export", str(model), str(out), "--test-metrics", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err and not out.exists()

    assert main(["export", str(model), str(out), "--test-metrics", str(ours), str(tmp_path / "old.json")]) == 0
    assert set(load_checkpoint(out).metrics["test"]) == {"zenodo_mini.npz"}


# ----------------------------------------------------------------- progress (item 14)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr(time, "time", lambda: next(clock) * 0.3)  # 0.3 s between updates
    printer = ProgressPrinter()
    for step in range(1, 11):
        printer("segment", step, 10, f"slice {step}/10")
    print("error: something", file=sys.stderr)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines[-1] == "error: something" and lines[-2] == "segment 10/10 slice 10/10"
    assert all(re.fullmatch(r"segment \d+/10 slice \d+/10", line) for line in lines[:-1])
    assert 3 <= len(lines) - 1 <= 5  # rate-limited: one a second at most, and the last step


def test_progress_is_a_bar_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    printer = ProgressPrinter()
    printer("segment", 1, 2, "slice 1/2")
    printer("segment", 2, 2, "slice 2/2")
    assert term.getvalue().startswith("\r") and "\x1b[K" in term.getvalue() and term.getvalue().endswith("\n")


def test_segment_progress_in_a_log_file_has_no_carriage_returns(tmp_path, tiny_checkpoint):
    slab = _slab(tmp_path)
    with open(tmp_path / "log.txt", "w") as log:
        r = subprocess.run([sys.executable, "-m", "DRSegUNetLib", "segment", str(slab), str(tmp_path / "l.nii.gz"),
                            "--report", str(tmp_path / "r.json"), "--model", str(tiny_checkpoint), "--device", "cpu",
                            "--threads", "1"], stderr=log, cwd=REPO, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert r.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text
    assert "segment 3/3" in text and re.search(r"^report (\d+)/\1 ", text, re.M)  # the report's progress too


# ----------------------------------------------------------------- batch inputs (item 15)


def test_batch_inputs_say_what_they_skip_and_why(tmp_path, caplog, sample_ct_path):
    folder = tmp_path / "in"
    (folder / "series").mkdir(parents=True)
    shutil.copy(sample_ct_path, folder / "series" / "IM0001")  # a DICOM series sub-folder (files without .dcm)
    (folder / "other").mkdir()
    _slab(folder, "case.nrrd")
    (folder / "notes.txt").write_text("reading list")
    with caplog.at_level("WARNING"):
        inputs = expand_inputs([str(folder)], None)
    assert inputs == [folder / "case.nrrd"]
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    message = record.getMessage()
    assert message.startswith(f"skipped 3 item(s) of {folder}: ")
    assert "notes.txt (not a volume file: .nii, .nii.gz" in message
    assert "series/ (a DICOM series folder: give it as an input of its own)" in message
    assert "other/ (a folder: folders are not searched)" in message
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert expand_inputs([str(folder / "series")], None) == [folder / "series"]  # given itself: one input
    assert not caplog.records


# ----------------------------------------------------------------- errors while writing, stale files (item 16)


@pytest.mark.parametrize("case", ["enospc-report", "enospc-json", "itk-nrrd", "silent-nifti"])
def test_a_full_disk_is_one_line_naming_the_path_and_exit_2(tmp_path, tiny_checkpoint, capsys, monkeypatch, case):
    slab = _slab(tmp_path)
    labels, report = tmp_path / "out" / ("l.nrrd" if case == "itk-nrrd" else "l.nii.gz"), tmp_path / "out" / "r.json"
    if case.startswith("enospc"):
        real_fsync = os.fsync

        def fsync(fd):  # what a full disk gives: an errno, no file name
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        if not os.path.isdir("/proc/self/fd"):
            pytest.skip("needs /proc/self/fd")
        monkeypatch.setattr(os, "fsync", fsync)
    real_write = sitk.WriteImage

    def write(image, path, *args):
        if case == "itk-nrrd":  # SimpleITK's NRRD writer on a full disk (seen writing to /dev/full)
            raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: itkNrrdImageIO.cxx:1349:\n"
                               f"ITK ERROR: NrrdImageIO(0x5562293d1ee0): Write: Error writing {path}:\n[nrrd] nrrdSave:\n"
                               "[nrrd] _nrrdEncodingRaw_write: fwrite wrote only 3808 1-sized things, not 16384 "
                               "(23.2422% of expected)\n")
        real_write(image, path, *args)
        if case == "silent-nifti":  # the NIfTI writer on a full disk: no error, a short file
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", write)
    if case == "enospc-json":
        argv = ["evaluate", str(TESTDATA / "zenodo_mini.npz"), "--model", str(tiny_checkpoint), "--json", str(report),
                "--device", "cpu"]
    else:
        argv = ["segment", str(slab), str(labels), "--report", str(report), "--model", str(tiny_checkpoint),
                "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"enospc-report": f"error: {report} (No space left on device)",
                "enospc-json": f"error: {report} (No space left on device)",
                "itk-nrrd": f"error: {labels} (could not be written: _nrrdEncodingRaw_write: fwrite wrote only 3808 "
                            "1-sized things, not 16384 (23.2422% of expected); is the disk full?)",
                "silent-nifti": f"error: {labels} (written incompletely (is the disk full?))"}[case]
    assert err[-1] == expected and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists() or sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_stale_temporary_files_of_a_killed_run_are_removed_before_writing(tmp_path, tiny_checkpoint):
    from DRSegUNetLib.atomic import temp_beside
    from DRSegUNetLib.imageio import atomic_output

    slab = _slab(tmp_path)
    out = tmp_path / "out"
    labels, seg, report = out / "l.nii.gz", out / "s.seg.nrrd", out / "r.json"
    # What a run killed during its final writes leaves, named by the writers themselves: the staged
    # files of output_set, a writer's own temporary beside a staged file, and atomic_write_bytes's.
    stale = []
    for path in (labels, seg, report):
        staged, _ = atomic_output(path)
        stale.append(staged)
        if path is report:
            fd, nested = temp_beside(staged, f".{staged.name}.", ".tmp")
        else:
            nested, _ = atomic_output(staged)
            fd = None
        if fd is not None:
            os.close(fd)
        stale.append(Path(nested))
    fd, direct = temp_beside(report, f".{report.name}.", ".tmp")
    os.close(fd)
    stale.append(Path(direct))
    fresh, _ = atomic_output(labels)  # a writer at work now
    unrelated = out / ".l-notmine.nii.gz"
    unrelated.write_text("")
    old = time.time() - 2 * 3600
    for p in stale + [unrelated]:
        os.utime(p, (old, old))
    assert main(["segment", str(slab), str(labels), "--seg-nrrd", str(seg), "--report", str(report),
                 "--model", str(tiny_checkpoint), "--device", "cpu"]) == 0
    assert not [p for p in stale if p.exists()]
    assert fresh.exists() and unrelated.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([labels.name, seg.name, report.name, fresh.name,
                                                            unrelated.name])


# ----------------------------------------------------------------- info, NIfTI names, overlay (item 17)


def test_info_into_a_pipe_closed_by_its_reader_is_quiet(tiny_checkpoint):
    p = subprocess.Popen([sys.executable, "-m", "DRSegUNetLib", "info", str(tiny_checkpoint)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # as `head -1` does once it has its line
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert err == ""


def test_info_on_a_model_store_folder_lists_its_versions(tmp_path, tiny_checkpoint, capsys):
    from DRSegUNetLib import default_model_path
    from DRSegUNetLib.store import ModelStore

    store = ModelStore(tmp_path / "home" / "models", bundled=default_model_path())
    v = store.add_version(tiny_checkpoint, card={"level": 2}, parent=1)
    store.set_active(v)
    for folder in (tmp_path / "home" / "models", tmp_path / "home"):
        assert main(["info", str(folder)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines == [f"  v1 (bundled level 1)  {default_model_path()}",
                         f"* {v.label}  {v.path}"]
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "is a folder but not a model store" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["jpeg", "png", "uncompressed-nifti"])
def test_a_file_named_nii_gz_that_is_not_nifti_says_so(tmp_path, tiny_checkpoint, capsys, case):
    path = tmp_path / "ct.nii.gz"
    if case == "jpeg":
        shutil.copy(sorted((TESTDATA / "medseg_mini" / "images").glob("*.jpg"))[0], path)  # a real MedSeg JPEG
    elif case == "png":
        shutil.copy(sorted((TESTDATA / "medseg_mini" / "masks").glob("*.png"))[0], path)
    else:
        sitk.WriteImage(sitk.ReadImage(str(CT64)), str(tmp_path / "ct.nii"))
        (tmp_path / "ct.nii").rename(path)
    expected = {"jpeg": "ct.nii.gz is not a NIfTI file but a JPEG picture",
                "png": "ct.nii.gz is not a NIfTI file but a PNG picture",
                "uncompressed-nifti": "ct.nii.gz is an uncompressed NIfTI file named .nii.gz; rename it to .nii"}[case]
    for argv in (["segment", str(path), str(tmp_path / "l.nrrd"), "--model", str(tiny_checkpoint)],
                 ["lungs", str(path), str(tmp_path / "l.nrrd")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {expected}") and "truncated" not in err[0]
    assert not (tmp_path / "l.nrrd").exists()


def test_the_overlay_says_which_slice_it_shows(tmp_path, tiny_checkpoint, caplog):
    from PIL import Image

    from DRSegUNetLib.orientation import axial_view

    slab = _slab(tmp_path)
    png = tmp_path / "o.png"
    with caplog.at_level("INFO"):
        assert main(["segment", str(slab), str(tmp_path / "l.nii.gz"), "--overlay", str(png),
                     "--model", str(tiny_checkpoint), "--device", "cpu"]) == 0
    with Image.open(png) as im:
        text = dict(im.text)
    index = int(text["slice_index"])
    assert text["slices"] == "3" and f"axial slice {index} of 3" in text["Description"]
    labels = sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    infection = np.isin(axial_view(sitk.GetArrayFromImage(labels), labels.GetDirection())[0], (1, 2)).sum(axis=(1, 2))
    assert index == (int(np.argmax(infection)) if infection.any() else 1)
    assert f"overlay {png} shows axial slice {index} of 3 (0 = most inferior)" in caplog.text
