"""The Slicer module's logic against real MRML (slicer-core), with stand-ins only for qt/ctk/ScriptedLoadableModule.

Segments a real CT volume node slice by slice, checks segments (names, colours,
terminology, geometry), cancels half-way, accepts corrections from an edited
segmentation, fine-tunes through a process runner, saves a .seg.nrrd and reads it
back with slicerio, and runs the headless script under plain Python.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import unittest
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is in requirements-dev.txt")

import slicer_stubs  # noqa: E402  (Testing/ is on sys.path)

slicer = slicer_stubs.install()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DRSegUNet"))

import DRSegUNet as module  # noqa: E402
import DRSegUNetSlicer as lib  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from DRSegUNetLib.errors import Cancelled  # noqa: E402
from DRSegUNetLib.orientation import axial_view  # noqa: E402
from DRSegUNetLib.store import CorrectionsStore, ModelStore  # noqa: E402
from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO, LUNG, SEGMENTS  # noqa: E402

CT64 = Path(__file__).resolve().parent / "data" / "cip_ct64" / "ct-64.nrrd"


# ----------------------------------------------------------------- helpers


class ThresholdPredictor:
    """Follows the Predictor contract with a fixed HU rule, so geometry and flow are checkable exactly."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    @staticmethod
    def rule(hu: np.ndarray) -> np.ndarray:
        lab = np.zeros(hu.shape, np.uint8)
        lab[(hu > -1000) & (hu < -600)] = LUNG
        lab[(hu >= -600) & (hu < -300)] = GGO
        lab[(hu >= -300) & (hu < -100)] = CONSOLIDATION
        return lab

    def iter_slices(self, image, progress=None, cancel=None):
        from DRSegUNetLib.inference import SliceResult

        view, _ = axial_view(sitk.GetArrayFromImage(image), image.GetDirection())
        for n in range(view.shape[0]):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            time.sleep(self.delay)
            yield SliceResult(n, view.shape[0], self.rule(view[n]), image.GetDirection())

    def predict_array(self, image) -> np.ndarray:
        out = np.zeros(image.GetSize()[::-1], np.uint8)
        for r in self.iter_slices(image):
            r.place(out)
        return out


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """Nothing a test does may land in the user's real data folder."""
    monkeypatch.setenv("DRSEGUNET_HOME", str(tmp_path / "home"))


@pytest.fixture()
def scene():
    return slicer_stubs.new_scene()


@pytest.fixture()
def stores(tmp_path, tiny_checkpoint):
    return (ModelStore(tmp_path / "models", bundled=tiny_checkpoint), CorrectionsStore(tmp_path / "corrections"))


@pytest.fixture()
def logic(scene, stores):
    models, corrections = stores
    return lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections,
                              predictorFactory=lambda path, device: ThresholdPredictor())


@pytest.fixture(scope="module")
def ct_image():
    from DRSegUNetLib.imageio import read_ct

    return read_ct(CT64)


def _oblique_image(ct_image) -> sitk.Image:
    """The real CT with axes permuted and flipped and a non-identity direction (same physical content)."""
    from geometry_helpers import oblique_image

    return oblique_image(ct_image)


def _segment_names(node):
    seg = node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


# ----------------------------------------------------------------- module and geometry


def test_module_metadata():
    parent = type("Parent", (), {})()
    module.DRSegUNet(parent)
    assert parent.title == "DRSegUNet" and parent.categories == ["Segmentation"]


def test_volume_sitk_round_trip_with_non_identity_direction(scene, ct_image):
    img = _oblique_image(ct_image)
    node = lib.volumeNodeFromSitkImage(img, "oblique", scene)
    # A voxel lands at the same place: SimpleITK (LPS) vs the node's IJK→RAS.
    ijk = (3, 5, 7)
    lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
    ras = lib.ijkToRasArray(node) @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    back = lib.sitkImageFromVolumeNode(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing())
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin())
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-12)


# ----------------------------------------------------------------- segment


def _check_segments(logic, job, volume, expected_labels):
    node = job.segmentationNode
    assert _segment_names(node) == [s.name for s in SEGMENTS]
    segmentation = node.GetSegmentation()
    for s in SEGMENTS:
        segment = segmentation.GetSegment(s.segment_id)
        assert segment.GetName() == s.name
        np.testing.assert_allclose(segment.GetColor(), s.color)
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        assert segment.GetTerminology() == s.terminology  # SetTerminology (slicer-core is Slicer 5.13)
    # Geometry: read back on the volume's grid, the segments say exactly what the model said.
    np.testing.assert_array_equal(logic.labelsFromSegmentation(node, volume), expected_labels)
    lung = slicer.util.arrayFromSegmentBinaryLabelmap(node, "lung", volume)
    np.testing.assert_array_equal(lung > 0, expected_labels > 0)


@pytest.mark.parametrize("oblique", [False, True])
def test_segment_real_ct_slice_by_slice(logic, scene, ct_image, oblique):
    img = _oblique_image(ct_image) if oblique else ct_image
    volume = lib.volumeNodeFromSitkImage(img, "CT", scene)
    steps = []
    job = logic.segment(volume, device="cpu", progress=lambda step, total, msg: steps.append((step, total)),
                        timeout=120, maxSlices=1)
    expected = ThresholdPredictor().predict_array(img)
    assert job.state == "completed" and job.step == job.total == 79
    assert len({s for s, _ in steps}) > 10  # the segments grew slice by slice
    np.testing.assert_array_equal(job.labels, expected)
    _check_segments(logic, job, volume, expected)
    rep = job.report
    assert rep["volume_ml"]["lung"] > 0 and set(rep["percent_of_lung"]) >= {"ggo", "consolidation", "infection"}
    rows = lib.reportRows(rep)
    assert [r[0] for r in rows[:4]] == ["GGO", "Consolidation", "Total infection", "Lung field"]
    table = job.tableNode.GetTable()
    assert table.GetNumberOfRows() == len(rows) and table.GetColumnName(1) == "Volume (mL)"
    assert json.loads(job.segmentationNode.GetAttribute(lib.ATTR_REPORT)) == rep


@pytest.mark.parametrize("stop", ["completed", "cancelled"])
def test_a_finished_job_lets_go_of_its_copy_of_the_ct(logic, scene, ct_image, stop):
    img = _oblique_image(ct_image)
    volume = lib.volumeNodeFromSitkImage(img, "CT", scene)
    job = logic.startSegmentation(volume, None, None, "cpu")
    assert job.image is not None
    job.wait(cancel=(lambda: job.step >= 3) if stop == "cancelled" else None, timeout=120, maxSlices=1)
    assert job.state == stop and job.image is None  # the panel keeps the last job: not a second CT in memory
    labels = job.labelImage()  # still in the input's geometry
    assert (labels.GetSpacing(), labels.GetOrigin(), labels.GetDirection()) == \
        (img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), job.labels)


