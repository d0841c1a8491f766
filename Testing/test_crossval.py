"""Cross-validation protocol (crossval.py): folds, threshold-averaged Dice, the MONAI baseline, the CLI."""
import json
import numpy as np
import pytest
import torch

from DRSegUNetLib.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from DRSegUNetLib.config import ModelConfig, NetworkConfig, PreprocessConfig, TrainConfig
from DRSegUNetLib.crossval import (FOLDS_PATH, MODELS, fold_of, make_folds, make_folds_from_data, source_of,
                                   split_fold)
from DRSegUNetLib.data import read_medseg_folder, read_zenodo_npz
from DRSegUNetLib.errors import CheckpointError
from DRSegUNetLib.metrics import threshold_averaged_dice
from DRSegUNetLib.preprocessing import normalize
from DRSegUNetLib.network import DRSegUNet, MonaiUNet, build_network, parameter_count
from DRSegUNetLib.training import AugmentConfig, PatchSampler, compute_loss, freeze_first_layers, train

torch.set_num_threads(1)

THESIS_UNET_PARAMS = 2_160_000  # the thesis's plain U-Net


def _paths(shared_data):
    return shared_data / "medseg" / "train50", shared_data / "zenodo20" / "zenodo20_dev.npz"


# ---------------------------------------------------------------- folds
@pytest.mark.realdata
def test_folds_file_is_what_the_generator_makes(shared_data):
    medseg, zenodo = _paths(shared_data)
    assert make_folds_from_data(medseg, zenodo) == json.loads(FOLDS_PATH.read_text())
    assert make_folds_from_data(medseg, zenodo) == make_folds_from_data(medseg, zenodo)


@pytest.mark.realdata
def test_folds_cover_every_slice_once_and_split_volumes_whole(shared_data):
    medseg, zenodo = _paths(shared_data)
    folds = json.loads(FOLDS_PATH.read_text())["folds"]
    assert len(folds) == 5
    ids = sorted(p.stem for p in (medseg / "images").glob("*.jpg"))
    listed = [i for f in folds for i in f["medseg"]]
    assert sorted(listed) == ids and len(ids) == 50
    assert [len(f["medseg"]) for f in folds] == [10] * 5
    with np.load(zenodo) as d:
        groups = d["group"]
    listed_groups = [g for f in folds for g in f["zenodo_groups"]]
    assert sorted(listed_groups) == sorted(set(groups.tolist()))  # every volume in exactly one fold
    sizes = [int(np.isin(groups, f["zenodo_groups"]).sum()) for f in folds]
    assert sizes == [f["n_zenodo_slices"] for f in folds] and sum(sizes) == len(groups)
    assert max(sizes) - min(sizes) <= 0.15 * len(groups) / 5  # roughly balanced
    # Every slice of the real data falls in one fold, and train/test never share a volume.
    samples = read_zenodo_npz(zenodo, groups=[3, 5, 8]) + read_medseg_folder(medseg, names=ids[:6])
    for k in range(5):
        tr, te = split_fold(samples, folds, k)
        assert len(tr) + len(te) == len(samples)
        assert not {s.group for s in tr if source_of(s) == "zenodo"} & {s.group for s in te if source_of(s) == "zenodo"}
        assert not {s.name for s in tr} & {s.name for s in te}
        assert all(fold_of(s, folds) == k for s in te)


def test_make_folds_is_deterministic_and_balances_groups():
    groups = np.repeat(np.arange(9), [159, 120, 118, 113, 116, 70, 93, 181, 263])
    ids = [str(i) for i in range(50)]
    a, b = make_folds(ids, groups), make_folds(list(reversed(ids)), groups)
    assert a == b
    assert make_folds(ids, groups, seed=1)["folds"][0]["medseg"] != a["folds"][0]["medseg"]
    assert sorted(g for f in a["folds"] for g in f["zenodo_groups"]) == list(range(9))
    assert [f["n_zenodo_slices"] for f in a["folds"]] == [263, 251, 252, 233, 234]


