"""Model store and corrections store: versions, the active pointer, atomic writes, crashes, restarts."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from DRSegUNetLib import store as store_mod
from DRSegUNetLib.store import CorrectionsStore, ModelStore, default_home


@pytest.fixture()
def bundled(tmp_path: Path) -> Path:
    p = tmp_path / "package" / "drsegunet_level1.pt"
    p.parent.mkdir()
    p.write_bytes(b"bundled-checkpoint")
    return p


@pytest.fixture()
def models(tmp_path: Path, bundled: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", bundled=bundled)


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ----------------------------------------------------------------- ModelStore


def test_fresh_store_has_only_the_bundled_model_and_it_is_active(models: ModelStore, bundled: Path) -> None:
    [v1] = models.versions()
    assert (v1.version, v1.bundled, v1.path) == (1, True, bundled)
    assert models.active().version == 1
    assert models.path_of(1) == bundled
    assert not models.root.exists()  # reading creates nothing


def test_add_version_keeps_previous_and_does_not_switch(models: ModelStore, tmp_path: Path, bundled: Path) -> None:
    ckpt = tmp_path / "trained.pt"
    ckpt.write_bytes(b"level-2-weights")
    v2 = models.add_version(ckpt, {"corrections_used": 3, "fingerprint": {"corrections": "abc"}}, parent=1)
    v3 = models.add_version(b"more-weights", {"note": "second round"}, parent=v2)

    assert [v.version for v in models.versions()] == [1, 2, 3]
    assert v2.path.read_bytes() == b"level-2-weights"
    assert v3.path == models.root / "v0003" / "model.pt"
    card = json.loads((models.root / "v0003" / "card.json").read_text())
    assert card["version"] == 3 and card["parent"] == 2 and card["note"] == "second round"
    assert card["created"] and len(card["checkpoint_sha256"]) == 64
    assert models.get(2).card["corrections_used"] == 3
    assert bundled.read_bytes() == b"bundled-checkpoint"  # never copied over
    assert models.active().version == 1  # adding does not switch

    models.set_active(3)
    assert models.active().version == 3
    models.set_active(1)  # switching back
    assert models.active().path == bundled


def test_set_active_rejects_unknown_version(models: ModelStore) -> None:
    with pytest.raises(KeyError):
        models.set_active(7)
    assert models.active().version == 1


def test_failed_add_version_leaves_nothing_and_keeps_active(models: ModelStore, monkeypatch) -> None:
    v2 = models.add_version(b"good", {}, parent=1)
    models.set_active(v2)
    before = _visible(models.root)

    real_dumps = json.dumps

    def broken_dumps(obj, *a, **k):  # fail while the card of the new version is written
        if isinstance(obj, dict) and "checkpoint_sha256" in obj:
            raise OSError("disk full")
        return real_dumps(obj, *a, **k)

    monkeypatch.setattr(store_mod.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        models.add_version(b"x" * 100_000, {}, parent=2)
    monkeypatch.undo()

    assert _visible(models.root) == before  # no v0003, no temporary folder
    assert [v.version for v in models.versions()] == [1, 2]
    assert models.active().version == 2


def test_failed_pointer_write_keeps_previous_active(models: ModelStore, monkeypatch) -> None:
    models.add_version(b"a", {}, parent=1)
    models.add_version(b"b", {}, parent=2)
    models.set_active(2)

    def broken_replace(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(store_mod.os, "replace", broken_replace)
    with pytest.raises(OSError):
        models.set_active(3)
    monkeypatch.undo()

    assert models.active().version == 2
    assert not [n for n in _visible(models.root) if n.startswith(".tmp-")]


def test_leftovers_of_a_killed_writer_are_ignored_and_cleanable(models: ModelStore) -> None:
    models.add_version(b"a", {}, parent=1)
    dead = models.root / ".tmp-killed"
    dead.mkdir()
    (dead / "model.pt").write_bytes(b"half")
    (models.root / "v0009").mkdir()  # a version folder without its checkpoint is not a version
    assert [v.version for v in models.versions()] == [1, 2]
    assert models.add_version(b"b", {}, parent=2).version == 3
    os.utime(dead, (0, 0))
    assert models.clean_temporary(older_than_s=60) == 1
    assert not dead.exists()


def test_adding_a_version_removes_leftovers_older_than_an_hour(models: ModelStore) -> None:
    old, recent = models.root / ".tmp-died-yesterday", models.root / ".tmp-maybe-writing-now"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"copy")
    os.utime(old, (time.time() - 2 * 3600,) * 2)
    models.add_version(b"a", {}, parent=1)
    assert not old.exists() and recent.is_dir()


def test_corrupt_pointer_falls_back_to_bundled(models: ModelStore) -> None:
    models.add_version(b"a", {}, parent=1)
    models.root.joinpath("active.json").write_text('{"vers')
    assert models.active().version == 1
    models.root.joinpath("active.json").write_text('{"version": 42}')
    assert models.active().version == 1


def test_restart_sees_versions_and_pointer(tmp_path: Path, bundled: Path) -> None:
    a = ModelStore(tmp_path / "m", bundled=bundled)
    v = a.add_version(b"w", {"note": "n"}, parent=1)
    a.set_active(v)
    b = ModelStore(tmp_path / "m", bundled=bundled)
    assert b.active().version == 2 and b.active().card["note"] == "n"
    assert b.active().label.startswith("v2")


def test_store_without_bundled_model(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "m")
    with pytest.raises(LookupError):
        s.active()
    s.add_version(b"w", {}, parent=None)
    assert s.active().version == 2


def test_default_home_env_override(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DRSEGUNET_HOME", str(tmp_path / "h"))
    assert default_home() == tmp_path / "h"
    assert ModelStore().root == tmp_path / "h" / "models"
    assert CorrectionsStore().root == tmp_path / "h" / "corrections"
    monkeypatch.delenv("DRSEGUNET_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and not str(default_home()).startswith(str(Path.home() / "Library")):
        assert default_home() == tmp_path / "xdg" / "DRSegUNet"


# ----------------------------------------------------------------- CorrectionsStore


def _slice(seed: int, shape=(12, 10)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1024, 400, size=shape).astype(np.int16)
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    return ct, labels


def test_add_and_load_round_trip(tmp_path: Path) -> None:
    s = CorrectionsStore(tmp_path / "c")
    ct, lab = _slice(0)
    cid = s.add(ct, lab, (0.7, 0.8), source="CT1 sha1:ab", slice_index=5)
    c = s.load(cid)
    assert c.ct_hu.dtype == np.float32 and np.array_equal(c.ct_hu, ct)
    assert c.labels.dtype == np.uint8 and np.array_equal(c.labels, lab)
    assert c.spacing == (0.7, 0.8) and c.source == "CT1 sha1:ab" and c.slice_index == 5 and c.known is None
    [info] = list(s.items())
    assert (info.id, info.slice_index, info.shape, info.spacing) == (cid, 5, (12, 10), (0.7, 0.8))
    assert len(s) == 1 and cid in s


def test_float_hu_and_partial_knowledge(tmp_path: Path) -> None:
    s = CorrectionsStore(tmp_path / "c")
    ct = np.linspace(-1000.25, 50.5, 20, dtype=np.float64).reshape(4, 5)
    cid = s.add(ct, np.zeros((4, 5), np.uint8), (1, 1), "v", 0, known=("lung",))
    c = s.load(cid)
    assert np.allclose(c.ct_hu, ct) and c.known == ("lung",)


def test_rejects_bad_slices(tmp_path: Path) -> None:
    s = CorrectionsStore(tmp_path / "c")
    with pytest.raises(ValueError):
        s.add(np.zeros((3, 3)), np.zeros((3, 4), np.uint8), (1, 1), "v", 0)
    with pytest.raises(ValueError):
        s.add(np.zeros((3, 3)), np.full((3, 3), 7, np.uint8), (1, 1), "v", 0)
    assert len(s) == 0


def test_restart_sees_everything_in_order(tmp_path: Path) -> None:
    a = CorrectionsStore(tmp_path / "c")
    ids = [a.add(*_slice(i), (1, 1), "vol", i) for i in range(4)]
    b = CorrectionsStore(tmp_path / "c")
    assert len(b) == 4 and [i.id for i in b.items()] == ids == b.ids()
    assert [i.slice_index for i in b.items()] == [0, 1, 2, 3]


def test_torn_index_line_and_unindexed_file_survive(tmp_path: Path) -> None:
    s = CorrectionsStore(tmp_path / "c")
    first = s.add(*_slice(1), (1, 1), "vol", 1)
    second = s.add(*_slice(2), (1, 1), "vol", 2)
    index = s.root / "index.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # crash while appending line 2

    s2 = CorrectionsStore(s.root)
    assert [i.id for i in s2.items()] == [first, second]  # second read from its file
    assert [i.slice_index for i in s2.items()] == [1, 2]
    third = s2.add(*_slice(3), (1, 1), "vol", 3)  # appending after a torn line still works
    assert [i.id for i in CorrectionsStore(s.root).items()] == [first, second, third]
    assert json.loads(index.read_text().splitlines()[-1])["id"] == third


def test_failure_mid_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    s = CorrectionsStore(tmp_path / "c")
    keep = s.add(*_slice(1), (1, 1), "vol", 1)
    before = _visible(s.root)

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.np, "savez_compressed", broken_savez)
    with pytest.raises(OSError):
        s.add(*_slice(2), (1, 1), "vol", 2)
    monkeypatch.undo()
    assert _visible(s.root) == before
    assert s.ids() == [keep]


def test_temporary_file_of_a_killed_writer_is_not_an_item(tmp_path: Path) -> None:
    s = CorrectionsStore(tmp_path / "c")
    s.add(*_slice(1), (1, 1), "vol", 1)
    (s.root / ".tmp-abc.npz").write_bytes(b"PK half")
    assert len(s) == 1 and len(list(s.items())) == 1


def test_partially_known_corrections_become_partial_labels(tmp_path) -> None:
    """finetune trains on what the user checked. "lung" is the Lung *segment* (the whole lung
    field): checked alone, it decides lung field vs outside and leaves the lesion classes
    inside the field open; a checked lesion class decides "this class or not"."""
    from DRSegUNetLib.data import bit, labels_to_allowed

    labels = np.array([[0, 1, 2, 3]], np.uint8)
    field = bit(1, 2, 3)
    assert labels_to_allowed(labels).tolist() == [[1, 2, 4, 8]]
    assert labels_to_allowed(labels, ("lung",)).tolist() == [[1, field, field, field]]
    assert labels_to_allowed(labels, ("ggo", "consolidation")).tolist() == [[bit(0, 3), 2, 4, bit(0, 3)]]
    assert labels_to_allowed(labels, ("ggo",)).tolist() == [[bit(0, 2, 3), 2, bit(0, 2, 3), bit(0, 2, 3)]]
    assert labels_to_allowed(labels, ("lung", "ggo")).tolist() == [[1, 2, bit(2, 3), bit(2, 3)]]
    assert labels_to_allowed(labels, ("ggo", "consolidation", "lung")).tolist() == [[1, 2, 4, 8]]
    assert labels_to_allowed(labels, ("background", "ggo", "consolidation", "lung")).tolist() == [[1, 2, 4, 8]]
    assert labels_to_allowed(labels, ()).tolist() == [[15, 15, 15, 15]]
    with pytest.raises(ValueError, match="unknown class"):
        labels_to_allowed(labels, ("Lung",))
    s = CorrectionsStore(tmp_path / "c")
    with pytest.raises(ValueError, match="unknown class names"):
        s.add(np.zeros((1, 4), np.float32), labels, (1, 1), "v", 0, known=("GGO",))
    assert s.ids() == []


def test_corrections_are_resampled_to_the_working_pixel_size() -> None:
    """finetune trains on corrections at the pixel size segment runs the network at
    (InferenceConfig.pixel_mm): 0.7 mm halves the grid, HU bilinear, labels nearest."""
    from DRSegUNetLib.data import Sample, bit, labels_to_allowed, resample_sample

    labels = np.zeros((100, 80), np.uint8)
    labels[20:60, 10:50] = 3
    labels[30:40, 20:30] = 1
    hu = np.where(labels > 0, -800.0, 40.0).astype(np.float32)
    s = Sample(hu, labels_to_allowed(labels), "c1", "corrections")
    r = resample_sample(s, (0.7, 0.7), 1.4)
    assert r.hu.shape == r.allowed.shape == (50, 40) and (r.name, r.group) == ("c1", "corrections")
    assert set(np.unique(r.allowed)) == {bit(0), bit(1), bit(3)}
    assert (r.allowed == bit(1)).sum() == 25 and (r.allowed != bit(0)).sum() == 400
    assert r.hu.min() >= -800.0 and r.hu.max() <= 40.0
    assert resample_sample(s, (1.4, 1.4), 1.4) is s and resample_sample(s, (0.7, 0.7), None) is s
    assert resample_sample(s, (0.7, 1.4), 1.4).hu.shape == (50, 80)


def _rewrite(path: Path, **changes) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage,message", [
    ("empty", "unusable"), ("truncated", "unusable"), ("missing", "No such file"), ("no-labels", "labels"),
    ("shape", "same shape"), ("label-7", "labels must be"), ("nan", "NaN"), ("spacing", "spacing"),
    ("known", "unknown class names"),
])
def test_a_damaged_correction_is_refused_by_name(tmp_path: Path, damage: str, message: str) -> None:
    from DRSegUNetLib.errors import InputError

    s = CorrectionsStore(tmp_path / "c")
    cid = s.add(np.full((4, 5), -800, np.int16), np.zeros((4, 5), np.uint8), (0.7, 0.8), "v", 0)
    path = tmp_path / "c" / f"{cid}.npz"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "missing":
        path.unlink()
    else:
        _rewrite(path, **{"no-labels": {"labels": None}, "shape": {"labels": np.zeros((4, 4), np.uint8)},
                          "label-7": {"labels": np.full((4, 5), 7, np.uint8)},
                          "nan": {"ct_hu": np.full((4, 5), np.nan, np.float32)},
                          "spacing": {"spacing": np.array([0.0, 0.8])},
                          "known": {"known": np.array('["Lung"]')}}[damage])
    with pytest.raises(InputError, match=message) as e:
        s.load(cid)
    assert cid in str(e.value) and "\n" not in str(e.value)


def test_add_refuses_nan_ct_and_bad_spacing(tmp_path: Path) -> None:
    s = CorrectionsStore(tmp_path / "c")
    with pytest.raises(ValueError, match="NaN"):
        s.add(np.full((3, 3), np.nan), np.zeros((3, 3), np.uint8), (1, 1), "v", 0)
    with pytest.raises(ValueError, match="spacing"):
        s.add(np.zeros((3, 3)), np.zeros((3, 3), np.uint8), (1, -1), "v", 0)
    huge = np.zeros((3, 3))
    huge[1, 1] = 1e39  # finite as float64, inf once stored as float32: load would then refuse the slice
    with pytest.raises(ValueError, match="float32"):
        s.add(huge, np.zeros((3, 3), np.uint8), (1, 1), "v", 0)
    assert len(s) == 0


# ----------------------------------------------------------------- review: failures, concurrency, validation


def test_a_folder_that_is_not_a_version_does_not_block_new_versions(models: ModelStore) -> None:
    """A vNNNN folder without its checkpoint (damaged, or emptied by hand) is not a version;
    add_version must number past it, not retry the same taken name until it gives up."""
    models.add_version(b"a", {}, parent=1)
    (models.root / "v0003").mkdir()
    (models.root / "v0003" / "card.json").write_text("{}")  # not empty: the rename onto it fails
    v = models.add_version(b"b", {}, parent=2)
    assert v.version == 4 and v.path.read_bytes() == b"b" and models.get(4).card["version"] == 4
    assert [x.version for x in models.versions()] == [1, 2, 4]
    assert not [n for n in _visible(models.root) if n.startswith(".tmp-")]


@pytest.mark.parametrize("bad", [np.nan, 2.5])
def test_labels_that_are_not_class_numbers_are_refused(tmp_path: Path, bad: float) -> None:
    from DRSegUNetLib.errors import InputError

    s = CorrectionsStore(tmp_path / "c")
    labels = np.array([[0, 1], [bad, 3]])
    with pytest.raises(ValueError, match="labels must be"):
        s.add(np.zeros((2, 2)), labels, (1, 1), "v", 0)
    assert len(s) == 0
    assert s.load(s.add(np.zeros((2, 2)), np.array([[0.0, 1.0], [2.0, 3.0]]), (1, 1), "v", 0)).labels.tolist() == [[0, 1], [2, 3]]
    cid = s.add(np.zeros((2, 2), np.int16), np.zeros((2, 2), np.uint8), (1, 1), "v", 0)
    _rewrite(s.root / f"{cid}.npz", labels=labels)  # written by another program
    with pytest.raises(InputError, match="labels must be"):
        s.load(cid)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_while_indexing_does_not_report_a_stored_slice_as_lost(tmp_path: Path) -> None:
    """The .npz is the truth and the index may miss a line: once the file has landed, add
    returns its id (raising would make the caller accept the slice again: a duplicate)."""
    s = CorrectionsStore(tmp_path / "c")
    first = s.add(*_slice(1), (1, 1), "vol", 1)
    index = s.root / "index.jsonl"
    index.unlink()
    index.symlink_to("/dev/full")  # every write to the index fails with ENOSPC
    try:
        second = s.add(*_slice(2), (1, 1), "vol", 2)
    finally:
        index.unlink()
    assert s.ids() == [first, second]
    assert [i.slice_index for i in CorrectionsStore(s.root).items()] == [1, 2]
    assert np.array_equal(s.load(second).labels, _slice(2)[1])


def test_finetune_card_names_what_it_trained_on(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    """Another Slicer accepts a slice while finetune trains: the card's fingerprint must name
    the slices trained on (corrections_used), not the store at the end; and its parent is the
    version trained from (--model, as Slicer passes it), not whichever version is active by then."""
    import hashlib

    import torch

    import DRSegUNetLib.adaptation as adaptation
    from DRSegUNetLib.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    c = CorrectionsStore(tmp_path / "c")

    def accept(i: int) -> str:
        labels = np.zeros((40, 40), np.uint8)
        labels[6:34, 6:34] = 3
        labels[16:24, 16:24] = 1
        return c.add(np.where(labels > 0, -800, 40).astype(np.int16), labels, (1, 1), "vol", i)

    first = accept(0)
    real_train = adaptation._train_steps

    def train_while_another_instance_accepts(*a, **k):
        if len(c) == 1:  # once, however many fine-tunes the soup trains
            accept(1)
        return real_train(*a, **k)

    monkeypatch.setattr(adaptation, "_train_steps", train_while_another_instance_accepts)
    models = ModelStore(tmp_path / "models")
    v2 = models.add_version(tiny_checkpoint, {}, parent=1)
    models.set_active(models.add_version(b"switched to meanwhile", {}, parent=1))
    try:
        rc = main(["finetune", "--corrections", str(c.root), "--store", str(models.root), "--model", str(v2.path),
                   "--steps", "1", "--crop", "32", "--device", "cpu", "--pixel-mm", "0", "--activate", "always"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and len(c) == 2
    card = ModelStore(models.root).active().card
    assert card["version"] == 4 and card["corrections_used"] == [first]
    assert card["corrections_fingerprint"] == hashlib.sha256(first.encode()).hexdigest()[:16]
    assert card["parent"] == 2  # trained from v2, not from v3 that was active when it started
    assert c.fingerprint([first]) == card["corrections_fingerprint"] != c.fingerprint()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_version_folder_gets_the_mode_mkdir_would_give(models: ModelStore) -> None:
    old = os.umask(0o022)
    try:
        v = models.add_version(b"a", {}, parent=1)
    finally:
        os.umask(old)
    assert v.path.parent.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700
    assert v.path.stat().st_mode & 0o777 == 0o644
