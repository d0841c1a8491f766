"""Accepted corrections guide the next segmentation of their volume (DRSegUNetLib/guidance.py):
the pull on a slice's probabilities, which corrections belong to a volume, and `segment` on a
real COVID-19-CT-Seg volume before and after 5 slices are accepted."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TESTDATA

from DRSegUNetLib.cli import main
from DRSegUNetLib.data import labels_to_allowed
from DRSegUNetLib.guidance import REACH, STRENGTH, CorrectionGuide, guide_for_image, pull
from DRSegUNetLib.imageio import read_ct
from DRSegUNetLib.orientation import axial_spacing, axial_view
from DRSegUNetLib.store import CorrectionsStore
from DRSegUNetLib.vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG

CT64 = TESTDATA / "cip_ct64" / "ct-64.nrrd"


def _prob(*pixels):
    """Probabilities (C=4, 1, n) from per-pixel class probability lists."""
    return torch.tensor(np.array(pixels, np.float32).T[:, None, :])


def test_pull_moves_each_pixel_toward_what_the_accepted_slice_allows():
    p = _prob([0.1, 0.6, 0.1, 0.2], [0.1, 0.6, 0.1, 0.2], [0.1, 0.6, 0.1, 0.2], [0.5, 0.0, 0.0, 0.5])
    labels = np.array([[LUNG, GGO, BACKGROUND, GGO]], np.uint8)
    # Pixel 1 and 3 are a lesion whose type was left open; pixel 0 is lung, pixel 2 background.
    allowed = labels_to_allowed(labels, ("lung", "infection"))
    q = pull(p, allowed, 1.0)[:, 0, :].numpy().T
    np.testing.assert_allclose(q[0], [0, 0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(q[1], [0, 6 / 7, 1 / 7, 0], atol=1e-6)  # the model's GGO:consolidation ratio
    np.testing.assert_allclose(q[2], [1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(q[3], [0, 0.5, 0.5, 0], atol=1e-6)  # no probability on either: uniform
    half = pull(p, allowed, 0.5)[:, 0, :].numpy().T
    np.testing.assert_allclose(half, 0.5 * p[:, 0, :].numpy().T + 0.5 * q, atol=1e-6)
    # A segment nobody checked leaves the model's probabilities alone.
    unchecked = labels_to_allowed(labels, ("consolidation",))
    np.testing.assert_allclose(pull(p, unchecked, 1.0)[:, 0, 0].numpy(), [1 / 9, 6 / 9, 0, 2 / 9], atol=1e-6)


def test_the_weight_falls_with_the_distance_to_the_nearest_accepted_slice():
    g = CorrectionGuide({10: np.zeros((2, 2), np.uint8), 30: np.zeros((2, 2), np.uint8)})
    assert g.nearest(10) == (10, 1.0)  # the accepted slice itself: its labels
    near, w = g.nearest(12)
    assert near == 10 and w == pytest.approx(STRENGTH * math.exp(-2 / REACH))
    assert g.nearest(19)[0] == 10 and g.nearest(21)[0] == 30
    assert g.nearest(20)[0] == 10  # a tie goes to the lower slice
    assert g.nearest(60) is None  # out of reach: left alone
    assert CorrectionGuide({}).nearest(3) is None
    p = torch.rand(3, 4, 2, 2)
    assert CorrectionGuide({}).apply(p, 0) is p


def _lung_labels_of(image) -> np.ndarray:
    lung = sitk.GetArrayFromImage(read_ct(TESTDATA / "cip_lungs" / "wholeLung-64.nrrd"))
    return np.where(lung > 0, LUNG, BACKGROUND).astype(np.uint8)


def test_only_corrections_of_this_volume_guide_it(tmp_path):
    """A correction belongs to the volume whose axial slice at its index is its CT slice: the
    same real CT matches, a changed copy or another grid does not; the latest acceptance wins."""
    ct = read_ct(CT64)
    view = axial_view(sitk.GetArrayFromImage(ct), ct.GetDirection())[0]
    labels = axial_view(_lung_labels_of(ct), ct.GetDirection())[0]
    spacing = axial_spacing(ct.GetSpacing(), ct.GetDirection())
    store = CorrectionsStore(tmp_path / "store")
    store.add(view[30], labels[30], spacing, "ct-64", 30)
    store.add(view[40], labels[40], spacing, "ct-64", 40, known=("lung",))
    later = labels[40].copy()
    later[later == LUNG] = GGO
    store.add(view[40], later, spacing, "ct-64", 40)
    store.add(view[41], labels[41], spacing, "ct-64 (wrong index)", 44)  # not this volume's slice 44
    store.add(view[50], labels[50], (spacing[0] * 2, spacing[1]), "resampled", 50)

    guide = guide_for_image(store, ct)
    assert guide.slices == [30, 40]
    np.testing.assert_array_equal(guide.allowed[40], labels_to_allowed(later))
    changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(ct) + 5)
    changed.CopyInformation(ct)
    assert len(guide_for_image(store, changed)) == 0
    assert len(guide_for_image(CorrectionsStore(tmp_path / "absent"), ct)) == 0
    assert len(guide_for_image(None, ct)) == 0


def test_segment_refuses_a_corrections_folder_that_is_not_there(tmp_path, capsys):
    assert main(["segment", str(CT64), str(tmp_path / "l.nii.gz"), "--corrections", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "l.nii.gz").exists()


def _infection_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    a, b = (labels == GGO) | (labels == CONSOLIDATION), truth == GGO
    return 2.0 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)


@pytest.mark.slow
@pytest.mark.realdata
def test_accepted_slices_make_the_rest_of_a_real_volume_better(shared_data, tmp_path, capsys, bundled_model):
    """COVID-19-CT-Seg volume 5 (70 contiguous slices, 8-bit mapped to HU by the model's rule,
    1.5 mm pixels): the experts' lung and lesion outline accepted on 5 evenly spaced slices
    (`corrections add` into the default store), `segment` again with the bundled model. The
    accepted slices come back as accepted, the other 65 gain (+0.09 measured), and
    `--corrections none` gives the first result back."""
    from DRSegUNetLib.data import read_zenodo_npz

    samples = [s for s in read_zenodo_npz(shared_data / "zenodo20" / "zenodo20_dev.npz") if s.group == "zenodo5"]
    hu = np.stack([s.hu for s in samples]).astype(np.int16)
    truth = np.stack([np.where(s.region_truth("infection"), GGO, np.where(s.region_truth("lung"), LUNG, BACKGROUND))
                      for s in samples]).astype(np.uint8)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.5, 1.0))
    truth_image = sitk.GetImageFromArray(truth)
    truth_image.CopyInformation(image)
    ct, truth_path = tmp_path / "vol5.nii.gz", tmp_path / "truth5.nii.gz"
    sitk.WriteImage(image, str(ct))
    sitk.WriteImage(truth_image, str(truth_path))
    model = ["--model", str(bundled_model), "--threads", "2"]

    assert main(["segment", str(ct), str(tmp_path / "before.nii.gz"), *model]) == 0
    picked = [7, 21, 35, 48, 62]
    assert main(["corrections", "add", str(ct), str(truth_path), "--slices", ",".join(map(str, picked)),
                 "--known", "lung,infection"]) == 0  # the default store ($DRSEGUNET_HOME)
    assert main(["segment", str(ct), str(tmp_path / "after.nii.gz"), "--report", str(tmp_path / "r.json"), *model]) == 0
    assert main(["segment", str(ct), str(tmp_path / "off.nii.gz"), "--corrections", "none", *model]) == 0
    capsys.readouterr()

    def read(name):
        # The axial view of this identity-direction volume is its array order.
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))

    before, after = read("before.nii.gz"), read("after.nii.gz")
    for k in picked:
        lesion = (after[k] == GGO) | (after[k] == CONSOLIDATION)
        np.testing.assert_array_equal(lesion, truth[k] == GGO)
    rest = [k for k in range(len(samples)) if k not in picked]
    d0 = np.mean([_infection_dice(before[k], truth[k]) for k in rest])
    d1 = np.mean([_infection_dice(after[k], truth[k]) for k in rest])
    assert d1 > d0 + 0.04, (d0, d1)
    np.testing.assert_array_equal(read("off.nii.gz"), before)
    assert json.loads((tmp_path / "r.json").read_text())["guided_by_accepted_slices"] == picked
