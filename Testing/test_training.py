from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TESTDATA

from DRSegUNetLib.checkpoint import load_checkpoint
from DRSegUNetLib.config import ModelConfig, NetworkConfig, TrainConfig
from DRSegUNetLib.data import bit, read_dataset, read_medseg_folder, read_zenodo_npz
from DRSegUNetLib.training import (AugmentConfig, PatchSampler, compute_loss, freeze_first_layers,
                                   marginal_cross_entropy, marginal_soft_dice, train)
from DRSegUNetLib.network import DRSegUNet
from DRSegUNetLib.vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG


def test_marginal_loss_is_cross_entropy_for_single_classes():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    allowed = (1 << target).to(torch.uint8)
    torch.testing.assert_close(marginal_cross_entropy(logits, allowed), F.cross_entropy(logits, target))


def test_marginal_loss_sums_probability_over_allowed_set():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).view(1, 4, 1, 1)
    allowed = torch.tensor([[[bit(BACKGROUND, LUNG)]]])
    assert marginal_cross_entropy(logits, allowed).item() == pytest.approx(-np.log(0.5), rel=1e-5)
    everything = torch.tensor([[[bit(BACKGROUND, GGO, CONSOLIDATION, LUNG)]]])
    assert marginal_cross_entropy(logits, everything).item() == 0.0


def test_soft_dice_ignores_undecided_pixels():
    # Pixel 0 is GGO-or-consolidation (undecided between them); pixel 1 is background.
    allowed = torch.tensor([[[bit(GGO, CONSOLIDATION), bit(BACKGROUND)]]])
    perfect = torch.tensor([[[-9.0, 9.0]], [[0.0, -9.0]], [[0.0, -9.0]], [[-9.0, -9.0]]]).unsqueeze(0)
    assert marginal_soft_dice(perfect, allowed).item() < 0.01
    assert compute_loss(perfect, allowed, "ce+dice").item() < 0.02


def test_partial_labels_of_both_datasets():
    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    z = read_zenodo_npz(TESTDATA / "zenodo_mini.npz")
    assert ms[0].region_truth("ggo") is not None and ms[0].region_truth("lung") is None
    assert z[0].region_truth("lung") is not None and z[0].region_truth("ggo") is None
    assert z[0].region_truth("infection").sum() > 0
    # MedSeg slices are transposed back to radiological orientation.
    from PIL import Image
    raw = np.asarray(Image.open(TESTDATA / "medseg_mini" / "images" / "0.jpg"))
    assert ms[0].hu.shape == raw.shape[::-1]


def test_sampler_crops_are_augmented_but_label_aligned():
    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    s = PatchSampler(ms, 64, AugmentConfig(rotate_deg=0, scale=(1, 1), flip_lr=0, hu_gain=(1, 1), hu_shift=0,
                                           gamma=(1, 1), noise_hu=0, blur_sigma=0), seed=3)
    hu, allowed = s.batch(6)
    assert hu.shape == (6, 64, 64) and allowed.dtype == np.uint8
    # Nearest-neighbour resampling and background padding keep labels in the annotation vocabulary.
    assert set(np.unique(allowed)) <= {bit(BACKGROUND, LUNG), bit(GGO), bit(CONSOLIDATION), bit(BACKGROUND)}


def test_freeze_first_two_layers_names_stem_conv_and_bn():
    m = DRSegUNet(NetworkConfig(base_filters=4))
    assert freeze_first_layers(m, 2) == ["stem.conv1", "stem.bn1"]
    assert not m.stem.conv1.weight.requires_grad and m.stem.conv2.weight.requires_grad


