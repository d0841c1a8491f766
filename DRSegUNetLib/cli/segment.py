"""``segment`` (one CT, or many with one model load) and ``segment-stream`` (the Slicer module's
separate process: slice by slice into a shared label array, a JSON line per slice).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..config import InferenceConfig, check_pixel_mm
from ..errors import InputError
from ..vocabulary import LABEL_LEGEND
from .common import (ProgressPrinter, add_common_options, add_decision, add_inference_options, add_model_options,
                     add_pixel_mm, load_predictor, log, positive_int)
from .files import (check_outputs, check_writable_folder, check_written_nifti, expand_inputs, read_ct_checked,
                    volume_name, writing)

OUTPUT_KINDS = ("labels", "seg", "report", "overlay")  # what segment --out-dir writes per input (--outputs)


def add_parsers(sub) -> None:
    p = sub.add_parser("segment", help="segment CT volumes",
                       description=f"Segment chest CT in HU (NIfTI, NRRD, MHA, a DICOM file or a DICOM series folder) and write a label map ({LABEL_LEGEND}) with the input's geometry. "
                                   "One volume: segment INPUT OUTPUT [--seg-nrrd P] [--report P] [--overlay P]. "
                                   "Many volumes with one model load: segment INPUT... --out-dir DIR (inputs may be files, folders of volumes, DICOM series folders, or --list FILE); finished outputs are skipped on a rerun, and --shard K/N splits the work across workers or GPUs.")
    p.add_argument("paths", nargs="*", metavar="INPUT [OUTPUT]",
                   help="one CT and its label-map path, or (with --out-dir) any number of inputs")
    add_model_options(p)
    p.add_argument("--seg-nrrd", default=None, help="also write a Slicer .seg.nrrd here (one volume)")
    p.add_argument("--report", default=None, help="also write a JSON report (volumes, %% of lung involved) (one volume)")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of the most involved slice (one volume)")
    p.add_argument("--out-dir", default=None, help="many volumes: write NAME.nii.gz (+ outputs of --outputs) here")
    p.add_argument("--list", default=None, help="many volumes: a text file with one input path per line")
    p.add_argument("--outputs", default="labels,report",
                   help=f"many volumes: comma list of {', '.join(OUTPUT_KINDS)} (default labels,report)")
    p.add_argument("--shard", default=None, help="many volumes: K/N processes every N-th input starting at K (0-based)")
    p.add_argument("--overwrite", action="store_true", help="many volumes: redo inputs whose outputs exist")
    _add_segment_options(p)
    add_common_options(p)

    p = sub.add_parser("segment-stream", help="segment one CT into a shared label array, a JSON line per slice",
                       description="Segment INPUT slice by slice into LABELS, an existing .npy uint8 array shaped like "
                                   "the CT's (z, y, x) voxel array, printing one JSON line per finished slice. The "
                                   "Slicer module runs this in a separate process and fills the segments as the lines "
                                   "arrive; it cancels by ending the process (a slice is announced only once it is written).")
    p.add_argument("input", help="CT in HU (any format segment reads)")
    p.add_argument("labels", help="existing .npy uint8 array (z, y, x) the labels are written into")
    add_model_options(p)
    _add_segment_options(p)
    add_common_options(p)


def _add_segment_options(p: argparse.ArgumentParser) -> None:
    """The decision rule, batch and working pixel of segment and segment-stream (see load_predictor)."""
    add_decision(p)
    p.add_argument("--batch-size", type=positive_int, default=4, help="slices per forward pass (default 4)")
    add_inference_options(p)
    add_pixel_mm(p, "working pixel size of the network in mm (default: the model's own, which info shows; "
                    f"{InferenceConfig.pixel_mm:g} for models that do not say): slices are resampled to it and the "
                    "labels come back on the CT's grid; 0 = the CT's own grid")
    p.add_argument("--corrections", default=None,
                   help="corrections store whose accepted slices of this CT guide their neighbouring slices "
                        "(default: the user's, as finetune uses; 'none' = no guidance); a correction belongs to "
                        "the CT when its stored slice is the CT's slice at its index")


def corrections_for(path: Optional[str]):
    """The corrections store that guides segment (None with 'none'); see --corrections. One
    named on the command line must exist; the user's default may not yet."""
    from .correction_loop import corrections_store

    if path is not None and path.lower() == "none":
        return None
    return corrections_store(path, must_exist=bool(path))


