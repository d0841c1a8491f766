"""The segment report (report.compute_report) on real segmentations: the same numbers as the whole-volume
computation it replaced (bench/report_memory.py's compute_report_before, loaded below; that script measures
both), a fraction of its memory, and progress."""
from __future__ import annotations

import importlib.util
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, TESTDATA

from DRSegUNetLib.report import compute_report, next_slice_to_check, slices_to_check


# The report as compute_report made it before it worked a block of slices at a time (commit d803814): np.isin
# over the whole volume per region, ndimage.label and centres of mass on the whole lung field. Plain and
# memory-hungry, so a reference for the numbers; bench/report_memory.py keeps it verbatim and measures both.
_spec = importlib.util.spec_from_file_location("report_memory", REPO / "bench" / "report_memory.py")
_report_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_report_memory)
whole_volume_report = _report_memory.compute_report_before


@pytest.fixture(scope="module")
def real_segmentation(sample_ct_path, bundled_model) -> sitk.Image:
    """The bundled model's labels of the bundled CT slice (512x512; both lungs, GGO and consolidation)."""
    import torch

    from DRSegUNetLib.imageio import read_ct
    from DRSegUNetLib.inference import Predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Predictor.from_checkpoint(bundled_model, "cpu").predict(read_ct(sample_ct_path))
    finally:
        torch.set_num_threads(threads)


def _tiled(labels: sitk.Image, n: int, direction=None) -> sitk.Image:
    arr = sitk.GetArrayFromImage(labels)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.broadcast_to(arr[:1], (n, *arr.shape[1:]))))
    out.SetSpacing(labels.GetSpacing())
    if direction is not None:
        out.SetDirection(direction)
    return out


def test_report_numbers_are_those_of_the_whole_volume_computation(real_segmentation):
    before = whole_volume_report
    arr = sitk.GetArrayFromImage(real_segmentation)
    assert np.isin(arr, (1, 2)).sum() > 500 and (arr == 3).sum() > 5000  # a real segmentation with lesions

    lungs = sitk.ReadImage(str(TESTDATA / "cip_lungs" / "wholeLung-64.nrrd"))  # expert lung mask, uint16 0/1
    lesion = sitk.GetArrayFromImage(lungs) * 3
    lesion[30:50, 20:40, 10:30][lesion[30:50, 20:40, 10:30] == 3] = 1
    mixed = sitk.GetImageFromArray(lesion)
    mixed.CopyInformation(lungs)

    specks = np.zeros((2, 512, 512), np.uint8)  # 65,536 separate pieces of lung field: labels beyond uint16
    specks[0, ::2, ::2] = 3
    specks[1, 1::2, 1::2] = 1

    cases = {
        "the slice": real_segmentation,
        "tiled, flipped axes": _tiled(real_segmentation, 24, (-1, 0, 0, 0, 1, 0, 0, 0, -1)),
        "tiled, sagittal storage": _tiled(real_segmentation, 16, (0, 0, 1, 1, 0, 0, 0, 1, 0)),
        "expert lung mask (uint16)": sitk.Cast(lungs, sitk.sitkUInt16) * 3,
        "expert lungs with a lesion": mixed,
        "many pieces": sitk.GetImageFromArray(specks),
        "no lung": sitk.Image([8, 8, 3], sitk.sitkUInt8),
    }
    for name, image in cases.items():
        assert compute_report(image) == before(image), name
    assert compute_report(real_segmentation)["per_lung"] is not None


def test_report_holds_a_few_bytes_per_voxel_and_reports_progress(real_segmentation):
    volume = _tiled(real_segmentation, 48)  # 12.6 M voxels
    n = int(np.prod(volume.GetSize()))
    steps = []
    tracemalloc.start()
    try:
        rep = compute_report(volume, progress=lambda stage, step, total, message="", **k: steps.append((stage, step, total)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The lung field (1 byte a voxel), its components (2 bytes) and a block's temporaries; the whole-volume
    # computation held about 20 bytes a voxel (bench/report_memory.py).
    assert peak < 3 * n + 48 * 2**20, f"{peak / n:.1f} bytes per voxel"
    assert rep["per_lung"] is not None
    assert steps and {s[0] for s in steps} == {"report"} and steps[-1][1] == steps[-1][2]
    assert [s[1] for s in steps] == list(range(1, steps[-1][2] + 1))


def test_slices_to_check_spread_over_the_lung_when_the_model_is_equally_unsure():
    u = [0.0] * 5 + [0.2] * 100 + [0.0] * 5  # lung on slices 5..104
    picks = slices_to_check(u, 5)
    assert len(set(picks)) == 5 and all(5 <= i <= 104 for i in picks)
    ordered = sorted(picks)
    assert min(np.diff(ordered)) >= 12  # evenly spaced would be 20 apart
    assert ordered[0] - 5 <= 20 and 104 - ordered[-1] <= 20


def test_next_slice_to_check_takes_the_most_uncertain_slice_away_from_those_accepted():
    u = [0.0, 0.1, 0.1, 0.3, 0.9, 0.8, 0.1, 0.1, 0.5, 0.1, 0.1, 0.0]  # lung on 1..10
    assert next_slice_to_check(u) == 5  # 4 is more uncertain, but off the middle of the lungs
    assert next_slice_to_check(u, [5]) == 8  # 4 and 6 are more uncertain, but next to 5
    assert next_slice_to_check(u, [5, 8]) == 2  # the longest stretch left
    # Once every slice lies next to an accepted one, spreading stops mattering: the most uncertain.
    assert next_slice_to_check(u, [5, 8, 2]) == 4
    assert sorted(slices_to_check(u, 20)) == list(range(1, 11))  # every lung slice, once
    assert next_slice_to_check(u, range(12)) is None and next_slice_to_check([0.0] * 4) is None