# ---------------------------------------------------------------- threshold-averaged Dice
def test_threshold_averaged_dice_hand_case():
    prob = np.array([[0.0, 0.25], [0.5, 1.0]])
    truth = np.array([[0, 0], [1, 1]])
    # t = 0, .25, .5, .75, 1 predict 4, 3, 2, 1, 1 pixels with 2, 2, 2, 1, 1 true positives:
    # Dice 4/6, 4/5, 1, 2/3, 2/3; mean 3.8 / 5.
    assert threshold_averaged_dice(prob, truth, n_thresholds=5) == pytest.approx(0.76)
    # 256 thresholds k/255: k=0 → 2/3; k=1..63 (t <= .25) → 4/5; k=64..127 (t <= .5) → 1;
    # k=128..255 → 2/3.
    expected = (129 * 2 / 3 + 63 * 0.8 + 64 * 1.0) / 256
    assert threshold_averaged_dice(prob, truth) == pytest.approx(expected)
    assert expected == pytest.approx(200.4 / 256)


def test_threshold_averaged_dice_empty_cases():
    # Empty truth, prediction 0 everywhere: t = 0 selects every pixel (Dice 0), every
    # other threshold predicts nothing: both empty, Dice 1 by definition.
    assert threshold_averaged_dice(np.zeros(4), np.zeros(4), n_thresholds=5) == pytest.approx(0.8)
    assert threshold_averaged_dice(np.zeros(4), np.zeros(4), n_thresholds=5, both_empty=0.0) == 0.0
    assert threshold_averaged_dice(np.ones(4), np.ones(4)) == 1.0
    with pytest.raises(ValueError):
        threshold_averaged_dice(np.zeros(4), np.zeros(5))


def test_threshold_averaged_dice_equals_a_plain_loop():
    rng = np.random.default_rng(0)
    prob = rng.random((13, 17)).astype(np.float32)
    truth = rng.random((13, 17)) < 0.3
    ref = []
    for t in np.linspace(0, 1, 256):
        p = prob >= t
        d = p.sum() + truth.sum()
        ref.append(2 * (p & truth).sum() / d if d else 1.0)
    assert threshold_averaged_dice(prob, truth) == pytest.approx(np.mean(ref), abs=1e-12)


# ---------------------------------------------------------------- the MONAI baseline
def test_monai_unet_has_about_the_thesis_unet_parameter_count():
    n = parameter_count(build_network(MODELS["monai-unet"]))
    print(f"monai-unet parameters: {n:,} (thesis U-Net {THESIS_UNET_PARAMS:,})")
    assert abs(n - THESIS_UNET_PARAMS) <= 0.10 * THESIS_UNET_PARAMS


def test_build_network_by_arch_and_any_input_size():
    assert type(build_network(NetworkConfig(base_filters=4))) is DRSegUNet
    m = build_network(NetworkConfig(arch="monai_unet", base_filters=4)).eval()
    assert isinstance(m, MonaiUNet)
    with torch.no_grad():
        assert m(torch.randn(1, 1, 37, 50)).shape == (1, 4, 37, 50)
    with pytest.raises(ValueError, match="unknown network arch"):
        build_network(NetworkConfig(arch="vnet"))
    with pytest.raises(ValueError, match="build_network"):
        DRSegUNet(NetworkConfig(arch="monai_unet"))
    with pytest.raises(ValueError, match="DRSegUNet only"):
        freeze_first_layers(m, 2)
    assert freeze_first_layers(m, 0) == []