@pytest.mark.slow
def test_short_training_on_real_slices_lowers_loss_and_writes_checkpoints(tmp_path):
    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    z = read_zenodo_npz(TESTDATA / "zenodo_mini.npz")
    cfg = TrainConfig(epochs=4, steps_per_epoch=6, batch_size=4, crop=64, lr=3e-3, seed=0)
    events = []
    res = train(ms[:2] + z[:3], ms[2:] + z[3:], tmp_path, cfg, ModelConfig(network=NetworkConfig(base_filters=8)),
                device="cpu", progress=lambda *a, **k: events.append((a, k)))
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert res.best_path.is_file() and res.last_path.is_file()
    best = load_checkpoint(res.best_path)
    assert best.metrics["val_dice"] == pytest.approx(max(h["val_dice"] for h in res.history))
    assert best.config.preprocess.mean != ModelConfig().preprocess.mean  # estimated on training pixels
    assert any(a[0] == "epoch" for a, _ in events) and any("loss" in k for _, k in events)

    # Level 2: fine-tune from it with the first two layers frozen; they stay identical.
    res2 = train(ms[:2], [], tmp_path / "l2", TrainConfig(epochs=1, steps_per_epoch=3, batch_size=2, crop=64,
                                                       lr=1e-4, frozen_layers=2), init=best, device="cpu")
    l2 = load_checkpoint(res2.best_path)
    for k in ("stem.conv1.weight", "stem.bn1.running_mean", "stem.bn1.weight"):
        assert torch.equal(l2.state_dict[k], best.state_dict[k])
    assert not torch.equal(l2.state_dict["stem.conv2.weight"], best.state_dict["stem.conv2.weight"])


def test_crop_workers_are_seeded_and_the_default_draws_in_process(tmp_path):
    """--workers N draws crops in N processes (for GPUs): runs repeat exactly for a seed; the
    default (0) draws the same crops as a PatchSampler seeded with the run's seed."""
    from DRSegUNetLib.training import AugmentConfig, PatchSampler, _batch_stream
    from DRSegUNetLib.preprocessing import normalize

    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    pp = ModelConfig().preprocess
    cfg = TrainConfig(batch_size=2, crop=32, seed=5)
    x, y = next(_batch_stream(ms, cfg, AugmentConfig(), 0, pp, torch.device("cpu"))[0])
    hu, allowed = PatchSampler(ms, 32, AugmentConfig(), 5).batch(2)
    assert torch.equal(x, torch.from_numpy(normalize(hu, pp))) and torch.equal(y, torch.from_numpy(allowed))

    def run(name):
        c = TrainConfig(epochs=1, steps_per_epoch=3, batch_size=2, crop=32, seed=1, workers=2)
        return train(ms, [], tmp_path / name, c, ModelConfig(network=NetworkConfig(base_filters=4)), device="cpu")

    import multiprocessing

    a, b = run("a"), run("b")
    assert a.history[0]["loss"] == b.history[0]["loss"]
    assert not multiprocessing.active_children()  # the crop workers are gone when train() returns


def test_without_validation_best_is_the_last_epoch_written_once(tmp_path, monkeypatch):
    import DRSegUNetLib.training as training

    written = []
    save = training.save_checkpoint

    def spy(ckpt, path):
        written.append(path.name)
        return save(ckpt, path)

    monkeypatch.setattr(training, "save_checkpoint", spy)
    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    res = train(ms[:2], [], tmp_path, TrainConfig(epochs=3, steps_per_epoch=1, batch_size=2, crop=32, seed=0),
                ModelConfig(network=NetworkConfig(base_filters=16)), device="cpu")
    assert written == ["last.pt"] * 3 + ["best.pt"]
    best, last = load_checkpoint(res.best_path), load_checkpoint(res.last_path)
    assert res.best_epoch == 3 and best.metrics["epoch"] == 3
    assert all(torch.equal(best.state_dict[k], last.state_dict[k]) for k in last.state_dict)

    # A second run into the same folder, interrupted after its first epoch, leaves no best.pt
    # that could be taken for its own.
    from DRSegUNetLib.errors import Cancelled

    epochs = []
    with pytest.raises(Cancelled):
        train(ms[:2], [], tmp_path, TrainConfig(epochs=3, steps_per_epoch=1, batch_size=2, crop=32, seed=1),
              ModelConfig(network=NetworkConfig(base_filters=16)), device="cpu",
              progress=lambda stage, *a, **k: epochs.append(stage) if stage == "epoch" else None,
              cancel=lambda: bool(epochs))
    assert not res.best_path.exists() and load_checkpoint(res.last_path).extra["train_config"]["seed"] == 1