def _user_segmentation(scene, volume, segments=(("Lung", "user_lung"), ("Tumour", "user_tumour"))):
    """A segmentation the user made: each segment a block of its own, so its content is checkable."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    shape = volume.GetImageData().GetDimensions()[::-1]
    for n, (name, segment_id) in enumerate(segments):
        node.GetSegmentation().AddEmptySegment(segment_id, name)
        mask = np.zeros(shape, np.uint8)
        mask[10 + 20 * n:20 + 20 * n, 5:25, 5:25] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, segment_id, volume)
    return node


def _segment_masks(logic, node, volume):
    seg = node.GetSegmentation()
    return {seg.GetNthSegment(i).GetName(): logic.segments.exportSegment(node, seg.GetNthSegmentID(i), volume) > 0
            for i in range(seg.GetNumberOfSegments())}


def _assert_untouched(logic, node, volume, before):
    after = _segment_masks(logic, node, volume)
    assert list(after) == list(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert node.GetAttribute(lib.ATTR_SLICE_HASHES) is None and node.GetAttribute(lib.ATTR_SEGMENT_IDS) is None


def test_segment_again_into_the_same_node_asks_then_replaces(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    first = logic.segment(volume, device="cpu", timeout=120)
    assert logic.existingSegments(first.segmentationNode) == [s.segment_id for s in SEGMENTS]
    with pytest.raises(lib.ExistingSegmentsError, match="replace them or keep both") as raised:
        logic.segment(volume, first.segmentationNode, device="cpu", timeout=120)  # existing="ask" by default
    assert raised.value.segmentIds == [s.segment_id for s in SEGMENTS]
    with pytest.raises(ValueError, match="existing must be one of"):
        logic.startSegmentation(volume, first.segmentationNode, None, "cpu", existing="overwrite")
    second = logic.segment(volume, first.segmentationNode, device="cpu", timeout=120, existing="replace")
    assert second.segmentationNode is first.segmentationNode
    assert _segment_names(second.segmentationNode) == [s.name for s in SEGMENTS]
    np.testing.assert_array_equal(logic.labelsFromSegmentation(second.segmentationNode, volume), second.labels)


@pytest.mark.parametrize("existing", ["replace", "keep"])
def test_a_run_that_fails_to_start_leaves_the_users_segments_intact(logic, scene, ct_image, existing):
    """Bad model file (refused before anything starts) and a predictor that cannot load (the job fails)."""
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _user_segmentation(scene, volume)
    before = _segment_masks(logic, node, volume)
    assert logic.existingSegments(node) == ["user_lung"]  # named "Lung": ours would clash
    with pytest.raises(ValueError, match="Model file not found"):
        logic.startSegmentation(volume, node, "/nonexistent/model.pt", "cpu", existing=existing)
    _assert_untouched(logic, node, volume, before)

    def broken(path, device):
        raise RuntimeError("checkpoint is corrupt")

    logic.predictorFactory = broken
    job = logic.startSegmentation(volume, node, None, "cpu", existing=existing)
    job.wait(timeout=60)
    assert job.state == "failed" and "corrupt" in str(job.error)
    _assert_untouched(logic, node, volume, before)


def test_cancel_before_the_first_slice_leaves_the_segmentation_as_it_was(logic, scene, ct_image):
    logic.predictorFactory = lambda path, device: ThresholdPredictor(delay=0.05)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _user_segmentation(scene, volume)
    before = _segment_masks(logic, node, volume)
    job = logic.startSegmentation(volume, node, None, "cpu", existing="replace")
    job.cancel()
    job.wait(timeout=60)
    assert job.state == "cancelled" and job.step == 0 and "unchanged" in job.message
    _assert_untouched(logic, node, volume, before)


def test_keep_both_keeps_the_users_segments_and_adds_ours_under_new_names(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _user_segmentation(scene, volume)
    before = _segment_masks(logic, node, volume)
    job = logic.segment(volume, node, device="cpu", timeout=120, existing="keep")
    expected = ThresholdPredictor().predict_array(ct_image)
    assert _segment_names(node) == ["Lung", "Tumour", "Ground-glass opacity (DRSegUNet 2)",
                                    "Consolidation (DRSegUNet 2)", "Lung (DRSegUNet 2)"]
    after = _segment_masks(logic, node, volume)
    for name in before:  # the user's segments, untouched
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(after["Lung (DRSegUNet 2)"], expected > 0)
    assert logic.segmentIdsOf(node) == {"ggo": "ggo_2", "consolidation": "consolidation_2", "lung": "lung_2"}
    np.testing.assert_array_equal(logic.labelsFromSegmentation(node, volume), expected)  # ours, not the user's Lung
    segment = node.GetSegmentation().GetSegment("lung_2")
    assert segment.GetTerminology() == SEGMENTS[2].terminology and not segment.GetNameAutoGenerated()
    assert logic.acceptCorrections(volume, node) == []  # the baseline is our segments
    # Once more, keeping both again: the next free number.
    logic.segment(volume, node, device="cpu", timeout=120, existing="keep")
    assert _segment_names(node)[-3:] == ["Ground-glass opacity (DRSegUNet 3)", "Consolidation (DRSegUNet 3)",
                                         "Lung (DRSegUNet 3)"]
    assert len(_segment_names(node)) == 8


def test_replace_removes_the_old_segments_only_when_the_first_slice_arrives(logic, scene, ct_image):
    logic.predictorFactory = lambda path, device: ThresholdPredictor(delay=0.01)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _user_segmentation(scene, volume, (("Lung", "user_lung"), ("Consolidation", "consolidation"),
                                              ("Tumour", "user_tumour")))
    before = _segment_masks(logic, node, volume)
    job = logic.startSegmentation(volume, node, None, "cpu", existing="replace")
    assert _segment_names(node) == ["Lung", "Consolidation", "Tumour"] and not job.prepared
    while job.step == 0 and not job.finished:
        job.poll(maxSlices=1)
        if job.step == 0:
            _assert_untouched(logic, node, volume, before)  # still waiting for the first slice
    assert job.step == 1 and job.prepared
    # The old "Lung" and "Consolidation" are gone, ours are there, the user's "Tumour" stays.
    assert _segment_names(node) == ["Tumour"] + [s.name for s in SEGMENTS]
    job.wait(timeout=120)
    assert job.state == "completed"
    np.testing.assert_array_equal(_segment_masks(logic, node, volume)["Tumour"], before["Tumour"])
    np.testing.assert_array_equal(logic.labelsFromSegmentation(node, volume), ThresholdPredictor().predict_array(ct_image))


# ----------------------------------------------------------------- closed-surface segmentations


def _sphere_segmentation(scene, volume, names=("Lung",)):
    """A segmentation whose source representation is Closed surface, with a sphere per name."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Surfaces")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.SetSourceRepresentationToClosedSurface()
    center = lib.ijkToRasArray(volume) @ np.array([32, 32, 40, 1.0])
    for n, name in enumerate(names):
        sphere = vtk.vtkSphereSource()
        sphere.SetCenter(*(center[:3] + [0, 0, 60 * n]))
        sphere.SetRadius(40)
        sphere.Update()
        node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), name, (0.2, 0.8, 0.2))
    return node


def test_an_empty_closed_surface_segmentation_is_switched_to_labelmaps_with_a_note(logic, scene, ct_image, tmp_path):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _sphere_segmentation(scene, volume, names=())
    assert node.GetSegmentation().GetSourceRepresentationName() == lib.CLOSED_SURFACE
    job = logic.segment(volume, node, device="cpu", timeout=120)
    assert node.GetSegmentation().GetSourceRepresentationName() == lib.BINARY_LABELMAP
    assert any("binary labelmaps" in note for note in job.notes)
    expected = ThresholdPredictor().predict_array(ct_image)
    np.testing.assert_array_equal(logic.labelsFromSegmentation(node, volume), expected)
    logic.saveSegmentation(node, str(tmp_path / "s.seg.nrrd"))  # the results are what gets saved
    np.testing.assert_array_equal(logic.labelsFromSegmentation(logic.loadSegmentation(str(tmp_path / "s.seg.nrrd")),
                                                                volume), expected)