def test_missing_monai_is_a_clear_error(monkeypatch):
    for mod in ("monai", "monai.networks", "monai.networks.nets"):
        monkeypatch.setitem(__import__("sys").modules, mod, None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install monai"):
        build_network(NetworkConfig(arch="monai_unet", base_filters=4))
    assert isinstance(build_network(NetworkConfig(base_filters=4)), DRSegUNet)  # DRSegUNet needs no monai


def test_monai_checkpoint_round_trip_and_old_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(network=NetworkConfig(arch="monai_unet", base_filters=4, res_units=1),
                      preprocess=PreprocessConfig(mean=-600.0, std=420.0))
    model = build_network(cfg.network).eval()
    save_checkpoint(Checkpoint.from_model(model, cfg), tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == cfg
    x = torch.randn(2, 1, 40, 56)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.build_model()(x))
    # A checkpoint written before NetworkConfig had arch/res_units is a DRSegUNet.
    old = ModelConfig(network=NetworkConfig(base_filters=4))
    d = Checkpoint.from_model(DRSegUNet(old.network), old).to_dict()
    for key in ("arch", "res_units"):
        del d["config"]["network"][key]
    torch.save(d, tmp_path / "old.pt")
    assert isinstance(load_checkpoint(tmp_path / "old.pt").build_model(), DRSegUNet)
    # An arch this code does not know is a checkpoint error, not a crash.
    d["config"]["network"]["arch"] = "vnet"
    torch.save(d, tmp_path / "vnet.pt")
    with pytest.raises(CheckpointError, match="vnet"):
        load_checkpoint(tmp_path / "vnet.pt").build_model()


# ---------------------------------------------------------------- training and the CLI on real slices
@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["drsegunet", "monai_unet"])
def test_short_training_on_real_slices_lowers_the_validation_loss(tmp_path, shared_data, arch):
    medseg, zenodo = _paths(shared_data)
    samples = read_medseg_folder(medseg, names=["0", "3", "4", "10"]) + read_zenodo_npz(zenodo, groups=[5])[::20]
    ncfg = NetworkConfig(arch=arch, base_filters=8)
    cfg = TrainConfig(epochs=1, steps_per_epoch=30, batch_size=4, crop=64, lr=1e-3, loss="ce+dice", seed=0)
    res = train(samples, [], tmp_path, cfg, ModelConfig(network=ncfg), device="cpu")
    ckpt = load_checkpoint(res.last_path)
    assert ckpt.config.network.arch == arch
    # Validation loss: a fixed batch of crops from held-out slices (other MedSeg ids, another
    # CT volume), scored by the initial network (same seed, same init) and the trained one.
    held_out = read_medseg_folder(medseg, names=["23", "25"]) + read_zenodo_npz(zenodo, groups=[6])[::20]
    assert not {s.name for s in held_out} & {s.name for s in samples}
    hu, allowed = PatchSampler(held_out, 64, AugmentConfig(), seed=123).batch(8)
    x, y = torch.from_numpy(normalize(hu, ckpt.config.preprocess)).unsqueeze(1), torch.from_numpy(allowed)
    torch.manual_seed(cfg.seed)
    before_net = build_network(ncfg).eval()
    after_net = ckpt.build_model()
    with torch.no_grad():
        before = compute_loss(before_net(x), y, "ce").item()
        after = compute_loss(after_net(x), y, "ce").item()
    print(f"{arch}: validation loss on a fixed held-out batch {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before


def test_crossval_has_help():
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, "-m", "DRSegUNetLib", "crossval", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout and "--models" in r.stdout and "--limit-slices" not in r.stdout


@pytest.mark.realdata
@pytest.mark.slow
def test_crossval_cli_writes_fold_results_and_the_table(tmp_path, shared_data, capsys):
    from DRSegUNetLib.cli import main

    medseg, zenodo = _paths(shared_data)
    out = tmp_path / "cv"
    argv = ["crossval", str(medseg), str(zenodo), "--out", str(out), "--folds", "1", "--epochs", "1",
            "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--base-filters", "4",
            "--limit-slices", "2", "--threads", "1", "--device", "cpu"]
    assert main(argv) == 0
    folds = json.loads(FOLDS_PATH.read_text())["folds"]
    for name in MODELS:
        r = json.loads((out / name / "fold1" / "result.json").read_text())
        assert (out / name / "fold1" / "last.pt").is_file() and not (out / name / "fold1" / "best.pt").exists()
        assert r["n_train"] == {"medseg": 2, "zenodo": 2} and r["n_test"] == {"medseg": 2, "zenodo": 2}
        assert set(r["test_slices"]["medseg"]) <= set(folds[1]["medseg"])
        assert set(r["metrics"]["medseg"]) == {"ggo", "consolidation", "infection"}
        assert set(r["metrics"]["zenodo"]) == {"infection", "lung"}
        assert 0 <= r["threshold_averaged_dice"]["zenodo"]["lung"]["mean"] <= 1
        assert r["protocol"]["train"]["steps_per_epoch"] == 2 and r["parameters"] > 0
    assert load_checkpoint(out / "monai-unet" / "fold1" / "last.pt").config.network.arch == "monai_unet"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == set(MODELS)
    assert summary["models"]["drsegunet"]["results"]["medseg"]["ggo"]["dice"]["n_folds"] == 1
    md = (out / "summary.md").read_text()
    assert "| monai-unet | MedSeg | ggo |" in md and "TA-Dice" in md
    # A rerun skips the finished folds (same results); other settings in the same folder are refused.
    mtime = (out / "drsegunet" / "fold1" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "drsegunet" / "fold1" / "result.json").stat().st_mtime_ns == mtime
    changed = list(argv)
    changed[changed.index("--steps-per-epoch") + 1] = "3"
    assert main(changed) == 2