def test_hard_negative_crops_centre_on_dense_pixels_decided_lung():
    """Hard-negative crops (AugmentConfig.hard_negative_fraction) are centred on dense pixels
    that can only be lung -- vessels and bronchial walls in COVID-19-CT-Seg's lung masks --
    and none are drawn, nor any random number spent, when the fraction is 0."""
    z = read_zenodo_npz(TESTDATA / "zenodo_mini.npz")
    still = dict(rotate_deg=0, scale=(1, 1), flip_lr=0, hu_gain=(1, 1), hu_shift=0, gamma=(1, 1), noise_hu=0,
                 blur_sigma=0)
    s = PatchSampler(z, 32, AugmentConfig(foreground_fraction=0.0, hard_negative_fraction=1.0, **still), seed=1)
    assert sum(len(n) for n in s.neg) > 0
    for _ in range(8):
        hu, allowed = s.draw()
        assert allowed[16, 16] == bit(LUNG) and hu[16, 16] > AugmentConfig().hard_negative_hu
    # Off: the same crops as a sampler that predates the option (same seed, same stream).
    a = PatchSampler(z, 33, AugmentConfig(**still), seed=2).batch(4)
    b = PatchSampler(z, 33, AugmentConfig(hard_negative_fraction=0.0, **still), seed=2).batch(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_weight_average_is_what_validation_scores_and_the_checkpoint_holds(tmp_path):
    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    z = read_zenodo_npz(TESTDATA / "zenodo_mini.npz")
    net = ModelConfig(network=NetworkConfig(base_filters=4))
    plain = train(ms[:2] + z[:3], ms[2:] + z[3:], tmp_path / "plain",
                  TrainConfig(epochs=1, steps_per_epoch=4, batch_size=2, crop=64, lr=3e-3), net, device="cpu")
    avg = train(ms[:2] + z[:3], ms[2:] + z[3:], tmp_path / "ema",
                TrainConfig(epochs=1, steps_per_epoch=4, batch_size=2, crop=64, lr=3e-3, ema_decay=0.5), net,
                device="cpu")
    live = plain.model.state_dict()  # same seed: the live weights of both runs are equal
    saved = load_checkpoint(avg.last_path).state_dict
    k = "stem.conv2.weight"
    assert torch.allclose(avg.model.state_dict()[k], live[k])
    assert not torch.allclose(saved[k].float(), live[k].float())
    assert torch.allclose(load_checkpoint(plain.last_path).state_dict[k].float(), live[k].float())
    with pytest.raises(ValueError, match="decay"):
        train(ms[:1], [], tmp_path / "bad", TrainConfig(epochs=1, steps_per_epoch=1, batch_size=1, crop=32,
                                                        ema_decay=1.0), net, device="cpu")


def test_weight_average_forgets_the_initial_weights_early_and_keeps_its_decay_later():
    from DRSegUNetLib.training import _WeightAverage

    start, live = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    for m, value in ((start, 0.0), (live, 1.0)):
        for p in m.parameters():
            torch.nn.init.constant_(p, value)
    avg = _WeightAverage(start, 0.998)
    avg.update(live)  # first update: decay 1/10, not 0.998
    assert avg.model.weight.detach() == pytest.approx(torch.full((1, 2), 0.9))
    for _ in range(399):
        avg.update(live)
    assert float(avg.model.bias) > 0.99  # 0.998 from the start would still hold 45 % of the zeros
    avg.model.bias.fill_(0.0)
    avg.updates = 10_000  # long past the warm-up: the configured decay
    avg.update(live)
    assert float(avg.model.bias) == pytest.approx(0.002)


def test_cpu_training_takes_channels_last_only_where_onednn_trains_it_safely():
    from DRSegUNetLib.config import NetworkConfig
    from DRSegUNetLib.training import training_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_channels_last(cpu, NetworkConfig(base_filters=16))
    assert not training_channels_last(cpu, NetworkConfig(base_filters=8))  # heap corruption in oneDNN's backward
    assert not training_channels_last(cpu, NetworkConfig(base_filters=16), world=2)  # gloo DDP
    assert not training_channels_last(cpu, NetworkConfig(base_filters=16, arch="monai_unet"))
    assert training_channels_last(cuda, NetworkConfig(base_filters=4))


OUTSIDE = Path(__file__).resolve().parents[1] / "data" / "outside_lungs"


def test_hu_slices_npz_is_a_source_of_certain_background():
    # data/outside_lungs: real abdomen/pelvis slices (COVID-19-NY-SBU) in HU, no lung anywhere.
    train_part = read_zenodo_npz(OUTSIDE / "train.npz")
    check = read_dataset(OUTSIDE / "check.npz")
    assert len(train_part) == 4 and len(check) == 2
    for s in train_part + check:
        assert s.source == "outside" and not s.eight_bit and s.pixel_mm == pytest.approx(1.2)
        assert (s.allowed == bit(BACKGROUND)).all()
        body = s.hu > -500
        assert 0.15 < body.mean() < 0.95 and s.hu[body].mean() > -100  # soft tissue, in HU (not 8-bit grey)
        assert s.region_truth("lung").sum() == 0 and s.region_truth("infection").sum() == 0
    assert {s.group for s in train_part} == {"outside0", "outside1"}  # two patients


def test_sampler_draws_a_source_by_its_weight():
    z = read_zenodo_npz(TESTDATA / "zenodo_mini.npz")
    out = read_zenodo_npz(OUTSIDE / "train.npz")
    from DRSegUNetLib.training import sample_probabilities
    p = sample_probabilities(z + out, {"zenodo": 1, "outside": 0.25})
    assert p[len(z):].sum() == pytest.approx(0.2)


@pytest.mark.parametrize("case, message", [
    (dict(ct_hu=np.zeros((1, 8, 8), bool)), "integer or floating"),
    (dict(ct_hu=np.full((1, 8, 8), np.nan, np.float32)), "NaN"),
    (dict(ct_hu=np.zeros((1, 8, 8), np.int16), source=np.str_("Zenodo2")), "lower-case name"),
    (dict(ct_hu=np.zeros((1, 8, 8), np.int16), source=np.str_("medseg")), "other than medseg"),
])
def test_broken_hu_slices_npz_is_one_line_error(tmp_path, case, message):
    from DRSegUNetLib.errors import InputError
    arrays = {"lung_mask": np.zeros((1, 8, 8), np.uint8), "infection_mask": np.zeros((1, 8, 8), np.uint8), **case}
    np.savez(tmp_path / "x.npz", **arrays)
    with pytest.raises(InputError, match=message):
        read_zenodo_npz(tmp_path / "x.npz")


def _resumable_run(ms, out, cancel_at=None, resume=False, validate=True, **overrides):
    """3 epochs of 2 steps on medseg_mini with validation (unless not ``validate``), a weight
    average and a cosine schedule; ``cancel_at``: stop when step N is about to start."""
    from DRSegUNetLib.config import LrSchedule

    calls = []

    def cancel():
        calls.append(1)
        return cancel_at is not None and len(calls) == cancel_at

    cfg = TrainConfig(**{**dict(epochs=3, steps_per_epoch=2, batch_size=2, crop=32, seed=4, ema_decay=0.9,
                                lr_schedule=LrSchedule.COSINE, bf16="off", val_every=1), **overrides})
    return train(ms[1:], ms[:1] if validate else [], out, cfg, ModelConfig(network=NetworkConfig(base_filters=4)), device="cpu",
                 fingerprint={"data": "medseg_mini"}, cancel=cancel, resume_state=True, resume=resume)


def test_a_stopped_run_resumed_ends_as_if_it_had_run_through(tmp_path):
    """train(resume_state=True) writes resume.pt after every epoch; a run stopped in its second
    epoch and resumed ends with the weights, history and best epoch of one that was never
    stopped (same steps, crops, schedule and weight average), and leaves no resume.pt."""
    from DRSegUNetLib.progress import Cancelled
    from DRSegUNetLib.training import RESUME_FILE

    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    through = _resumable_run(ms, tmp_path / "through")
    assert not (tmp_path / "through" / RESUME_FILE).exists() and len(through.history) == 3
    with pytest.raises(Cancelled):
        _resumable_run(ms, tmp_path / "stopped", cancel_at=4, resume=True)  # no resume.pt yet: starts anew
    assert (tmp_path / "stopped" / RESUME_FILE).exists()
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert stopped.metrics["epoch"] == 1
    assert stopped.extra["train_config"]["lr_schedule"] == "cosine"  # an enum member is stored as its value
    resumed = _resumable_run(ms, tmp_path / "stopped", resume=True)
    assert not (tmp_path / "stopped" / RESUME_FILE).exists()
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(through.history)
    assert resumed.best_epoch == through.best_epoch
    a, b = load_checkpoint(through.last_path).state_dict, load_checkpoint(resumed.last_path).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Without resume, the stopped run would have started over and ended elsewhere.
    with pytest.raises(Cancelled):
        _resumable_run(ms, tmp_path / "again", cancel_at=4)
    fresh = _resumable_run(ms, tmp_path / "again", epochs=3)
    assert strip(fresh.history) == strip(through.history)  # the same run from the start, as a check of the check


def test_a_run_stopped_after_its_last_epoch_resumes_to_its_best_pt(tmp_path, monkeypatch):
    """Without validation best.pt is written when the run ends; a run stopped after its last
    epoch's resume.pt but before that, resumed, trains nothing more and writes as best.pt the
    last epoch's checkpoint, the one an uninterrupted run writes."""
    from DRSegUNetLib import training
    from DRSegUNetLib.training import RESUME_FILE

    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    through = _resumable_run(ms, tmp_path / "through", validate=False)

    def stop(self):
        raise KeyboardInterrupt  # as if the process were killed here

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(training._Keeper, "finish", stop)
        _resumable_run(ms, tmp_path / "stopped", validate=False)
    assert (tmp_path / "stopped" / RESUME_FILE).exists() and not (tmp_path / "stopped" / "best.pt").exists()
    last = (tmp_path / "stopped" / "last.pt").read_bytes()
    resumed = _resumable_run(ms, tmp_path / "stopped", validate=False, resume=True)
    assert (tmp_path / "stopped" / "last.pt").read_bytes() == last  # no epoch ran again
    assert not (tmp_path / "stopped" / RESUME_FILE).exists()
    assert resumed.best_epoch == through.best_epoch == 3
    a, b = load_checkpoint(through.best_path), load_checkpoint(resumed.best_path)
    assert a.metrics["epoch"] == b.metrics["epoch"] == 3 and len(b.extra["history"]) == 3  # the epoch's record
    assert a.state_dict.keys() == b.state_dict.keys() and all(torch.equal(a.state_dict[k], b.state_dict[k])
                                                              for k in a.state_dict)


def test_resuming_with_other_options_or_a_damaged_state_is_refused(tmp_path):
    from DRSegUNetLib.errors import InputError
    from DRSegUNetLib.progress import Cancelled
    from DRSegUNetLib.training import RESUME_FILE

    ms = read_medseg_folder(TESTDATA / "medseg_mini")
    with pytest.raises(Cancelled):
        _resumable_run(ms, tmp_path, cancel_at=3)
    with pytest.raises(InputError, match="other train_config"):
        _resumable_run(ms, tmp_path, resume=True, lr=5e-4)
    (tmp_path / RESUME_FILE).write_bytes(b"not a state")
    with pytest.raises(InputError, match="cannot be read.*delete it"):
        _resumable_run(ms, tmp_path, resume=True)
    with pytest.raises(InputError, match="workers 0"):
        _resumable_run(ms, tmp_path / "w", workers=1)