def test_replacing_the_only_surface_segments_switches_too(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _sphere_segmentation(scene, volume, names=("Lung",))
    job = logic.segment(volume, node, device="cpu", timeout=120, existing="replace")
    assert _segment_names(node) == [s.name for s in SEGMENTS] and job.notes
    assert node.GetSegmentation().GetSourceRepresentationName() == lib.BINARY_LABELMAP
    np.testing.assert_array_equal(logic.labelsFromSegmentation(node, volume), ThresholdPredictor().predict_array(ct_image))


@pytest.mark.parametrize("existing", ["keep", "replace"])
def test_a_surface_segmentation_with_other_segments_is_refused_with_one_line(logic, scene, ct_image, existing):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = _sphere_segmentation(scene, volume, names=("Lung", "Heart"))
    surface = node.GetSegmentation().GetNthSegment(1).GetRepresentation(lib.CLOSED_SURFACE)
    points = surface.GetNumberOfPoints()
    with pytest.raises(ValueError, match="source representation") as raised:
        logic.startSegmentation(volume, node, None, "cpu", existing=existing)
    assert "'Heart'" in str(raised.value) and "\n" not in str(raised.value)
    assert _segment_names(node) == ["Lung", "Heart"]
    assert node.GetSegmentation().GetSourceRepresentationName() == lib.CLOSED_SURFACE
    assert node.GetSegmentation().GetNthSegment(1).GetRepresentation(lib.CLOSED_SURFACE).GetNumberOfPoints() == points


# ----------------------------------------------------------------- 3D while streaming


def test_streaming_does_not_rebuild_the_3d_surface_per_slice(logic, scene, ct_image):
    """Show 3D is on: the surface is taken away while slices stream in and made once at the end;
    the labelmaps' Modified (which drops derived representations) is throttled; the slice views still
    see every poll (the voxel array's modified time moves)."""
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = logic.segment(volume, device="cpu", timeout=120).segmentationNode
    assert node.CreateClosedSurfaceRepresentation()  # the user pressed Show 3D
    segmentation = node.GetSegmentation()
    events = []
    tag = segmentation.AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, lambda *a: events.append(1))
    try:
        job = logic.startSegmentation(volume, node, None, "cpu", existing="replace")
        job.derivedInterval = 1e9
        mtimes, during = [], []
        while not job.finished:
            step = job.step
            job.poll(maxSlices=1)
            if job.prepared and not job.finished and job.step > step:  # a slice was written in this poll
                during.append((segmentation.ContainsRepresentation(lib.CLOSED_SURFACE), len(events)))
                labelmap = segmentation.GetSegment("lung").GetRepresentation(lib.BINARY_LABELMAP)
                mtimes.append(labelmap.GetPointData().GetScalars().GetMTime())
        assert job.state == "completed" and len(during) > 50
        assert not any(surface or count for surface, count in during)  # no surface to rebuild, no labelmap Modified while streaming
        # One round at the end for 79 slices: one Modified per labelmap (GGO, consolidation, lung).
        assert job.derivedUpdates == 1 and len(events) == 3
        assert all(b > a for a, b in zip(mtimes, mtimes[1:]))  # each poll reaches the slice views
        assert segmentation.ContainsRepresentation(lib.CLOSED_SURFACE)  # made again, once, at the end
        lung = segmentation.GetSegment("lung").GetRepresentation(lib.CLOSED_SURFACE)
        assert lung.GetNumberOfPoints() > 0
        # Without the throttle each poll would send one: the counter counts what it should.
        events.clear()
        job = logic.startSegmentation(volume, node, None, "cpu", existing="replace")
        job.derivedInterval = 0.0
        job.wait(timeout=120, maxSlices=1)
        assert len(events) >= 50
    finally:
        segmentation.RemoveObserver(tag)


def test_saving_half_way_merges_layers_and_later_slices_still_land_in_their_own_segment(logic, scene, ct_image, tmp_path):
    """The storage node puts GGO and consolidation into one shared layer when it writes; writing goes on correctly."""
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, None, None, "cpu")
    while job.step < 30:
        job.poll(maxSlices=1)
    segmentation = job.segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 3
    logic.saveSegmentation(job.segmentationNode, str(tmp_path / "half.seg.nrrd"))
    assert segmentation.GetNumberOfLayers() == 2
    job.wait(timeout=120)
    assert job.state == "completed"
    _check_segments(logic, job, volume, ThresholdPredictor().predict_array(ct_image))


def test_an_edit_made_before_saving_half_way_survives_the_rest_of_the_run(logic, scene, ct_image, tmp_path):
    """Saving merges layers; the segment's own layer is then rebuilt from what it holds, edits included."""
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, None, None, "cpu")
    while job.step < 30:
        job.poll(maxSlices=1)
    node = job.segmentationNode
    ggo = slicer.util.arrayFromSegmentBinaryLabelmap(node, "ggo", volume)
    edited = tuple(a[:25] for a in np.nonzero((job.labels == LUNG) & (ggo == 0)))  # lung voxels of finished slices
    assert len(edited[0]) == 25
    ggo[edited] = 1  # the user paints GGO there, as the Segment Editor writes it
    slicer.util.updateSegmentBinaryLabelmapFromArray(ggo, node, "ggo", volume)
    logic.saveSegmentation(node, str(tmp_path / "half.seg.nrrd"))
    assert node.GetSegmentation().GetNumberOfLayers() == 2  # GGO and consolidation now share a layer
    job.wait(timeout=120)
    assert job.state == "completed"
    after = logic.labelsFromSegmentation(node, volume)
    assert np.all(after[edited] == GGO)  # the edit is still there
    untouched = np.ones(after.shape, bool)
    untouched[edited] = False
    np.testing.assert_array_equal(after[untouched], ThresholdPredictor().predict_array(ct_image)[untouched])


def test_reading_the_segments_back_leaves_no_nodes_behind(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=120)
    before = scene.GetNumberOfNodes()
    logic.labelsFromSegmentation(job.segmentationNode, volume)
    assert scene.GetNumberOfNodes() == before  # the export's labelmap, display node and colour table


def test_cancel_half_way_keeps_finished_slices_and_nothing_else(logic, scene, ct_image):
    logic.predictorFactory = lambda path, device: ThresholdPredictor(delay=0.002)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, None, None, "cpu")
    job.wait(cancel=lambda: job.step * 2 >= job.total > 0, timeout=120, maxSlices=1)
    assert job.state == "cancelled"
    assert job.total // 2 <= job.step < job.total
    written = logic.labelsFromSegmentation(job.segmentationNode, volume)
    np.testing.assert_array_equal(written, job.labels)
    full = axial_view(ThresholdPredictor().predict_array(ct_image), ct_image.GetDirection())[0]
    got = axial_view(written, ct_image.GetDirection())[0]
    for n in range(job.total):  # each axial slice is either complete or untouched
        np.testing.assert_array_equal(got[n], full[n] if job.done[n] else 0)
    assert job.report is None and "Cancelled" in job.message


def test_bad_inputs_fail_with_clear_messages(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    with pytest.raises(ValueError, match="Model file not found"):
        logic.startSegmentation(volume, None, "/nonexistent/model.pt")
    with pytest.raises(ValueError, match="device"):
        logic.startSegmentation(volume, None, None, "tpu")
    with pytest.raises(ValueError, match="input CT"):
        logic.startSegmentation(None)
    for pixel in (0.05, 9.0, float("nan"), -1.0):
        with pytest.raises(ValueError, match="working pixel size"):
            logic.startSegmentation(volume, None, None, "cpu", pixel)

    def broken(path, device):
        raise RuntimeError("checkpoint is corrupt")

    logic.predictorFactory = broken
    with pytest.raises(RuntimeError, match="corrupt"):
        logic.segment(volume, device="cpu", timeout=60)


def test_real_predictor_on_a_tiny_checkpoint(scene, stores, ct_image):
    """The default predictor factory (DRSegUNetLib.inference.Predictor) through the logic."""
    models, corrections = stores
    logic = lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=300)
    from DRSegUNetLib.inference import Predictor

    expected = sitk.GetArrayFromImage(Predictor.from_checkpoint(models.active().path, "cpu").predict(ct_image))
    np.testing.assert_array_equal(job.labels, expected)
    _check_segments(logic, job, volume, expected)
    assert job.report["inference"]["pixel_mm"] == logic.defaultPixelSize() == 1.2
    assert job.report["model"] == job.modelPath == str(models.active().path)


def test_working_pixel_size_from_the_panel_reaches_the_network(scene, stores, ct_image):
    """The panel's working pixel size: the labels are the library's at that size, and the report says so."""
    from DRSegUNetLib.inference import Predictor

    models, corrections = stores
    logic = lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections)
    for pixel, library in ((0.0, None), (2.0, 2.0)):
        volume = lib.volumeNodeFromSitkImage(ct_image, f"CT {pixel}", scene)
        job = logic.segment(volume, device="cpu", timeout=300, pixelMM=pixel)
        predictor = Predictor.from_checkpoint(models.active().path, "cpu", pixel_mm=library)
        np.testing.assert_array_equal(job.labels, sitk.GetArrayFromImage(predictor.predict(ct_image)))
        assert job.report["inference"]["pixel_mm"] == library


