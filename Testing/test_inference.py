import numpy as np
import pytest
import SimpleITK as sitk

from DRSegUNetLib.errors import Cancelled, InputError
from DRSegUNetLib.inference import Predictor
from DRSegUNetLib.orientation import axial_view


def _phantom(shape=(5, 40, 48)) -> sitk.Image:
    """Geometry-only phantom in HU: body disc, two dark lungs, an asymmetric blob."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    a = np.full(shape, -1000.0, np.float32)
    a[((y - 20) ** 2 / 18**2 + (x - 24) ** 2 / 22**2) < 1] = 40
    a[((y - 20) ** 2 / 12**2 + (x - 14) ** 2 / 6**2) < 1] = -850
    a[((y - 20) ** 2 / 12**2 + (x - 34) ** 2 / 6**2) < 1] = -850
    a[(z >= 2) & ((y - 15) ** 2 + (x - 12) ** 2 < 9)] = -400
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    return img


def test_axial_view_matches_dicom_orient_for_all_axis_orders():
    img = _phantom()
    arr = sitk.GetArrayFromImage(img)
    for order in [(0, 1, 2), (2, 0, 1), (1, 2, 0), (0, 2, 1)]:
        for flips in [(False, False, False), (True, False, True)]:
            other = sitk.Flip(sitk.PermuteAxes(img, order), flips)
            view, inverse = axial_view(sitk.GetArrayFromImage(other), other.GetDirection())
            np.testing.assert_array_equal(view, arr)
            np.testing.assert_array_equal(inverse(view), sitk.GetArrayFromImage(other))


def test_non_identity_direction_comes_back_aligned(tiny_checkpoint):
    p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", batch_size=2)
    img = _phantom()
    ref = p.predict(img)
    other = sitk.Flip(sitk.PermuteAxes(img, (2, 0, 1)), (True, False, True))
    assert other.GetDirection() != img.GetDirection()
    out = p.predict(other)
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(out, attr)() == getattr(other, attr)()
    # Same physical voxels get the same labels: map back onto the reference grid.
    back = sitk.Resample(out, ref, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ref))
    assert len(np.unique(sitk.GetArrayFromImage(ref))) > 1


def test_slices_stream_with_progress_and_cancel(tiny_checkpoint):
    p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", batch_size=2)
    img = _phantom()
    events = []
    results = list(p.iter_slices(img, progress=lambda s, i, n, m="", **k: events.append((s, i, n))))
    assert [r.index for r in results] == list(range(5))
    assert events[0] == ("segment", 0, 5) and events[-1] == ("segment", 5, 5)
    volume = np.zeros(img.GetSize()[::-1], np.uint8) + 9
    for r in results:
        r.place(volume)
    np.testing.assert_array_equal(volume, sitk.GetArrayFromImage(p.predict(img)))
    lung_field = np.zeros_like(volume)
    for r in results:
        r.place(lung_field, labels=(1, 2, 3))
    np.testing.assert_array_equal(lung_field, np.isin(volume, (1, 2, 3)))
    seen = []
    with pytest.raises(Cancelled):
        for r in p.iter_slices(img, cancel=lambda: len(seen) >= 2):
            seen.append(r.index)
    assert seen == [0, 1]


def test_threshold_decision_leaves_uncertain_pixels_background(tiny_checkpoint):
    img = _phantom()
    arg = sitk.GetArrayFromImage(Predictor.from_checkpoint(tiny_checkpoint, "cpu").predict(img))
    thr = sitk.GetArrayFromImage(Predictor.from_checkpoint(tiny_checkpoint, "cpu", decision="threshold").predict(img))
    changed = arg != thr
    assert np.all(thr[changed] == 0)


@pytest.mark.parametrize("make,message", [
    (lambda: sitk.Image([8, 8], sitk.sitkFloat32), "2D"),
    (lambda: sitk.Image([4, 4, 4, 2], sitk.sitkInt16), "4D"),
    (lambda: sitk.Image([8, 8, 2], sitk.sitkVectorUInt8, 3), "components"),
    (lambda: sitk.Image([8, 8, 2], sitk.sitkUInt8), "8-bit"),
])
def test_bad_volumes_are_refused(tiny_checkpoint, make, message):
    p = Predictor.from_checkpoint(tiny_checkpoint, "cpu")
    with pytest.raises(InputError, match=message):
        p.predict(make())


def test_labels_outside_the_body_are_background():
    from DRSegUNetLib.inference import restrict_to_body

    hu = np.full((1, 20, 20), -1000.0)
    hu[0, 5:15, 5:15] = 40.0  # body
    hu[0, 8:12, 8:12] = -850.0  # lung inside it
    labels = np.full((1, 20, 20), 3, np.uint8)
    out = restrict_to_body(labels, hu, -500.0)
    assert out[0, 5:15, 5:15].tolist() == labels[0, 5:15, 5:15].tolist()  # inside kept, lung hole included
    assert int(out.sum()) == 3 * 100


def test_body_of_eight_bit_slices_keeps_their_lung(tiny_checkpoint):
    # Real COVID-19-CT-Seg slices (8-bit, approx. HU; Testing/data/PROVENANCE.md). In the
    # group-2 slice (dev row 338) fat falls below -500, so a fixed -500 body ends at the fat
    # and clears most of the expert lung; each slice's Otsu level keeps it, and still clears
    # the air round the patient.
    from conftest import TESTDATA
    from DRSegUNetLib.config import EightBitConfig
    from DRSegUNetLib.inference import restrict_to_body
    from DRSegUNetLib.preprocessing import eight_bit_to_hu

    with np.load(TESTDATA / "zenodo_lungs.npz") as d:
        hu = np.stack([eight_bit_to_hu(s, EightBitConfig()) for s in d["ct_uint8"]])
        lung = d["lung_mask"] > 0
    labels = np.where(lung, 3, 0).astype(np.uint8)
    everything = np.full(labels.shape, 3, np.uint8)
    kept = lambda out: ((out > 0) & lung).sum(axis=(1, 2)) / lung.sum(axis=(1, 2))  # noqa: E731
    fixed = kept(restrict_to_body(labels, hu, -500.0))
    assert fixed[2] < 0.2  # the defect the 8-bit rule mends (0.114 measured)
    otsu = kept(restrict_to_body(labels, hu, -500.0, eight_bit=True))
    assert otsu.min() > 0.99
    body = restrict_to_body(everything, hu, -500.0, eight_bit=True) > 0
    assert not body[:, 0, :].any() and not body[:, -1, :].any()  # the image's top and bottom rows are outside air
    assert 0.3 < body.mean() < 0.8
    # The Predictor passes the flag through (the two rules give different labels here).
    from DRSegUNetLib.inference import decide

    p = Predictor.from_checkpoint(tiny_checkpoint, "cpu")
    lab8, prob = p.labels(hu[2:3], eight_bit=True)
    raw = decide(prob, p.inference).numpy()
    want8, want_hu = (restrict_to_body(raw, hu[2:3], -500.0, eight_bit=e) for e in (True, False))
    assert not np.array_equal(want8, want_hu)
    np.testing.assert_array_equal(lab8, want8)
    np.testing.assert_array_equal(p.labels(hu[2:3])[0], want_hu)


def test_readers_mark_eight_bit_slices_and_resampling_keeps_it():
    # The flag restrict_to_body's 8-bit rule depends on travels with the slices.
    from conftest import TESTDATA
    from DRSegUNetLib.data import read_dataset, resample_sample
    from DRSegUNetLib.slices import read_slices

    samples = read_dataset(TESTDATA / "zenodo_mini.npz") + read_dataset(TESTDATA / "medseg_mini")
    assert samples and all(s.eight_bit for s in samples)
    assert resample_sample(samples[0], (0.7, 0.7), 1.2).eight_bit
    assert read_slices(TESTDATA / "zenodo_mini.npz").eight_bit
    assert not read_slices(TESTDATA / "cip_ct64" / "ct-64.nrrd").eight_bit


def test_cropped_slices_are_not_restricted():
    from DRSegUNetLib.inference import restrict_to_body

    hu = np.full((1, 20, 20), 40.0)
    hu[0, :6, :] = -850.0  # a lung cut by the crop reaches the border (0.4 of it)
    labels = np.full((1, 20, 20), 3, np.uint8)
    np.testing.assert_array_equal(restrict_to_body(labels, hu, -500.0), labels)


def test_flip_tta_averages_the_mirror_and_is_mirror_equivariant(tiny_checkpoint):
    """flip_tta: P = (p(x) + mirror(p(mirror(x)))) / 2, so a mirrored slice gets mirrored labels."""
    import torch

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 200, (1, 48, 40)).astype(np.float32)
    plain = Predictor.from_checkpoint(tiny_checkpoint, "cpu", cpu_bf16="off")
    tta = Predictor.from_checkpoint(tiny_checkpoint, "cpu", cpu_bf16="off", flip_tta=True)
    p, q = plain.probabilities(hu), tta.probabilities(hu)
    expected = 0.5 * (p + plain.probabilities(np.ascontiguousarray(hu[..., ::-1])).flip(-1))
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p, q, atol=1e-4)  # the network alone is not mirror-symmetric
    mirrored = tta.probabilities(np.ascontiguousarray(hu[..., ::-1]))
    torch.testing.assert_close(mirrored, q.flip(-1), rtol=1e-5, atol=1e-6)


def test_working_pixel_size_resamples_for_the_network_and_back(tiny_checkpoint):
    """CT with a known geometry runs through the network at InferenceConfig.pixel_mm; the
    labels come back on the CT's own grid, identical to per-slice calls with that spacing."""
    rng = np.random.default_rng(0)
    hu = rng.normal(-700, 200, (3, 96, 80)).astype(np.float32)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing((0.7, 0.7, 2.0))
    seen = []
    p = Predictor.from_checkpoint(tiny_checkpoint, "cpu", pixel_mm=1.4, batch_size=2)
    p.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    out = sitk.GetArrayFromImage(p.predict(img))
    assert seen == [(48, 40), (48, 40)] and out.shape == hu.shape
    per_slice = np.concatenate([p.labels(hu[k:k + 1], (0.7, 0.7))[0] for k in range(3)])
    np.testing.assert_array_equal(out, per_slice)
    # Anisotropic pixels: rows and columns resampled separately.
    assert p.working_size((96, 80), (0.7, 1.4)) == (48, 80)
    # Within 5 % of the working pixel, without a spacing, or with pixel_mm=None: own grid.
    assert p.working_size((96, 80), (1.35, 1.35)) is None and p.working_size((96, 80), None) is None
    seen.clear()
    img.SetSpacing((1.4, 1.4, 2.0))
    p.predict(img)
    assert seen == [(96, 80), (96, 80)]
    q = Predictor.from_checkpoint(tiny_checkpoint, "cpu", pixel_mm=None)
    assert q.working_size((96, 80), (0.7, 0.7)) is None
    # A spacing no chest CT has (cm read as mm, or a thumbnail) keeps the own grid, not a huge one.
    assert p.working_size((512, 512), (70.0, 70.0)) is None and p.working_size((512, 512), (0.01, 0.01)) is None


