"""The bundled model on real data it was not trained on (held-out part of the bundled split).

These are the model card's numbers, recomputed: a model that regresses fails here.
"""
import json
from pathlib import Path

import pytest

from DRSegUNetLib.cli import main
from DRSegUNetLib.checkpoint import load_checkpoint
from DRSegUNetLib.network import keras_parameter_count

# Regression floors on the held-out test slices (mean Dice over slices), a little below
# what the bundled model measured (MODEL_CARD.md: GGO 0.573, MedSeg infection 0.728,
# lung 0.979). The GGO floor is issue 2's first target.
TARGETS = {("medseg", "ggo"): 0.55, ("medseg", "infection"): 0.70, ("zenodo", "infection"): 0.47, ("zenodo", "lung"): 0.97}


def test_bundled_model_is_small_fp16_and_describes_itself(bundled_model):
    ck = load_checkpoint(bundled_model)
    assert bundled_model.stat().st_size < 15e6
    assert all(v.dtype.is_floating_point is False or str(v.dtype) == "torch.float16" for v in ck.state_dict.values())
    assert keras_parameter_count(ck.build_model()) == 5_484_276
    assert ck.fingerprint["data"] and ck.extra["command"] and ck.extra["export_commit"]
    assert set(ck.metrics["test"]) == {"train50", "zenodo20_dev.npz"}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["medseg", "zenodo"])
def test_held_out_accuracy(tmp_path, shared_data, bundled_model, dataset):
    """The model card's table: the slices on their own grid (--slice-pixel-mm 0)."""
    data = shared_data / ("medseg/train50" if dataset == "medseg" else "zenodo20/zenodo20_dev.npz")
    out = tmp_path / "m.json"
    assert main(["evaluate", str(data), "--split-part", "test", "--slice-pixel-mm", "0", "--json", str(out),
                 "--device", "cpu"]) == 0
    m = json.loads(out.read_text())["metrics"]
    for (ds, region), target in TARGETS.items():
        if ds == dataset:
            assert m[region]["mean"]["dice"] >= target, (region, m[region]["mean"])


@pytest.mark.slow
def test_held_out_covid_slices_at_the_working_pixel_size(tmp_path, shared_data, bundled_model):
    """evaluate's default: COVID-19-CT-Seg test slices taken as the data set's 1.5 mm pixels, so
    the network sees them at the model's 1.2 mm working pixel as it sees CT in segment
    (docs/hu_lungs.md): measured infection 0.585 (0.499 on their own grid) and lung 0.982.
    Floors a little below."""
    out = tmp_path / "z.json"
    assert main(["evaluate", str(shared_data / "zenodo20/zenodo20_dev.npz"), "--split-part", "test",
                 "--json", str(out), "--device", "cpu"]) == 0
    e = json.loads(out.read_text())
    assert (e["slice_pixel_mm"], e["slice_pixel_mm_from"], e["pixel_mm"]) == (1.5, "data set", 1.2)
    m = e["metrics"]
    assert m["infection"]["mean"]["dice"] >= 0.56 and m["lung"]["mean"]["dice"] >= 0.975, m


def _lung_field(image, **inference_kw):
    import numpy as np
    import SimpleITK as sitk

    from DRSegUNetLib import default_model_path
    from DRSegUNetLib.inference import Predictor
    from DRSegUNetLib.vocabulary import REGIONS

    labels = Predictor.from_checkpoint(default_model_path(), "cpu", **inference_kw).predict(image)
    return np.isin(sitk.GetArrayFromImage(labels), REGIONS["lung"])


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_finds_the_lungs_on_real_hu_ct_at_its_working_pixel_size():
    """Issue 5's HU target on the bundled real slices (all of docs/hu_lungs.md: bench/hu_lungs.py).

    COVID-19-NY-SBU A002304-135 (0.64 mm pixels; its thesis lung extraction is clean):
    lung field vs extraction measured 0.930 at the default 1.2 mm working pixel, 0.875 on
    the native grid. CIP crop_ct_2slices (0.59 mm, COPD): vs CIP's lung mask 0.989 and
    0.990, native grid 0.415 and 0.453 (dark emphysematous lung taken for outside air).
    Floors: the target 0.90 on the COVID slice, 0.95 on CIP (the extraction itself scores
    0.978 there), and the native grid must stay clearly worse on CIP, or the test would
    not show that the working pixel size is what finds the lungs."""
    import SimpleITK as sitk

    from DRSegUNetLib import sample_ct_path
    from DRSegUNetLib.imageio import read_ct
    from DRSegUNetLib.lungs import extract_lungs

    covid = read_ct(sample_ct_path())
    extraction = sitk.GetArrayFromImage(extract_lungs(covid)).astype(bool)
    assert _dice(_lung_field(covid), extraction) >= 0.90

    cip_dir = Path(__file__).resolve().parent / "data" / "cip_lungs"
    cip = read_ct(cip_dir / "crop_ct_2slices.nrrd")
    truth = sitk.GetArrayFromImage(read_ct(cip_dir / "crop_ct_2slices_lungmask_DERIVED.nrrd")) > 0
    field = _lung_field(cip)
    native = _lung_field(cip, pixel_mm=None)
    for z in range(2):
        assert _dice(field[z], truth[z]) >= 0.95, z
        assert _dice(native[z], truth[z]) < 0.80, z


def test_the_bundled_model_predates_its_own_rule_and_gets_todays(bundled_model):
    """The bundled checkpoint has no ModelConfig.inference (it is not rewritten): it loads with
    the 1.2 mm working pixel, argmax and the body restriction, the rule it was chosen with."""
    import torch

    from DRSegUNetLib.config import InferenceConfig, ModelInference
    from DRSegUNetLib.inference import Predictor

    assert "inference" not in torch.load(bundled_model, map_location="cpu", weights_only=True)["config"]
    assert load_checkpoint(bundled_model).config.inference == ModelInference()
    assert Predictor.from_checkpoint(bundled_model, "cpu").inference == InferenceConfig()
    assert InferenceConfig().pixel_mm == 1.2 and InferenceConfig().decision == "argmax"