def test_without_a_pixel_size_the_models_own_working_pixel_applies(scene, tmp_path, tiny_checkpoint, ct_image):
    """pixelMM None (a script's default): the checkpoint's own working pixel, in this process and
    in segment-stream's."""
    from dataclasses import replace

    from DRSegUNetLib.checkpoint import load_checkpoint, save_checkpoint
    from DRSegUNetLib.config import ModelInference

    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt.config = replace(ckpt.config, inference=ModelInference(pixel_mm=2.0))
    save_checkpoint(ckpt, tmp_path / "own.pt")
    models = ModelStore(tmp_path / "models", bundled=tmp_path / "own.pt")
    from DRSegUNetSlicer.logic import libraryPredictor

    for factory in (libraryPredictor, None):  # a worker thread; segment-stream (the default)
        logic = lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=CorrectionsStore(tmp_path / "c"),
                                   predictorFactory=factory)
        job = logic.segment(lib.volumeNodeFromSitkImage(ct_image, f"CT {factory}", scene), device="cpu", timeout=300)
        assert job.report["inference"]["pixel_mm"] == 2.0


def test_bundled_model_segments_the_real_ct(scene, tmp_path, ct_image):
    """With the bundled level-1 model (needs DRSegUNetLib/models/drsegunet_level1.pt)."""
    import DRSegUNetLib

    logic = lib.DRSegUNetLogic(scene=scene, modelStore=ModelStore(tmp_path / "m", bundled=DRSegUNetLib.default_model_path()),
                               correctionsStore=CorrectionsStore(tmp_path / "c"))
    assert logic.modelStore.active().bundled
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=300)
    _check_segments(logic, job, volume, job.labels)
    assert job.report["volume_ml"]["lung"] > 500  # a whole thorax has litres of lung


# ----------------------------------------------------------------- Segment Editor


def test_edit_points_the_segment_editor_at_the_segmentation_and_ct_with_overlap_allowed(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    node = logic.segment(volume, device="cpu", timeout=120).segmentationNode
    editor = logic.setUpSegmentEditor(node, volume)
    # The node the Segment Editor module looks up (SegmentEditor.py: singleton tag "SegmentEditor").
    assert scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode") is editor
    assert editor.GetSegmentationNode() is node and editor.GetSourceVolumeNode() is volume
    assert editor.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteNone  # "Allow overlap"
    assert editor.GetSelectedSegmentID() == SEGMENTS[0].segment_id
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)  # the user changed it since
    assert logic.setUpSegmentEditor(other, volume) is editor  # the same node, pointed elsewhere
    assert editor.GetSegmentationNode() is other and editor.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteNone
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1
    with pytest.raises(ValueError, match="Select the CT volume"):
        logic.setUpSegmentEditor(None, volume)


# ----------------------------------------------------------------- terminology


def test_the_terminology_file_loads_into_slicers_terminology_logic():
    """The .term.json the module loads at startup, read by Slicer's own terminologies logic."""
    from DRSegUNetLib.vocabulary import TERMINOLOGY_CONTEXT
    from DRSegUNetSlicer import startup

    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    assert startup.loadTerminology(terminologies) == TERMINOLOGY_CONTEXT
    for s in SEGMENTS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.FindTypeInTerminologyBy3dSlicerLabel(TERMINOLOGY_CONTEXT, s.name, entry)
        found = entry.GetTypeObject()
        assert (found.GetCodingSchemeDesignator(), found.GetCodeValue(), found.GetCodeMeaning()) == s.type
        assert entry.GetCategoryObject().GetCodeValue() == s.category[1]
        assert tuple(found.GetRecommendedDisplayRGBValue()) == tuple(round(255 * c) for c in s.color)
        parsed = slicer.vtkSlicerTerminologyEntry()  # the string set on our segments names this context
        assert terminologies.DeserializeTerminologyEntry(s.terminology, parsed)
        assert parsed.GetTerminologyContextName() == TERMINOLOGY_CONTEXT
        assert parsed.GetTypeObject().GetCodeValue() == s.type[1]
    assert startup.loadTerminology() is None  # no terminologies module here: nothing to do


def test_segment_terminology_uses_set_terminology_where_slicer_has_it():
    entry = SEGMENTS[0].terminology
    segment = slicer.vtkSegment()  # slicer-core 5.13: SetTerminology exists
    lib.setSegmentTerminology(segment, entry)
    assert segment.GetTerminology() == entry

    class Slicer58Segment:  # no SetTerminology before Slicer 5.10: the tag it writes
        def __init__(self):
            self.tags = {}

        def SetTag(self, name, value):
            self.tags[name] = value

    old = Slicer58Segment()
    lib.setSegmentTerminology(old, entry)
    assert old.tags == {slicer.vtkSegment.GetTerminologyEntryTagName(): entry}


# ----------------------------------------------------------------- parameter node


def test_the_panel_choices_survive_saving_and_loading_the_scene(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Output")
    p = logic.parameters()
    assert p.node is logic.getParameterNode() and p.node.GetAttribute("ModuleName") == "DRSegUNet"
    # the working pixel size: the model's own (None) by default
    assert (p.inputVolume, p.outputSegmentation, p.model, p.device, p.pixelMM) == (None, None, None, "auto", None)
    p.inputVolume, p.outputSegmentation, p.model, p.device, p.pixelMM = volume, output, 2, "cuda", 0.8
    scene.SetSaveToXMLString(1)
    scene.Commit()
    xml = scene.GetSceneXMLString()

    loaded = slicer_stubs.new_scene()
    loaded.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "another volume")  # node IDs move on import
    loaded.SetLoadFromXMLString(1)
    loaded.SetSceneXMLString(xml)
    assert loaded.Import()
    again = lib.DRSegUNetLogic(scene=loaded, modelStore=logic.modelStore, correctionsStore=logic.correctionsStore)
    q = again.parameters()
    assert q.node.GetScene() is loaded and loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    assert q.inputVolume.GetName() == "CT" and q.inputVolume.GetScene() is loaded
    assert q.outputSegmentation.GetName() == "Output"
    assert (q.model, q.device, q.pixelMM) == ("2", "cuda", 0.8)
    q.model, q.pixelMM = "/models/mine.pt", 0.0  # a checkpoint file; the CT's own grid
    assert (q.model, q.pixelMM) == ("/models/mine.pt", 0.0)

    q.pixelMM = None  # the model's own: saved as such, not as a default filled in again
    assert q.pixelMM is None and q.isSet("PixelSize")
    loaded.SetSaveToXMLString(1)
    loaded.Commit()
    third = slicer_stubs.new_scene()
    third.SetLoadFromXMLString(1)
    third.SetSceneXMLString(loaded.GetSceneXMLString())
    assert third.Import()
    r = lib.DRSegUNetLogic(scene=third, modelStore=logic.modelStore, correctionsStore=logic.correctionsStore).parameters()
    r.setDefaults(device="cpu", pixelMM="2.0")  # the scene holds both: the settings change neither
    assert (r.model, r.device, r.pixelMM) == ("/models/mine.pt", "cuda", None)


def test_a_scene_of_an_older_version_keeps_its_working_pixel_size(logic, scene):
    """Older versions stored a number (their default 1.2 included); it loads as that number."""
    p = logic.parameters()
    for stored, expected in (("1.2", 1.2), ("0.0", 0.0), ("2.5", 2.5)):
        p.node.SetParameter("PixelSize", stored)
        p.setDefaults(pixelMM="model")
        assert p.pixelMM == expected


def test_parameter_values_are_checked_and_defaults_come_from_the_settings(logic):
    p = logic.parameters()
    p.setDefaults(device="cuda", pixelMM="0.9")  # what the widget reads from the application settings
    assert (p.device, p.pixelMM) == ("cuda", 0.9)
    p.setDefaults(device="cpu", pixelMM="2.0")  # a scene's own values win over the settings
    assert (p.device, p.pixelMM) == ("cuda", 0.9)
    for bad in (0.1, 6.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="working pixel size"):
            p.pixelMM = bad
    with pytest.raises(ValueError, match="device"):
        p.device = "tpu"
    p.node.SetParameter("PixelSize", "0.05")  # an edited scene file: the default, the model's own
    p.node.SetParameter("Device", "tpu")
    assert (p.pixelMM, p.device) == (None, "auto")
    for stored in ("x", "nan", "None", "model"):
        p.node.SetParameter("PixelSize", stored)
        assert p.pixelMM is None
    fresh = lib.DRSegUNetParameters(slicer.vtkMRMLScriptedModuleNode())
    fresh.setDefaults(device="gpu", pixelMM="10")  # settings from elsewhere: ignored
    assert (fresh.device, fresh.pixelMM) == ("auto", None)
    assert logic.pixelSizeRange() == (0.2, 5.0)