def cmd_segment(args: argparse.Namespace) -> int:
    from ..imageio import check_volume_output

    check_pixel_mm(args.pixel_mm)
    if args.out_dir is not None:
        return _segment_many(args)
    if len(args.paths) != 2 or args.list or args.shard:
        raise InputError("give INPUT OUTPUT, or inputs with --out-dir DIR for many volumes")
    check_volume_output(args.paths[1])
    check_outputs(args.paths[:1], [args.paths[1], args.seg_nrrd, args.report, args.overlay])
    corrections = corrections_for(args.corrections)
    predictor = load_predictor(args, args.batch_size)
    written = segment_one(predictor, args.paths[0], Path(args.paths[1]), args.seg_nrrd, args.report,
                          args.overlay, progress=ProgressPrinter(), corrections=corrections)
    log.info("wrote %s", ", ".join(written))
    return 0


def _many_inputs(args: argparse.Namespace) -> tuple[list[Path], list[str], set[str]]:
    """(inputs, their output names, the --outputs wanted) of segment --out-dir, this shard's only."""
    if args.seg_nrrd or args.report or args.overlay:
        raise InputError("with --out-dir, choose extra outputs with --outputs, not --seg-nrrd/--report/--overlay")
    wanted = {w.strip() for w in args.outputs.split(",") if w.strip()}
    unknown = wanted - set(OUTPUT_KINDS)
    if unknown:
        raise InputError(f"unknown --outputs {sorted(unknown)}; choose from {', '.join(OUTPUT_KINDS)}")
    inputs = expand_inputs(args.paths, args.list)
    if not inputs:
        raise InputError("no inputs found")
    names = [volume_name(p) for p in inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"several inputs would write the same outputs: {dupes[:5]}")
    if args.shard:
        try:
            k, n = (int(v) for v in args.shard.split("/"))
            assert 0 <= k < n
        except (ValueError, AssertionError):
            raise InputError(f"--shard must be K/N with 0 <= K < N, not {args.shard!r}") from None
        inputs, names = inputs[k::n], names[k::n]
    return inputs, names, wanted