def test_devices_this_machine_lacks_are_one_line_errors(monkeypatch):
    import torch

    from DRSegUNetLib.inference import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="CUDA is not available on this machine; use --device cpu or auto"):
            resolve_device(name)
    for name in ("tpu", "cuda:x", "meta", ""):
        with pytest.raises(InputError, match="unknown device"):
            resolve_device(name)
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_truncated_nifti_is_refused(tmp_path, name):
    from DRSegUNetLib.imageio import read_ct

    image = _phantom((6, 40, 48))
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    assert read_ct(path).GetSize() == image.GetSize()
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1):
        (tmp_path / f"cut-{name}").write_bytes(data[:cut])
        with pytest.raises(InputError, match="is truncated"):
            read_ct(tmp_path / f"cut-{name}")


def test_a_model_is_applied_with_its_own_working_pixel_and_decision(tmp_path, tiny_checkpoint):
    """Predictor.from_checkpoint reads ModelConfig.inference; keyword arguments override it."""
    from dataclasses import replace

    from DRSegUNetLib.checkpoint import load_checkpoint, save_checkpoint
    from DRSegUNetLib.config import InferenceConfig, ModelInference

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt.config = replace(ckpt.config, inference=ModelInference(pixel_mm=1.4, decision="threshold", threshold=0.7,
                                                                body_threshold_hu=-400.0))
    save_checkpoint(ckpt, tmp_path / "own.pt")
    p = Predictor.from_checkpoint(tmp_path / "own.pt", "cpu")
    assert (p.inference.pixel_mm, p.inference.decision, p.inference.threshold, p.inference.body_threshold_hu) == \
        (1.4, "threshold", 0.7, -400.0)
    assert p.working_size((96, 80), (0.7, 0.7)) == (48, 40) and p.settings()["pixel_mm"] == 1.4
    q = Predictor.from_checkpoint(tmp_path / "own.pt", "cpu", pixel_mm=None, decision="argmax")
    assert q.inference.pixel_mm is None and q.inference.decision == "argmax" and q.inference.threshold == 0.7
    # Built from a network and its config: the config's rule too.
    assert Predictor(ckpt.build_model(), ckpt.config, "cpu").inference == p.inference
    # A model with the default rule: InferenceConfig's defaults.
    assert Predictor.from_checkpoint(tiny_checkpoint, "cpu").inference == InferenceConfig()