def test_the_working_pixel_size_setting_remembers_the_models_own(logic):
    """The widget writes pixelSizeText(pixelMM) to the settings and gives it to setDefaults in a new scene."""
    assert lib.pixelSizeText(None) == lib.MODEL_PIXEL_SIZE == "model"
    for choice in (None, 0.0, 0.9, 1.2, 5.0):
        node = lib.DRSegUNetParameters(slicer.vtkMRMLScriptedModuleNode())
        node.pixelMM = choice
        remembered = lib.pixelSizeText(node.pixelMM)
        fresh = lib.DRSegUNetParameters(slicer.vtkMRMLScriptedModuleNode())
        fresh.setDefaults(pixelMM=remembered)
        assert fresh.pixelMM == choice and fresh.node.GetParameter("PixelSize") == remembered
    for missing in (None, ""):  # no setting yet (QSettings.value of a missing key)
        fresh = lib.DRSegUNetParameters(slicer.vtkMRMLScriptedModuleNode())
        fresh.setDefaults(pixelMM=missing)
        assert fresh.pixelMM is None and fresh.isSet("PixelSize")
    fresh = lib.DRSegUNetParameters(slicer.vtkMRMLScriptedModuleNode())
    fresh.setDefaults(pixelMM="1.2")  # a setting an older version wrote
    assert fresh.pixelMM == 1.2


def test_the_panel_spin_box_selects_the_models_own_below_the_valid_sizes(logic):
    """The spin box's minimum, one step below PIXEL_MM_RANGE, shows "model's own": None to the logic;
    the check box is 0, the CT's own grid."""
    low, high = logic.pixelSizeRange()
    step = 0.1  # the .ui's singleStep
    assert lib.spinBoxPixelSize(low - step) is None
    assert lib.spinBoxPixelSize(0.15) is None  # typed between the special value and the lowest size
    assert lib.spinBoxPixelSize(low) == low and lib.spinBoxPixelSize(high) == high
    assert lib.spinBoxPixelSize(1.2) == 1.2
    assert lib.spinBoxPixelSize(low - step, ownGrid=True) == lib.spinBoxPixelSize(2.0, ownGrid=True) == 0.0
    p = logic.parameters()
    for value, ownGrid in ((low - step, False), (low, False), (3.0, False), (1.0, True)):
        p.pixelMM = lib.spinBoxPixelSize(value, ownGrid)  # every state of the controls is a valid choice
        assert p.pixelMM == lib.spinBoxPixelSize(value, ownGrid)


# ----------------------------------------------------------------- data and temporary folders


class FakeSettings(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):
        self[key] = value


class FakeApp:
    """What the logic reads from ``slicer.app`` (the application object)."""

    def __init__(self, tmp_path):
        self.settings = FakeSettings()
        self.slicerUserSettingsFilePath = str(tmp_path / "roaming" / "slicer.org" / "Slicer.ini")
        self.temporaryPath = str(tmp_path / "slicer-tmp")
        self.organizationName, self.applicationName = "slicer.org", "Slicer"
        self.connected = []

    def userSettings(self):
        return self.settings

    def connect(self, signal, slot):
        self.connected.append((signal, slot))


def test_the_data_folder_is_a_setting_under_slicers_local_data_folder(tmp_path, monkeypatch):
    app = FakeApp(tmp_path)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "local"))
    monkeypatch.setenv("DRSEGUNET_HOME", str(tmp_path / "env"))
    assert lib.DRSegUNetLogic.defaultDataFolder() == tmp_path / "env"  # the environment variable first
    monkeypatch.delenv("DRSEGUNET_HOME")
    assert lib.DRSegUNetLogic.defaultDataFolder() == tmp_path / "local" / "slicer.org" / "Slicer" / "DRSegUNet"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))  # not %APPDATA% (roaming)
    assert lib.DRSegUNetLogic.defaultDataFolder() == tmp_path / "AppData" / "Local" / "slicer.org" / "Slicer" / "DRSegUNet"
    # What an earlier version stored beside Slicer's settings file stays in use.
    legacy = tmp_path / "roaming" / "slicer.org" / "DRSegUNet"
    (legacy / "corrections").mkdir(parents=True)
    assert lib.DRSegUNetLogic.defaultDataFolder() == legacy
    # The panel's setting wins; the logic's stores live there.
    app.settings[lib.SETTING_DATA_FOLDER] = str(tmp_path / "chosen")
    assert lib.DRSegUNetLogic.defaultDataFolder() == tmp_path / "chosen"
    logic = lib.DRSegUNetLogic(scene=slicer_stubs.new_scene())
    assert logic.dataFolder == tmp_path / "chosen"
    assert logic.correctionsStore.root == tmp_path / "chosen" / "corrections"
    assert logic.modelStore.root == tmp_path / "chosen" / "models"
    logic.setDataFolder(str(tmp_path / "moved"))
    assert logic.correctionsStore.root == tmp_path / "moved" / "corrections" and logic.modelStore.active().bundled


def test_the_ct_copy_for_the_segmentation_process_goes_to_slicers_temporary_folder(scene, stores, ct_image, tmp_path,
                                                                                   monkeypatch):
    app = FakeApp(tmp_path)
    Path(app.temporaryPath).mkdir()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    assert lib.DRSegUNetLogic.temporaryFolder() == app.temporaryPath
    seen = []

    class Failing:  # ends at once with a one-line error, like a bad checkpoint
        def readLines(self):
            return [("err", "error: not a checkpoint")]

        def returnCode(self):
            return 2

        def terminate(self):
            pass

    class Runner:
        def start(self, args, env):
            seen.append(Path(args[args.index("segment-stream") + 1]))
            assert seen[-1].exists()
            return Failing()

    models, corrections = stores
    logic = lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections, processRunner=Runner())
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, device="cpu")
    assert seen[0].parent.parent == Path(app.temporaryPath)  # <Slicer temporary>/drsegunet-segment-XXXX/ct.mha
    job.wait(timeout=30)
    assert job.state == "failed" and not seen[0].parent.exists()
    monkeypatch.delattr(slicer, "app")
    assert lib.DRSegUNetLogic.temporaryFolder() is None  # plain Python: the system's


# ----------------------------------------------------------------- startup: terminology and Sample Data


def test_startup_registers_the_bundled_ct_with_sample_data_only_in_the_application(tmp_path, monkeypatch):
    import hashlib
    import types
    import urllib.request

    import DRSegUNetLib
    from DRSegUNetLib.vocabulary import TERMINOLOGY_CONTEXT
    from DRSegUNetSlicer import startup

    registered = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = type("SampleDataLogic", (), {
        "registerCustomSampleDataSource": staticmethod(lambda **kw: registered.append(kw))})
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    # Outside the application: the module connects nothing and registers nothing.
    parent = type("Parent", (), {})()
    module.DRSegUNet(parent)
    assert startup.registerSampleData() is False and registered == []

    app = FakeApp(tmp_path)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    monkeypatch.setattr(slicer.modules, "terminologies", types.SimpleNamespace(logic=lambda: terminologies), raising=False)
    instance = module.DRSegUNet(parent)
    assert [signal for signal, _slot in app.connected] == ["startupCompleted()"]
    app.connected[0][1]()  # Slicer has started
    assert instance is not None and len(registered) == 1
    source = registered[0]
    path = DRSegUNetLib.sample_ct_path()
    assert source["category"] == "DRSegUNet" and source["loadFileType"] == "VolumeFile"
    assert source["uris"] == [path.resolve().as_uri()] and source["fileNames"] == [path.name]
    assert source["checksums"] == [f"SHA256:{hashlib.sha256(path.read_bytes()).hexdigest()}"]
    assert Path(source["thumbnailFileName"]).is_file()
    with urllib.request.urlopen(source["uris"][0]) as f:  # what Sample Data's download does with the URI
        assert f.read() == path.read_bytes()
    names = vtk_string_list(terminologies.GetLoadedTerminologyNames)
    assert TERMINOLOGY_CONTEXT in names


