"""Exercise what runs inside 3D Slicer's Python (numpy 1.26 and SimpleITK 2.2 in Slicer 5.6/5.8, Python 3.9)
and print the results as one JSON object, so that Testing/test_old_numpy.py can compare them with the same
run under this checkout's numpy 2.

    python Testing/old_numpy_check.py WORK_FOLDER [--tiny CHECKPOINT [--no-finetune]]

It runs the parts the Slicer module uses in Slicer's own process: orientation, vocabulary, config,
imageio.read_ct, lungs, report.compute_report on a real label map, store.CorrectionsStore (add, load,
items) and ModelStore, segio, and the CT copy and memory-mapped label array of SegmentationJob. With
``--tiny`` and torch it also runs the worker process as the module starts it (``-m DRSegUNetLib
segment-stream`` and ``finetune``), which runs under Slicer's numpy too (PythonSlicer).
Plain Python 3.9 (no ``X | Y`` outside annotations, no ``match``): the old interpreter runs this file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402


def digest(a) -> str:
    a = np.ascontiguousarray(a)
    return f"{a.dtype.str}{list(a.shape)}:" + hashlib.sha1(a.tobytes()).hexdigest()[:16]


def plain(x):
    """JSON-able: tuples become lists, numpy scalars Python numbers."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def real_label_map():
    """CIP's 64^3-ish CT and its lung mask, as our vocabulary: lung field 3, GGO 1 and consolidation 2 by HU."""
    from DRSegUNetLib.imageio import read_ct
    from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO, LUNG

    ct = read_ct(DATA / "cip_ct64" / "ct-64.nrrd")
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "cip_lungs" / "wholeLung-64.nrrd"))) > 0
    hu = sitk.GetArrayFromImage(ct)
    labels = np.zeros(hu.shape, np.uint8)
    labels[lung] = LUNG
    labels[lung & (hu >= -600) & (hu < -300)] = GGO
    labels[lung & (hu >= -300) & (hu < -100)] = CONSOLIDATION
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    return ct, image


def oblique(image):
    """The same content with the axes permuted and flipped and a non-identity direction."""
    from geometry_helpers import oblique_image  # beside this script

    return oblique_image(image)


def in_process(work: Path) -> dict:
    import DRSegUNetLib
    from DRSegUNetLib.config import PIXEL_MM_RANGE, FineTuneConfig, InferenceConfig, check_pixel_mm
    from DRSegUNetLib.imageio import read_ct
    from DRSegUNetLib.lungs import extract_lungs
    from DRSegUNetLib.orientation import SliceResult, axial_spacing, axial_view
    from DRSegUNetLib.report import add_uncertainty, compute_report
    from DRSegUNetLib.segio import ijk_to_lps, segmentation_dict
    from DRSegUNetLib.store import CorrectionsStore, ModelStore
    from DRSegUNetLib.vocabulary import CLASS_NAMES, SEGMENTS, slicer_terminology_context

    out = {}
    out["torch_problem_1.13.1"] = DRSegUNetLib.torch_version_problem("1.13.1") is not None
    out["config"] = [float(InferenceConfig().pixel_mm or 0.0), FineTuneConfig().steps, list(PIXEL_MM_RANGE)]
    check_pixel_mm(1.0, "pixel size")
    out["vocabulary"] = [CLASS_NAMES, [(s.segment_id, s.name, list(s.labels)) for s in SEGMENTS],
                         slicer_terminology_context()]

    sample = read_ct(DRSegUNetLib.sample_ct_path())
    out["sample_ct"] = [list(sample.GetSize()), list(sample.GetSpacing()), digest(sitk.GetArrayViewFromImage(sample))]

    ct, labels = real_label_map()
    out["ct64"] = [list(ct.GetSize()), digest(sitk.GetArrayViewFromImage(ct))]
    reports = {}
    for name, image in (("straight", labels), ("oblique", oblique(labels))):
        view, inverse = axial_view(sitk.GetArrayViewFromImage(image), image.GetDirection())
        back = inverse(np.array(view))
        assert np.array_equal(back, sitk.GetArrayViewFromImage(image)), name
        report = compute_report(image)
        add_uncertainty(report, [0.0, 0.25, 0.5] + [0.1] * (view.shape[0] - 3))
        reports[name] = report
        out[f"axial_{name}"] = [list(view.shape), digest(view), list(axial_spacing(image.GetSpacing(), image.GetDirection()))]
        # SliceResult.place as the jobs do, into a copy and into one segment's mask
        volume = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        mask = np.zeros_like(volume)
        for n in range(view.shape[0]):
            result = SliceResult(n, view.shape[0], np.array(view[n]), image.GetDirection())
            result.place(volume)
            result.place(mask, labels=[1, 2])
        assert np.array_equal(volume, sitk.GetArrayViewFromImage(image)), name
        out[f"place_{name}"] = digest(mask)
        seg = segmentation_dict(image)
        out[f"segio_{name}"] = [digest(seg["voxels"]), np.asarray(ijk_to_lps(image)).round(6).tolist(),
                                [s["labelValue"] for s in seg["segments"]]]
    out["report"] = reports

    crop = read_ct(DATA / "cip_lungs" / "crop_ct_2slices.nrrd")
    lungs = extract_lungs(crop)  # held: a view of a temporary image would read freed memory
    out["extract_lungs"] = digest(sitk.GetArrayViewFromImage(lungs))

    # CorrectionsStore: add (int16 CT, float CT, a subset of checked segments) and load back.
    store = CorrectionsStore(work / "corrections")
    view = axial_view(sitk.GetArrayViewFromImage(ct), ct.GetDirection())[0]
    lview = axial_view(sitk.GetArrayViewFromImage(labels), labels.GetDirection())[0]
    spacing = axial_spacing(ct.GetSpacing(), ct.GetDirection())
    added = [
        (store.add(np.asarray(view[40]), np.asarray(lview[40]), spacing, "ct-64 | | sha1:x", 40), None),
        (store.add(np.asarray(view[41]).astype(np.float64) + 0.5, np.asarray(lview[41]), spacing, "ct-64", 41,
                   known=("ggo", "lung")), ("ggo", "lung")),
    ]
    loaded = []
    for cid, known in added:
        c = store.load(cid)
        assert c.known == known and c.ct_hu.dtype == np.float32 and c.labels.dtype == np.uint8
        loaded.append([digest(c.ct_hu), digest(c.labels), list(c.spacing), c.slice_index, c.source])
    assert np.array_equal(store.load(added[0][0]).ct_hu, np.asarray(view[40], np.float32))
    assert [i.id for i in store.items()] == [cid for cid, _ in added] and len(store) == 2
    out["corrections"] = loaded

    models = ModelStore(work / "models", bundled=DRSegUNetLib.default_model_path())
    out["models"] = [[v.version, v.label] for v in models.versions()] + [models.active().version]

    # SegmentationJob's hand-over: the CT as .mha, a memory-mapped .npy the worker fills.
    sitk.WriteImage(ct, str(work / "ct.mha"))
    assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(str(work / "ct.mha"))), sitk.GetArrayViewFromImage(ct))
    np.lib.format.open_memmap(work / "labels.npy", mode="w+", dtype=np.uint8,
                              shape=tuple(ct.GetSize()[::-1])).flush()
    shared = np.load(work / "labels.npy", mmap_mode="r")
    out["memmap"] = [list(shared.shape), shared.dtype.str]
    return out


