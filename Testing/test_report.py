"""The segment report (report.compute_report) on real segmentations: the same numbers as the whole-volume
computation it replaced (kept verbatim in bench/report_memory.py), a fraction of its memory, and progress."""
from __future__ import annotations

import importlib.util
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, TESTDATA

from DRSegUNetLib.report import compute_report


def _bench():
    spec = importlib.util.spec_from_file_location("report_memory", REPO / "bench" / "report_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    before = _bench().compute_report_before
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