def vtk_string_list(getter):
    import vtk

    array = vtk.vtkStringArray()
    getter(array)
    return [array.GetValue(i) for i in range(array.GetNumberOfValues())]


# ----------------------------------------------------------------- save and read back


def test_saved_seg_nrrd_reads_back_with_slicerio(logic, scene, ct_image, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    img = _oblique_image(ct_image)
    volume = lib.volumeNodeFromSitkImage(img, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=120)
    path = tmp_path / "out.seg.nrrd"
    logic.saveSegmentation(job.segmentationNode, str(path))
    seg = slicerio.read_segmentation(str(path))
    names = [s["name"] for s in seg["segments"]]
    assert names == [s.name for s in SEGMENTS]
    for s, info in zip(SEGMENTS, seg["segments"]):
        np.testing.assert_allclose(info["color"], s.color, atol=1e-6)
        term = info["terminology"]
        assert (term["category"], term["type"]) == (list(s.category), list(s.type))
        mask = slicerio.extract_segments(seg, [(s.name, 1)])["voxels"]  # (I, J, K) in the file's extent
        offset = [int(v) for v in seg.get("referenceImageExtentOffset", (0, 0, 0))]
        full = np.zeros(img.GetSize(), np.uint8)  # (I, J, K)
        full[offset[0]:offset[0] + mask.shape[0], offset[1]:offset[1] + mask.shape[1],
             offset[2]:offset[2] + mask.shape[2]] = mask
        np.testing.assert_array_equal(full.transpose(2, 1, 0) > 0, np.isin(job.labels, s.labels))
    # Geometry in LPS equals the input's.
    expected = np.eye(4)
    expected[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    expected[:3, 3] = img.GetOrigin()
    ijk_to_lps = np.array(seg["ijkToLPS"], float)
    shift = ijk_to_lps[:3, :3] @ np.array(offset, float)
    np.testing.assert_allclose(ijk_to_lps[:3, :3], expected[:3, :3], atol=1e-6)
    np.testing.assert_allclose(ijk_to_lps[:3, 3] - shift, expected[:3, 3], atol=1e-4)


# ----------------------------------------------------------------- corrections


def _edit_axial_slice(logic, job, volume, image, n, new_value):
    """Paint the lung field of axial slice n as ``new_value`` in the segmentation, like the Segment Editor would."""
    labels = job.labels.copy()
    view = axial_view(labels, image.GetDirection())[0]
    view[n][view[n] > 0] = new_value
    node = job.segmentationNode
    for s in SEGMENTS:
        slicer.util.updateSegmentBinaryLabelmapFromArray(np.isin(labels, s.labels).astype(np.uint8), node, s.segment_id, volume)
    return labels


@pytest.mark.parametrize("oblique", [False, True])
def test_accept_corrections_stores_the_changed_slices(logic, scene, ct_image, oblique):
    img = _oblique_image(ct_image) if oblique else ct_image
    volume = lib.volumeNodeFromSitkImage(img, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=120)
    assert logic.acceptCorrections(volume, job.segmentationNode) == []  # nothing changed yet
    edited = _edit_axial_slice(logic, job, volume, img, 40, CONSOLIDATION)

    ids = logic.acceptCorrections(volume, job.segmentationNode)
    assert len(ids) == 1
    c = logic.correctionsStore.load(ids[0])
    ct_view = axial_view(sitk.GetArrayFromImage(img), img.GetDirection())[0]
    assert c.slice_index == 40
    np.testing.assert_array_equal(c.ct_hu, ct_view[40])
    np.testing.assert_array_equal(c.labels, axial_view(edited, img.GetDirection())[0][40])
    assert set(np.unique(c.labels)) <= {0, CONSOLIDATION}
    # Axial rows run anterior→posterior (y), columns right→left (x), however the volume is stored.
    assert c.spacing == pytest.approx((ct_image.GetSpacing()[1], ct_image.GetSpacing()[0]))
    assert "CT" in c.source and "sha1:" in c.source

    assert logic.acceptCorrections(volume, job.segmentationNode) == []  # accepted = the new baseline
    ranged = logic.acceptCorrections(volume, job.segmentationNode, sliceRange=(10, 12))
    assert [logic.correctionsStore.load(i).slice_index for i in ranged] == [10, 11, 12]
    # A restart of Slicer: a new store object sees everything.
    assert len(CorrectionsStore(logic.correctionsStore.root)) == 4


def test_accept_without_a_prediction_needs_a_range(logic, scene, ct_image):
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    with pytest.raises(ValueError, match="slice range"):
        logic.acceptCorrections(volume, manual)
    ids = logic.acceptCorrections(volume, manual, sliceRange=(0, 1))
    assert len(ids) == 2 and logic.correctionsStore.load(ids[0]).labels.max() == 0


def test_accept_records_which_segments_were_checked(logic, scene, ct_image):
    """Unticking segments in the panel stores the slices as partially checked; fine-tuning
    then trains only on the checked classes (data.labels_to_allowed)."""
    from DRSegUNetLib.data import labels_to_allowed

    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    ids = logic.acceptCorrections(volume, manual, sliceRange=(0, 0), checkedClasses=["lung"])
    c = logic.correctionsStore.load(ids[0])
    assert c.known == ("lung",)
    assert set(np.unique(labels_to_allowed(c.labels, c.known))) == {0b0001}  # lung checked, none here
    every = logic.acceptCorrections(volume, manual, sliceRange=(1, 1), checkedClasses=["lung", "ggo", "consolidation"])
    assert logic.correctionsStore.load(every[0]).known is None
    with pytest.raises(ValueError, match="Unknown segment classes"):
        logic.acceptCorrections(volume, manual, sliceRange=(2, 2), checkedClasses=["Lung"])
    with pytest.raises(ValueError, match="at least one"):
        logic.acceptCorrections(volume, manual, sliceRange=(2, 2), checkedClasses=[])
    assert len(logic.correctionsStore) == 2


# ----------------------------------------------------------------- fine-tune


class FakeProcess:
    """Prints what `python -m DRSegUNetLib finetune --json-progress` prints; adds the version on the last line."""

    def __init__(self, args, store_root, bundled, finish=True, activated=True):
        self.args = list(args)
        self.activated = activated
        self.lines = [("out", json.dumps({"stage": "train", "step": s, "total": 3, "loss": 1.0 / s})) for s in (1, 2, 3)]
        self.lines.insert(1, ("err", "INFO some log line"))
        self.store = ModelStore(store_root, bundled=bundled)
        self.finish = finish
        self.terminated = False
        self.rc = None

    def readLines(self):
        out, self.lines = self.lines[:1], self.lines[1:]
        if not self.lines and self.finish and self.rc is None and not self.terminated:
            v = self.store.add_version(b"fine-tuned", {"note": "fake"}, parent=self.store.active())
            gate = {"passed": self.activated, "reasons": [] if self.activated else ["reference ggo Dice 0.550 -> 0.400"],
                    "reference": {"before": {"ggo": 0.55}, "after": {"ggo": 0.56 if self.activated else 0.40}},
                    "holdout": {"before": {}, "after": {}}}
            if self.activated:
                self.store.set_active(v.version)  # as cmd_finetune does when the gate passes
            out.append(("out", json.dumps({"stage": "done", "version": v.version, "activated": self.activated,
                                           "gate": gate})))
            self.rc = 0
        return out

    def returnCode(self):
        return self.rc if not self.lines else None

    def terminate(self):
        self.terminated = True
        if self.rc is None:  # a process that has ended keeps its exit code
            self.rc = -15


class FakeRunner:
    def __init__(self, **kw):
        self.kw = kw
        self.started = []

    def start(self, args, env):
        self.started.append((args, env))
        return FakeProcess(args, self.kw["store_root"], self.kw["bundled"], self.kw.get("finish", True),
                           self.kw.get("activated", True))


def _logic_with_corrections(scene, stores, ct_image, runner):
    models, corrections = stores
    logic = lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections, processRunner=runner,
                               predictorFactory=lambda path, device: ThresholdPredictor())
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=120)
    _edit_axial_slice(logic, job, volume, ct_image, 30, GGO)
    assert len(logic.acceptCorrections(volume, job.segmentationNode)) == 1
    return logic


