import numpy as np
import pytest
import torch

from DRSegUNetLib.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from DRSegUNetLib.config import ModelConfig, NetworkConfig, PreprocessConfig
from DRSegUNetLib.errors import CheckpointError
from DRSegUNetLib.network import DRSegUNet


def _model(filters=4):
    torch.manual_seed(1)
    cfg = ModelConfig(network=NetworkConfig(base_filters=filters), preprocess=PreprocessConfig(mean=-612.5, std=401.0))
    return DRSegUNet(cfg.network).eval(), cfg


def test_round_trip_gives_identical_logits_and_config(tmp_path):
    model, cfg = _model()
    x = torch.randn(2, 1, 40, 56)
    save_checkpoint(Checkpoint.from_model(model, cfg, metrics={"val_dice": 0.5}), tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == cfg and loaded.metrics == {"val_dice": 0.5}
    with torch.no_grad():
        assert torch.equal(model(x), loaded.build_model()(x))


def test_half_precision_checkpoint_is_close(tmp_path):
    model, cfg = _model()
    x = torch.randn(1, 1, 32, 32)
    save_checkpoint(Checkpoint.from_model(model, cfg, half=True), tmp_path / "h.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "h.pt").build_model()(x), model(x), atol=2e-2, rtol=2e-2)


def test_load_uses_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "drsegunet-checkpoint/1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_corrupt_files_are_refused(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


def test_truncated_real_checkpoint_is_refused(tmp_path):
    model, cfg = _model()
    save_checkpoint(Checkpoint.from_model(model, cfg), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "t.pt")


def test_checkpoint_with_a_flipped_byte_in_its_weights_is_refused(tmp_path):
    # torch.load reads such a file without complaint and gives wrong weights; the zip's
    # CRC-32 of the damaged tensor's record tells.
    import zipfile

    model, cfg = _model()
    save_checkpoint(Checkpoint.from_model(model, cfg), tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    header = 30 + len(info.filename.encode()) + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30],
                                                               "little")
    at = info.header_offset + header + info.file_size // 2
    data[at] ^= 0x40
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    raw = torch.load(tmp_path / "flip.pt", map_location="cpu", weights_only=True)  # what load used to accept
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in raw["state_dict"].items())
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(tmp_path / "flip.pt")
    assert load_checkpoint(tmp_path / "m.pt").config == cfg  # the undamaged file still loads


def test_other_torch_file_and_other_class_layout(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DRSegUNet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    model, cfg = _model()
    ck = Checkpoint.from_model(model, cfg)
    ck.class_names = ("background", "infection", "lung", "other")
    save_checkpoint(ck, tmp_path / "layout.pt")
    with pytest.raises(CheckpointError, match="trained for classes"):
        load_checkpoint(tmp_path / "layout.pt")


def test_weights_that_do_not_fit_the_config(tmp_path):
    model, cfg = _model(4)
    other = ModelConfig(network=NetworkConfig(base_filters=8))
    save_checkpoint(Checkpoint(config=other, state_dict=model.state_dict()), tmp_path / "mm.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mm.pt").build_model()


def test_save_is_atomic_and_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    model, cfg = _model()
    path = tmp_path / "m.pt"
    save_checkpoint(Checkpoint.from_model(model, cfg, metrics={"v": 1}), path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(Checkpoint.from_model(model, cfg, metrics={"v": 2}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def _saved_dict(tmp_path):
    model, cfg = _model()
    save_checkpoint(Checkpoint.from_model(model, cfg), tmp_path / "m.pt")
    return torch.load(tmp_path / "m.pt", weights_only=True)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["config"]["network"].update(base_filters="16"), "network.base_filters"),
    (lambda d: d["config"]["preprocess"].update(mean=[1.0]), "preprocess.mean"),
    (lambda d: d["config"].update(network="drsegunet"), "invalid config"),
    (lambda d: d.update(config=[1, 2]), "invalid config"),
    (lambda d: d.update(state_dict=[1, 2]), "no state_dict"),
    (lambda d: d.update(state_dict={"stem.conv1.weight": "x"}), "no state_dict"),
    (lambda d: d["state_dict"]["stem.conv1.weight"].fill_(float("nan")), "NaN or infinite weights \\(stem.conv1.weight"),
    (lambda d: d["state_dict"]["stem.bn1.running_var"].fill_(float("inf")), "NaN or infinite"),
])
def test_malformed_checkpoints_are_refused_in_one_line(tmp_path, change, message):
    d = _saved_dict(tmp_path)
    change(d)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path / "bad.pt").build_model()
    assert "\n" not in str(e.value)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    d = _saved_dict(tmp_path)
    del d["state_dict"]["stem.conv1.weight"]
    d["state_dict"]["extra.weight"] = torch.zeros(1)
    d["state_dict"]["stem.bn1.weight"] = torch.zeros(99)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.pt").build_model()
    text = str(e.value)
    assert "missing stem.conv1.weight" in text and "unexpected extra.weight" in text
    assert "wrong shape stem.bn1.weight (99,)" in text and "\n" not in text


def test_the_checkpoint_carries_its_working_pixel_and_decision_rule(tmp_path):
    """ModelConfig.inference round-trips; a checkpoint written before it existed (no
    "inference" in its config, as the bundled one) loads with today's rule."""
    from DRSegUNetLib.config import InferenceConfig, ModelInference

    model, cfg = _model()
    own = ModelConfig(network=cfg.network, inference=ModelInference(pixel_mm=1.5, decision="threshold", threshold=0.6))
    save_checkpoint(Checkpoint.from_model(model, own), tmp_path / "own.pt")
    assert load_checkpoint(tmp_path / "own.pt").config.inference == own.inference
    d = _saved_dict(tmp_path)
    assert "inference" in d["config"]
    del d["config"]["inference"]
    torch.save(d, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt").config
    assert old.inference == ModelInference() and (old.inference.pixel_mm, old.inference.decision) == (1.2, "argmax")
    assert InferenceConfig.for_model(old) == InferenceConfig()  # the defaults every model had
    inf = InferenceConfig.for_model(own, batch_size=2)
    assert (inf.pixel_mm, inf.decision, inf.threshold, inf.batch_size) == (1.5, "threshold", 0.6, 2)
    assert InferenceConfig.for_model(own.with_pixel_mm(0)).pixel_mm is None  # 0: the own grid
    assert InferenceConfig.for_model(own, pixel_mm=None).pixel_mm is None


@pytest.mark.parametrize("inference,message", [
    ({"pixel_mm": 0.01}, "working pixel"), ({"pixel_mm": "1.2"}, "invalid config"), ({"restrict_to_body": 1}, "inference.restrict_to_body"),
    ({"decision": "vote"}, "decision"), ({"threshold": 2.0}, "threshold"), ({"colour": 1}, "invalid config"),
])
def test_a_bad_working_pixel_or_decision_rule_is_refused(tmp_path, inference, message):
    d = _saved_dict(tmp_path)
    d["config"]["inference"].update(inference)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(e.value)