def _segment_many(args: argparse.Namespace) -> int:
    """segment --out-dir: every input with one model load; inputs whose outputs exist are skipped."""
    from ..errors import CheckpointError

    inputs, names, wanted = _many_inputs(args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder (it is created if missing)")

    def targets(name: str) -> dict[str, Optional[Path]]:
        return {"labels": out_dir / f"{name}.nii.gz",
                "seg": out_dir / f"{name}.seg.nrrd" if "seg" in wanted else None,
                "report": out_dir / f"{name}.json" if "report" in wanted else None,
                "overlay": out_dir / f"{name}.png" if "overlay" in wanted else None}

    for p, nm in zip(inputs, names):
        check_outputs([p], list(targets(nm).values()), writable=False)
    todo = [(p, nm) for p, nm in zip(inputs, names)
            if args.overwrite or not all(t.exists() for t in targets(nm).values() if t is not None)]
    log.info("%d input(s), %d already done, %d to segment", len(inputs), len(inputs) - len(todo), len(todo))
    if not todo:
        return 0
    check_writable_folder(targets(todo[0][1])["labels"])  # only when there is something to write
    corrections = corrections_for(args.corrections)
    predictor = load_predictor(args, args.batch_size)
    failed = []
    printer = ProgressPrinter()
    for i, (path, name) in enumerate(todo, 1):
        t = targets(name)
        try:
            segment_one(predictor, str(path), t["labels"], t["seg"], t["report"], t["overlay"], corrections=corrections)
        except (InputError, CheckpointError) as e:
            failed.append(f"{path}: {e}")
            log.error("%s: %s", path, e)
        printer("volumes", i, len(todo), name)
    if failed:
        print(f"error: {len(failed)} of {len(todo)} input(s) failed; first: {failed[0]}", file=sys.stderr)
        return 2
    return 0


def segment_one(predictor, input_path: str, labels_path: Path, seg_nrrd=None, report=None, overlay=None,
                progress=None, corrections=None) -> list[str]:
    """Segment one CT and write its outputs all-or-nothing (a failure leaves every old file as it was).
    ``corrections``: a store whose accepted slices of this CT guide their neighbours (guidance.py)."""
    from ..imageio import output_set, write_image

    image = read_ct_checked(input_path)
    guide = _guide(corrections, image)
    uncertainty: list = []
    labels = predictor.predict(image, progress=progress, uncertainty=uncertainty, guide=guide)
    outputs = []
    with output_set() as stage:
        if seg_nrrd:
            from ..segio import write_seg_nrrd

            with writing(seg_nrrd, stage(seg_nrrd)) as tmp:
                write_seg_nrrd(labels, tmp)
            outputs.append(str(seg_nrrd))
        if report:
            from ..report import add_uncertainty, compute_report, write_report

            rep = compute_report(labels, progress=progress)
            rep.update(input=str(input_path), model=str(predictor.source), inference=predictor.settings())
            add_uncertainty(rep, uncertainty)
            rep["guided_by_accepted_slices"] = list(guide.slices)
            with writing(report, stage(report)) as tmp:
                write_report(rep, tmp)
            outputs.append(str(report))
        if overlay:
            from ..overlay import write_overlay

            with writing(overlay, stage(overlay)) as tmp:
                index = write_overlay(image, labels, tmp)
            log.info("overlay %s shows axial slice %d of %d (0 = most inferior)", overlay, index,
                     _axial_slices(labels))
            outputs.append(str(overlay))
        # The label map last: its presence marks a finished input for reruns.
        with writing(labels_path, stage(labels_path)) as tmp:
            write_image(labels, tmp)
            if str(labels_path).lower().endswith((".nii", ".nii.gz")):
                check_written_nifti(labels_path, tmp)
        outputs.append(str(labels_path))
    return outputs


def _guide(corrections, image):
    from ..guidance import guide_for_image

    guide = guide_for_image(corrections, image)
    if len(guide):
        log.info("%d accepted slice(s) of this CT (%s) guide their neighbours", len(guide),
                 ", ".join(map(str, guide.slices[:10])) + (", ..." if len(guide) > 10 else ""))
    return guide


def _axial_slices(image) -> int:
    from ..orientation import axial_shape

    return axial_shape(image.GetSize(), image.GetDirection())[0]


def cmd_segment_stream(args: argparse.Namespace) -> int:
    import numpy as np

    check_pixel_mm(args.pixel_mm)
    image = read_ct_checked(args.input)
    shape = tuple(image.GetSize()[::-1])
    try:
        labels = np.load(args.labels, mmap_mode="r+")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot open {args.labels} as a .npy array ({e})") from None
    if labels.dtype != np.uint8 or labels.shape != shape:
        raise InputError(f"{args.labels} is {labels.dtype} {labels.shape}; the CT needs uint8 {shape}")
    corrections = corrections_for(args.corrections)
    predictor = load_predictor(args, args.batch_size)
    guide = _guide(corrections, image)
    printer = ProgressPrinter(json_lines=True)
    printer("loaded", 0, 0, "model loaded", settings=predictor.settings(), guided_by=list(guide.slices))
    done = 0
    for result in predictor.iter_slices(image, guide=guide):
        result.place(labels)
        labels.flush()  # on disk (the shared page cache) before the line that announces it
        done += 1
        printer("slice", done, result.total, index=result.index, uncertainty=round(float(result.uncertainty or 0.0), 5))
    printer("done", done, done, "segmented")
    return 0


COMMANDS = {"segment": cmd_segment, "segment-stream": cmd_segment_stream}