def worker(work: Path, tiny: Path, finetune: bool = True) -> dict:
    """The worker process as the Slicer module starts it, with this interpreter."""
    from DRSegUNetLib.imageio import read_ct
    from DRSegUNetLib.orientation import axial_spacing, axial_view
    from DRSegUNetLib.store import CorrectionsStore

    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", DRSEGUNET_HOME=str(work / "home"))
    out = {}
    ct = read_ct(DATA / "cip_lungs" / "crop_ct_2slices.nrrd")
    sitk.WriteImage(ct, str(work / "crop.mha"))
    labels = work / "crop_labels.npy"
    np.lib.format.open_memmap(labels, mode="w+", dtype=np.uint8, shape=tuple(ct.GetSize()[::-1])).flush()
    r = subprocess.run([sys.executable, "-m", "DRSegUNetLib", "segment-stream", str(work / "crop.mha"), str(labels),
                        "--model", str(tiny), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    out["segment_stream_events"] = [e.get("event", e.get("stage")) for e in events]
    out["segment_stream_labels"] = digest(np.load(labels))
    if not finetune:
        return out

    store = CorrectionsStore(work / "ft_corrections")
    view = axial_view(sitk.GetArrayViewFromImage(ct), ct.GetDirection())[0]
    lab = np.zeros(view.shape[1:], np.uint8)
    lab[100:300, 60:160] = 3
    lab[150:200, 80:120] = 1
    store.add(np.asarray(view[0]), lab, axial_spacing(ct.GetSpacing(), ct.GetDirection()), "crop", 0)
    r = subprocess.run([sys.executable, "-m", "DRSegUNetLib", "finetune", "--model", str(tiny),
                        "--corrections", str(store.root), "--store", str(work / "ft_models"), "--steps", "1",
                        "--lr", "0.0001", "--device", "cpu", "--json-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    out["finetune_rc"] = r.returncode
    out["finetune_tail"] = (r.stderr.strip().splitlines() or [""])[-1] if r.returncode else ""
    out["finetune_versions"] = sorted(p.name for p in (work / "ft_models").glob("v*") if p.is_dir())
    return out


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="an empty folder for the files it writes")
    parser.add_argument("--tiny", type=Path, default=None,
                        help="a small checkpoint: run the worker process too (needs torch in this interpreter)")
    parser.add_argument("--no-finetune", action="store_true", help="of the worker, run segment-stream only")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"versions": {"python": platform.python_version(), "numpy": np.__version__,
                           "SimpleITK": sitk.Version_VersionString()}}
    result["in_process"] = in_process(args.work)
    if args.tiny is not None and importlib.util.find_spec("torch") is not None:
        import torch

        result["versions"]["torch"] = torch.__version__
        result["worker"] = worker(args.work, args.tiny, finetune=not args.no_finetune)
    print(json.dumps(plain(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