def test_fine_tune_adds_and_activates_a_new_version(scene, stores, ct_image):
    runner = FakeRunner(store_root=stores[0].root, bundled=stores[0].bundled)
    logic = _logic_with_corrections(scene, stores, ct_image, runner)
    assert logic.modelStore.active().version == 1
    job = logic.startFineTune(steps=2, lr=1e-4, device="cpu")
    args, env = runner.started[0]
    assert args[1:4] == ["-m", "DRSegUNetLib", "finetune"] and "--json-progress" in args
    assert args[args.index("--corrections") + 1] == str(logic.correctionsStore.root)
    assert args[args.index("--steps") + 1] == "2" and float(args[args.index("--lr") + 1]) == 1e-4
    assert str(REPO) in env["PYTHONPATH"].split(os.pathsep)
    log = []
    while not job.finished:
        log += job.poll()
    assert job.state == "completed" and job.loss == pytest.approx(1 / 3)
    assert any("INFO some log line" in line for line in log)
    assert logic.modelStore.active().version == 2 and logic.modelStore.active().card["parent"] == 1
    assert [v.version for v in logic.modelStore.versions()] == [1, 2]  # the previous one is kept
    logic.modelStore.set_active(1)  # the user can switch back
    assert logic.modelPath() == str(stores[0].bundled)


def test_fine_tune_the_gate_refused_keeps_the_active_model_and_says_why(scene, stores, ct_image):
    runner = FakeRunner(store_root=stores[0].root, bundled=stores[0].bundled, activated=False)
    logic = _logic_with_corrections(scene, stores, ct_image, runner)
    job = logic.startFineTune(steps=2, lr=1e-4, device="cpu")
    job.wait(timeout=10)
    assert job.state == "completed" and job.version == 2 and job.activated is False
    assert logic.modelStore.active().version == 1
    assert "NOT made active" in job.message and "0.550 -> 0.400" in job.message
    logic.modelStore.set_active(2)  # Make active still overrides
    assert logic.modelStore.active().version == 2


def test_fine_tune_reports_the_gate_numbers_when_it_activates(scene, stores, ct_image):
    logic = _logic_with_corrections(scene, stores, ct_image, FakeRunner(store_root=stores[0].root,
                                                                        bundled=stores[0].bundled))
    job = logic.startFineTune(steps=2, lr=1e-4, device="cpu")
    job.wait(timeout=10)
    assert job.activated is True and "ggo 0.550->0.560" in job.message


def test_next_slice_to_check_is_the_most_uncertain_one_away_from_those_accepted(scene, stores, ct_image):
    models, corrections = stores

    class UncertainPredictor(ThresholdPredictor):
        def iter_slices(self, image, progress=None, cancel=None):
            for r in super().iter_slices(image, progress, cancel):
                r.uncertainty = {40: 0.9, 41: 0.7, 15: 0.5}.get(r.index, 0.1)
                yield r

    logic = lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections,
                               predictorFactory=lambda path, device: UncertainPredictor())
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.segment(volume, device="cpu", timeout=120)
    assert logic.nextSliceToCheck(job.segmentationNode) == 40
    assert job.report["most_uncertain_slices"][:3] == [40, 41, 15]
    assert job.report["slices_to_check"][:2] == [40, 15]
    logic.acceptCorrections(volume, job.segmentationNode, sliceRange=(40, 40))
    # 41 is more uncertain than 15, but next to an accepted slice it would teach the same thing.
    assert logic.nextSliceToCheck(job.segmentationNode) == 15
    logic.acceptCorrections(volume, job.segmentationNode, sliceRange=(15, 15))
    assert logic.nextSliceToCheck(job.segmentationNode) > 55  # the longest stretch left: above 40
    # Jumping puts the slice views on that axial slice of the volume.
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    r, a, s = logic.jumpToSlice(volume, 15)
    view = axial_view(np.arange(ct_image.GetSize()[2])[:, None, None] * np.ones(ct_image.GetSize()[::-1], int),
                      ct_image.GetDirection())[0]
    k = int(view[15].flat[0])
    lps = ct_image.TransformIndexToPhysicalPoint((0, 0, k))
    assert s == pytest.approx(lps[2], abs=1e-3)
    assert red.GetSliceToRAS().GetElement(2, 3) == pytest.approx(s, abs=1e-3)


def test_fine_tune_cancel_keeps_the_active_model(scene, stores, ct_image):
    runner = FakeRunner(store_root=stores[0].root, bundled=stores[0].bundled, finish=False)
    logic = _logic_with_corrections(scene, stores, ct_image, runner)
    job = logic.startFineTune(steps=2, lr=1e-4)
    job.poll()
    job.cancel()
    job.wait(timeout=10)
    assert job.state == "cancelled" and logic.modelStore.active().version == 1


def test_fine_tune_cancel_after_the_process_finished_reports_the_new_model(scene, stores, ct_image):
    logic = _logic_with_corrections(scene, stores, ct_image, FakeRunner(store_root=stores[0].root,
                                                                        bundled=stores[0].bundled))
    job = logic.startFineTune(steps=2, lr=1e-4)
    unread = []
    while job.process.rc is None:  # the process runs to its end before the panel reads a line
        unread += job.process.readLines()
    job.process.lines = unread
    job.cancel()
    job.wait(timeout=10)
    assert job.state == "completed" and job.version == 2 and logic.modelStore.active().version == 2
    assert "v2 is active" in job.message


def test_fine_tune_cancelled_after_it_activated_its_model_says_so(scene, stores, ct_image):
    runner = FakeRunner(store_root=stores[0].root, bundled=stores[0].bundled, finish=False)
    logic = _logic_with_corrections(scene, stores, ct_image, runner)
    job = logic.startFineTune(steps=2, lr=1e-4)
    job.poll()
    # The command saves and activates its model, and is killed before it prints the "done" line.
    v = logic.modelStore.add_version(b"fine-tuned", {"note": "fake"}, parent=logic.modelStore.active())
    logic.modelStore.set_active(v.version)
    job.cancel()
    job.wait(timeout=10)
    assert job.state == "cancelled" and job.version is None
    assert "active model is now v2" in job.message and "unchanged" not in job.message


def test_fine_tune_needs_corrections(logic):
    with pytest.raises(ValueError, match="corrections"):
        logic.startFineTune(steps=1, lr=1e-4)


def test_fine_tune_trains_at_the_panel_working_pixel_size(scene, stores, ct_image):
    logic = _logic_with_corrections(scene, stores, ct_image, None)
    assert "--pixel-mm" not in logic.fineTuneCommand(1, 1e-4)
    command = logic.fineTuneCommand(1, 1e-4, "cpu", 0.0)
    assert command[command.index("--pixel-mm") + 1] == "0.0"
    with pytest.raises(ValueError, match="working pixel size"):
        logic.startFineTune(steps=1, lr=1e-4, pixelMM=0.1)


def test_fine_tune_defaults_come_from_the_library_config(logic):
    d = logic.fineTuneDefaults()
    assert d["frozen_layers"] == 2 and 0 < d["lr"] < 1e-3 and d["steps"] >= 1 and 0 < d["tolerance"] < 0.1


@pytest.mark.slow
def test_fine_tune_in_a_real_subprocess_changes_the_model_version(scene, stores, ct_image):
    """`python -m DRSegUNetLib finetune` in a subprocess, on the tiny checkpoint and one accepted slice."""
    logic = _logic_with_corrections(scene, stores, ct_image, None)
    assert isinstance(logic.processRunner, lib.SubprocessRunner)
    job = logic.startFineTune(steps=1, lr=1e-4, device="cpu")
    job.wait(timeout=300, interval=0.1)
    job.raiseIfFailed()
    assert job.state == "completed"
    assert logic.modelStore.active().version == 2
    # Segment uses it.
    logic.predictorFactory = None  # the real segment-stream process
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT2", scene)
    seg = logic.segment(volume, device="cpu", timeout=300)
    assert seg.modelPath == str(logic.modelStore.path_of(2))


