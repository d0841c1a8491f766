"""``evaluate``: Dice, IoU, precision, recall and F1 of a model (or of saved label maps) on annotated slices."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ZENODO_PIXEL_MM, InferenceConfig, check_pixel_mm
from ..errors import InputError
from ..vocabulary import LABEL_LEGEND, REGIONS
from .common import (DEFAULT_SPLIT, ProgressPrinter, add_common_options, add_decision, add_inference_options,
                     add_model_options, add_pixel_mm, load_predictor, log, region_list)
from .files import check_outputs, file_sha256

SPLIT_PARTS = ("train", "val", "test")  # data.apply_split's parts, in its order


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model (or saved label maps) on annotated slices",
                       description="Per-class Dice, IoU, precision, recall and F1 (mean over slices and pooled over pixels) of a model on a MedSeg-style folder or a COVID-19-CT-Seg-style .npz. "
                                   f"With --predictions, score saved label maps instead of a model: an .npz with 'labels' (N, H, W) uint8 in our vocabulary ({LABEL_LEGEND}), one map per slice of DATA in the order DATA is read, "
                                   "such as the outputs of lungs, pseudolabel or selftrain (OUT/levelK/labels.npz) on DATA.")
    p.add_argument("data", help="MedSeg-style folder (images/*.jpg, masks/*.png) or .npz like zenodo20_dev.npz")
    add_model_options(p)
    p.add_argument("--predictions", default=None, help="score the label maps in this .npz instead of a model")
    p.add_argument("--by-group", action="store_true", help="also summarise per case group (the 'group' of the .npz)")
    p.add_argument("--regions", type=region_list, default=None,
                   help=f"comma list of regions to score ({', '.join(REGIONS)}; default: all the data decides)")
    p.add_argument("--json", required=True, help="where to write the metrics JSON")
    add_decision(p)
    add_inference_options(p)
    p.add_argument("--split-part", choices=("all",) + SPLIT_PARTS, default="all",
                   help="score only this part of --split (default all: every slice in DATA; the JSON and a note "
                        "on stderr say how many scored slices are in each part)")
    p.add_argument("--slice-pixel-mm", type=float, default=None,
                   help="pixel size in mm of DATA's slices, which carry no geometry; the network then runs at the "
                        "working pixel as segment does on CT (default: the data set's: a 'pixel_mm' array in the "
                        ".npz, else {\"pixel_mm\": MM} in DATA.json beside it, else "
                        f"{ZENODO_PIXEL_MM:g} for COVID-19-CT-Seg .npz files and none for MedSeg folders; "
                        "0 = the slices' own grid, this option's default before)")
    add_pixel_mm(p, "working pixel size in mm for slices with a pixel size (default: the model's own, "
                    f"{InferenceConfig.pixel_mm:g} for models that do not say; 0 = the slices' own grid)")
    p.add_argument("--threshold-averaged", action="store_true",
                   help="also write the Inf-Net-style Dice averaged over 256 probability thresholds per slice "
                        "(docs/crossval.md; needs --model, not --predictions; doubles the time)")
    p.add_argument("--split", default=str(DEFAULT_SPLIT),
                   help="split file that says which slices trained the model (train), validated it (val) or were "
                        "held out (test) (default: splits/default.json, the development split)")
    add_common_options(p)


def _saved_labels(args: argparse.Namespace):
    """(slices of DATA, slice -> (labels, None)) for --predictions."""
    from ..data import read_dataset
    from ..labelmaps import labels_for_dataset

    if args.model:
        raise InputError("give --model or --predictions, not both")
    if args.threshold_averaged:
        raise InputError("--threshold-averaged needs the model's probabilities: use --model, not --predictions")
    if args.slice_pixel_mm:
        raise InputError("--slice-pixel-mm sets the grid a model runs on: use --model, not --predictions")
    samples = read_dataset(args.data)
    maps = labels_for_dataset(args.predictions, args.data, len(samples))
    preds = dict(zip(map(id, samples), maps))
    for s in samples:
        if preds[id(s)].shape != s.hu.shape:
            raise InputError(f"{args.predictions}: label map {preds[id(s)].shape} of slice {s.name} "
                             f"differs from the slice's size {s.hu.shape}")
    return samples, lambda s: (preds[id(s)], None)


def _model_labels(args: argparse.Namespace):
    """(predictor, slices of DATA, slice -> (labels, probabilities)) for --model."""
    from ..data import read_dataset

    check_pixel_mm(args.pixel_mm)
    check_pixel_mm(args.slice_pixel_mm, "--slice-pixel-mm")
    predictor = load_predictor(args, 1)
    samples = read_dataset(args.data, predictor.config.eight_bit)

    def score(s):  # labels and, once, the probabilities behind them
        mm = slice_pixel_mm(args, s)
        labels, prob = predictor.labels(s.hu[None], (mm, mm) if mm else None, eight_bit=s.eight_bit)
        return labels[0], prob[0]
    return predictor, samples, score


def slice_pixel_mm(args: argparse.Namespace, sample) -> float | None:
    """The pixel size a slice is taken at: --slice-pixel-mm (0: own grid), else its data set's."""
    if args.slice_pixel_mm is not None:
        return args.slice_pixel_mm or None
    return sample.pixel_mm


def _pixel_note(args: argparse.Namespace, predictor, samples) -> dict:
    """Which pixel sizes scored ``samples``: a note on stderr, and the JSON's ``slice_pixel_mm``
    (one size, a list of several, or None: own grid), ``slice_pixel_mm_from`` and ``pixel_mm``
    (the working pixel; None where the slices ran on their own grid)."""
    sizes = sorted({mm for mm in (slice_pixel_mm(args, s) for s in samples) if mm})
    given = "--slice-pixel-mm" if args.slice_pixel_mm is not None else "the data set's"
    working = predictor.inference.pixel_mm
    whose = "--pixel-mm" if args.pixel_mm is not None else "the model's"
    if sizes and working:
        log.info("slices taken as %s mm pixels (%s) and resampled to the working pixel %g mm (%s), as segment runs "
                 "CT; --slice-pixel-mm 0 scores them on their own grid", "/".join(f"{m:g}" for m in sizes), given,
                 working, whose)
    elif sizes:
        log.info("slices scored on their own grid: the working pixel is 0 (%s)", whose)
    else:
        log.info("slices scored on their own grid: no pixel size (%s)", given)
    return {"slice_pixel_mm": (sizes[0] if len(sizes) == 1 else sizes) if sizes else None,
            "slice_pixel_mm_from": "option" if args.slice_pixel_mm is not None else "data set",
            "pixel_mm": working if sizes else None}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_bytes
    from ..data import apply_split, load_split
    from ..metrics import ThresholdAveragedAccumulator
    from ..metrics import GroupedMetrics

    check_outputs([args.data, args.predictions, args.model, args.split], [args.json])
    regions = args.regions or tuple(REGIONS)
    predictor = None
    if args.predictions:
        samples, score = _saved_labels(args)
    else:
        predictor, samples, score = _model_labels(args)
    parts = dict(zip(SPLIT_PARTS, apply_split(samples, load_split(args.split) if args.split else {})))
    if args.split_part != "all":
        samples = parts[args.split_part]
    scored = {id(s) for s in samples}
    checkpoint = None if predictor is None else predictor.checkpoint
    split = {"file": Path(args.split).name if args.split else None,
             "model_trained_with": ((checkpoint.fingerprint or {}).get("split") if checkpoint is not None else None),
             **{part: sum(id(s) in scored for s in members) for part, members in parts.items()}}
    if _trained_on_all_of(checkpoint, args.data):
        split["model_trained_on_every_slice"] = True
    _split_note(split, len(samples))
    pixels = (_pixel_note(args, predictor, samples) if predictor is not None
              else {"slice_pixel_mm": None, "slice_pixel_mm_from": None, "pixel_mm": None})
    gm = GroupedMetrics(regions)
    tad = ThresholdAveragedAccumulator() if args.threshold_averaged else None
    printer = ProgressPrinter()
    for i, s in enumerate(samples, 1):
        labels, prob = score(s)
        truths = {r: s.region_truth(r) for r in regions}
        gm.add(s.group, s.name, labels, truths)
        if tad is not None:
            tad.add(s.source, prob.float().cpu().numpy(), truths)
        printer("evaluate", i, len(samples), f"slice {s.name}")
    summary = gm.summary()
    out = _result(args, predictor, len(samples), split, summary, pixels)
    if args.by_group:
        out["by_group"] = gm.by_group()
    if tad is not None:
        out["threshold_averaged_dice"] = {src: {r: {k: v for k, v in m.items() if k != "per_slice"}
                                                for r, m in regs.items()}
                                          for src, regs in tad.summary().items()}
    atomic_write_bytes(args.json, (json.dumps(out, indent=1) + "\n").encode())
    for region, m in summary.items():
        log.info("%-14s Dice mean %.4f  pooled %.4f  (%d slices)", region, m["mean"]["dice"] or 0.0,
                 (m["pooled"] or {}).get("dice", 0.0), m["n_slices"])
    return 0