# ----------------------------------------------------------------- headless script


def _run_script(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "DRSegUNet" / "Scripts" / "segment.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))


@pytest.mark.slow
def test_headless_script_under_plain_python(tmp_path, tiny_checkpoint):
    slicerio = pytest.importorskip("slicerio")
    out, rep = tmp_path / "ct.seg.nrrd", tmp_path / "report.json"
    r = _run_script("--", "--input", str(CT64), "--output", str(out), "--model", str(tiny_checkpoint),
                    "--device", "cpu", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == [s.name for s in SEGMENTS]
    report = json.loads(rep.read_text())
    assert "volume_ml" in report and report["model"] == str(tiny_checkpoint)


@pytest.mark.slow
def test_headless_script_rejects_bad_input_with_one_line(tmp_path, tiny_checkpoint):
    r = _run_script("--input", str(tmp_path / "missing.nrrd"), "--output", str(tmp_path / "x.seg.nrrd"),
                    "--model", str(tiny_checkpoint))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"segment.py: error: {tmp_path / 'missing.nrrd'} does not exist"]
    assert not (tmp_path / "x.seg.nrrd").exists()


@pytest.mark.parametrize("install", [False, True])
def test_headless_script_stops_with_one_line_when_slicer_lacks_the_requirements(tmp_path, monkeypatch, capsys, install):
    """Inside Slicer the script sets up torch and scipy as the panel does; asked nothing, it names what is missing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("drsegunet_segment_script", REPO / "DRSegUNet" / "Scripts" / "segment.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    answers = []

    def setup(self, askUser, withTorch=True):  # what the logic does in Slicer when scipy is missing
        answers.append(askUser("install scipy?"))
        if not answers[-1]:
            raise RuntimeError("Required Python packages were not installed: scipy")
        raise RuntimeError("PyTorch could not be installed; use the PyTorch Utils module.")

    monkeypatch.setattr(lib.DRSegUNetLogic, "setupPythonRequirements", setup)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.mrmlScene)  # main() gives plain Python a new scene; put it back
    out = tmp_path / "x.seg.nrrd"
    code = script.main(["--input", str(CT64), "--output", str(out), "--device", "cpu",
                        *(["--install-requirements"] if install else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and answers == [install] and len(err) == 1, err
    if install:
        assert err[0] == "segment.py: error: PyTorch could not be installed; use the PyTorch Utils module."
    else:
        assert err[0].startswith("segment.py: error: Required Python packages were not installed: scipy")
        assert "--install-requirements" in err[0]
    assert not out.exists()


# ----------------------------------------------------------------- "Additional module paths"


def test_module_finds_the_library_beside_its_folder_when_not_installed(tmp_path):
    """Slicer given only the checkout's DRSegUNet/ folder: the module adds .. to sys.path itself."""
    code = (
        "import sys\n"
        f"sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        # An editable install of this checkout (pip install -e .) would find the library anyway.
        "sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "sys.path_hooks = [h for h in sys.path_hooks if not getattr(h, '__module__', '').startswith('__editable__')]\n"
        "sys.path_importer_cache.clear()\n"
        f"sys.path.insert(0, {str(REPO / 'Testing')!r})\n"
        "import slicer_stubs; slicer_stubs.install()\n"
        "try:\n"
        "    import DRSegUNetLib\n"
        "    raise SystemExit('DRSegUNetLib should not be importable before the module is loaded')\n"
        "except ImportError:\n"
        "    pass\n"
        f"sys.path.insert(0, {str(REPO / 'DRSegUNet')!r})\n"
        "import DRSegUNet, DRSegUNetLib\n"
        "print(DRSegUNetLib.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert Path(r.stdout.strip().splitlines()[-1]).resolve().parent == REPO / "DRSegUNetLib"


# ----------------------------------------------------------------- the in-Slicer self-test


@pytest.mark.slow
def test_the_in_slicer_self_test_runs_against_slicer_core():
    """DRSegUNetTest (Reload and Test, ctest) on the bundled CT stacked 4 times, with the bundled model: it reads
    the saved .seg.nrrd back and checks the segment names, a non-empty lung and the labels."""
    slicer_stubs.new_scene()
    volume = module.DRSegUNetTest.sampleVolume()
    assert volume.GetImageData().GetDimensions() == (512, 512, 4)
    assert lib.ijkToRasArray(volume)[2, 2] == pytest.approx(1.25)  # the DICOM's slice spacing
    result = unittest.TextTestRunner(verbosity=0).run(module.DRSegUNetTest("runTest"))
    assert result.wasSuccessful(), result.failures + result.errors


# ----------------------------------------------------------------- the segment-stream process


def _process_logic(scene, stores):
    models, corrections = stores
    return lib.DRSegUNetLogic(scene=scene, modelStore=models, correctionsStore=corrections)  # no predictorFactory


def test_segmentation_runs_in_a_separate_process_by_default(scene, stores, ct_image):
    """Inside Slicer a Python thread only runs while the main thread runs Python, so the network
    runs in `python -m DRSegUNetLib segment-stream`; its temporary folder goes when it ends."""
    logic = _process_logic(scene, stores)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, device="cpu")
    source = job._source
    assert isinstance(source, lib.jobs._SliceProcess)
    assert source.process is not None and "segment-stream" in source.process._proc.args
    job.wait(timeout=300)
    job.raiseIfFailed()
    assert job.state == "completed" and job.step == job.total
    assert not source.folder.exists()
    assert job.report["inference"]["pixel_mm"] == 1.2 and job.settings == job.report["inference"]


def test_cancelling_the_process_keeps_the_announced_slices_and_ends_it(scene, stores, ct_image):
    logic = _process_logic(scene, stores)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, device="cpu", pixelMM=0.0)
    deadline = time.monotonic() + 120
    while job.step < 3 and not job.finished and time.monotonic() < deadline:
        job.poll(maxSlices=1)
        time.sleep(0.01)
    assert 3 <= job.step < job.total, "cancel must come half-way"
    job.cancel()
    job.wait(timeout=60)
    assert job.state == "cancelled"
    process = job._source.process
    assert process._proc.poll() is not None  # ended, not left running
    written = job.done.copy()
    view = axial_view(job.labels, ct_image.GetDirection())[0]
    assert not view[~written].any()  # nothing beyond the slices written before Cancel
    assert view[written].any()
    assert not job._source.folder.exists()


def test_a_checkpoint_the_process_cannot_load_fails_with_its_one_line_message(scene, stores, ct_image, tmp_path):
    logic = _process_logic(scene, stores)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    job = logic.startSegmentation(volume, model=str(bad), device="cpu")
    job.wait(timeout=120)
    assert job.state == "failed"
    assert isinstance(job.error, ValueError) and "bad.pt" in str(job.error) and "\n" not in str(job.error)
    with pytest.raises(ValueError):
        job.raiseIfFailed()


def test_segmenting_again_keeps_the_accepted_slice_and_pulls_its_neighbours(scene, stores, ct_image):
    """After Accept, Segment on the same volume gives back the accepted slice as corrected and
    pulls the slices beside it toward it (DRSegUNetLib.guidance), through the separate process."""
    logic = _process_logic(scene, stores)
    volume = lib.volumeNodeFromSitkImage(ct_image, "CT", scene)
    first = logic.segment(volume, device="cpu", timeout=300)
    edited = _edit_axial_slice(logic, first, volume, ct_image, 40, CONSOLIDATION)
    assert len(logic.acceptCorrections(volume, first.segmentationNode)) == 1

    again = logic.segment(volume, device="cpu", timeout=300)
    view = lambda a: axial_view(a, ct_image.GetDirection())[0]  # noqa: E731
    np.testing.assert_array_equal(view(again.labels)[40], view(edited)[40])
    before = (view(first.labels)[41] == CONSOLIDATION).sum()
    assert (view(again.labels)[41] == CONSOLIDATION).sum() > before + 50
    np.testing.assert_array_equal(view(again.labels)[5], view(first.labels)[5])  # out of reach: as before