def _result(args: argparse.Namespace, predictor, n_slices: int, split: dict, summary: dict, pixels: dict) -> dict:
    """The JSON evaluate writes, without --by-group and --threshold-averaged (None: --predictions);
    ``pixels``: :func:`_pixel_note`'s."""
    model = None if predictor is None else predictor.source
    out = {"data": str(args.data), "model": model, "model_sha256": file_sha256(model) if model else None,
           "decision": None if predictor is None else predictor.inference.decision,
           "bf16": None if predictor is None else predictor.uses_bf16,
           "flip_tta": None if predictor is None else predictor.inference.flip_tta,
           **pixels, "n_slices": n_slices, "split_part": args.split_part,
           # how many scored slices the split puts in each part: "train" ones taught the model
           "split": split,
           "n_slices_in_training_part": n_slices if split.get("model_trained_on_every_slice") else split["train"],
           "metrics": summary}
    if args.predictions:
        out["predictions"] = str(args.predictions)
    return out


def _trained_on_all_of(checkpoint, data: str) -> bool:
    """Whether ``checkpoint`` was trained on every slice of ``data``: ``train --split ""`` records the
    split as None beside the sha256 of each data set (a fine-tune keeps its start's record)."""
    fp = (checkpoint.fingerprint or {}) if checkpoint is not None else {}
    if "split" not in fp or fp["split"] is not None or not isinstance(fp.get("data"), dict):
        return False
    from ..data import fingerprint

    return next(iter(fingerprint([data]).values())) in fp["data"].values()


def _split_note(split: dict, n: int) -> None:
    """One line on stderr: how many of the ``n`` slices to be scored trained the model under the split."""
    if split.get("model_trained_on_every_slice"):
        log.warning("scoring %d slices of a data set the model was trained on in full (its checkpoint records no "
                    "split): none of them is held out, so the scores show how well it fits them, not how it does "
                    "on new CT", n)
        return
    if not split["file"]:
        log.warning("scoring %d slices with no --split: nothing says which of them trained the model", n)
        return
    note = (f"scoring {n} slices; the split {split['file']} puts {split['train']} of them in the model's training "
            f"part, {split['val']} in validation and {split['test']} in test")
    if split["model_trained_with"] and split["model_trained_with"] != split["file"]:
        note += f" (but the model was trained under the split {split['model_trained_with']})"
    if split["train"]:
        log.warning("%s: training slices inflate the scores; --split-part test scores the held-out test slices only",
                    note)
    else:
        log.info("%s", note)


COMMANDS = {"evaluate": cmd_evaluate}
