"""``train``: a model from annotated slices (best.pt, last.pt, history.json)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from ..config import PIXEL_MM_RANGE, BatchNormMode, Bf16, InferenceConfig, Upsampling, check_pixel_mm
from ..errors import InputError
from ..vocabulary import GGO_NAME, LUNG_NAME
from .common import (DEFAULT_SPLIT, SPLITS_DIR, ProgressPrinter, add_common_options, add_json_progress, add_pixel_mm,
                     add_training_budget, add_workers, count, log, region_list)


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model", description="Train DRSegUNet (Adam + marginal categorical cross-entropy) on annotated slices; writes best.pt (best validation Dice) and last.pt atomically.")
    p.add_argument("data", nargs="+", help="MedSeg-style folders (images/, masks/) and/or COVID-19-CT-Seg-style .npz files")
    p.add_argument("--out", required=True, help="output folder for checkpoints and history.json")
    p.add_argument("--split", default=str(DEFAULT_SPLIT),
                   help="JSON split file naming validation and test slices (default: the bundled "
                        "splits/default.json; \"\" = every slice trains)")
    p.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning / level 2)")
    add_training_budget(p, epochs=40)
    p.add_argument("--frozen-layers", type=count, default=0, help="freeze the first N layers (default 0; level 2: 2)")
    p.add_argument("--bn", choices=BatchNormMode.values(), default=BatchNormMode.TRAIN.value,
                   help="BatchNorm statistics: train (default) re-estimates them from each batch, as training from "
                        "scratch needs; frozen keeps those of --init (eval mode) and still trains the scales and "
                        "shifts")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights with this decay, e.g. "
                        "0.998 (about the last 500 steps, fewer in the first ones; default 0: the live weights)")
    p.add_argument("--hard-negatives", type=float, default=0.0, metavar="FRACTION",
                   help="share of the crops not centred on a lesion that are centred on dense pixels labelled lung "
                        "and not lesion (vessels, bronchial walls; default 0)")
    p.add_argument("--blur", default="0.2,1.0", metavar="P,SIGMA",
                   help="Gaussian blur of a crop: probability and largest sigma in pixels (default 0.2,1.0)")
    p.add_argument("--scale", default="0.8,1.25", metavar="LOW,HIGH",
                   help="range of the random zoom of a crop; below 1 shows structures smaller, as at a coarser "
                        "pixel (default 0.8,1.25)")
    p.add_argument("--base-filters", type=int, default=16,
                   help="filters of the first layer, doubled at each level down (default 16: the thesis's network)")
    p.add_argument("--upsampling", choices=Upsampling.values(), default=Upsampling.TRANSPOSE.value,
                   help="decoder: transposed convolutions (default transpose) or up-sampling and a convolution")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1)")
    p.add_argument("--source-weights", default="", metavar="SRC=W,...",
                   help="relative frequency of crops per source, e.g. medseg=3,zenodo=1 (default: equal)")
    p.add_argument("--select-regions", type=region_list, default=(), metavar="R,...",
                   help=f"regions whose mean validation Dice picks best.pt, e.g. {GGO_NAME},{LUNG_NAME} (default: all)")
    p.add_argument("--slice-pixel-mm", default="", metavar="SRC=MM,...",
                   help="take the training and validation slices of these sources as MM pixels and resample them "
                        "to --pixel-mm, the grid segment runs the network on for CT, e.g. zenodo=1.5 (default: none, "
                        "every slice on its own grid)")
    add_pixel_mm(p, "the model's working pixel size in mm, saved in its checkpoint: segment and evaluate run the "
                    "network at it, and --slice-pixel-mm resamples to it (default: that of --init, else "
                    f"{InferenceConfig.pixel_mm:g}; 0 = the slices' own grid)")
    p.add_argument("--bf16", choices=Bf16.values(), default=Bf16.AUTO.value,
                   help="bfloat16 autocast for training steps; auto (default) = on CUDA and on CPUs with native "
                        "bf16 (off reproduces float32 runs exactly)")
    add_workers(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and augmentation (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out that was stopped (from its resume.pt, written after every epoch "
                        "of a run with --workers 0 and removed when it ends), with the same data and options: it "
                        "ends with the weights it would have had without the stop; without a resume.pt, start anew")
    add_json_progress(p)
    add_common_options(p)


def parse_weights(text: str, option: str = "--source-weights", what: str = "WEIGHT",
                  low: float = 0.0, high: float = math.inf) -> tuple[tuple[str, float], ...]:
    """SOURCE=VALUE,... pairs with low <= VALUE <= high (finite)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = (t.strip() for t in item.partition("="))
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if not sep or not name or not (math.isfinite(w) and low <= w <= high):
            raise InputError(f"{option} wants SOURCE={what} pairs with {low:g} <= {what} <= {high:g}, got {item!r}")
        out.append((name, w))
    return tuple(out)


def _pair(text: str, option: str, low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        a = b = math.nan
    if not (low <= a <= high and low <= b <= high):
        raise InputError(f"{option} wants two numbers A,B between {low:g} and {high:g}, got {text!r}")
    return a, b


def augmentation(args: argparse.Namespace):
    """The AugmentConfig that --hard-negatives, --blur and --scale describe."""
    from ..training import AugmentConfig

    if not 0 <= args.hard_negatives < 1:
        raise InputError(f"--hard-negatives must lie in [0, 1), got {args.hard_negatives}")
    if not 0 <= args.ema < 1:
        raise InputError(f"--ema must lie in [0, 1), got {args.ema}")
    blur_p, blur_sigma = _pair(args.blur, "--blur", 0.0, 10.0)
    if blur_p > 1:
        raise InputError(f"--blur: the probability must be at most 1, got {blur_p:g}")
    low, high = _pair(args.scale, "--scale", 0.1, 10.0)
    if low > high:
        raise InputError(f"--scale: LOW must not exceed HIGH, got {args.scale!r}")
    return AugmentConfig(hard_negative_fraction=args.hard_negatives, blur_probability=blur_p,
                         blur_sigma=blur_sigma, scale=(low, high))


def cmd_train(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..config import ModelConfig, NetworkConfig, TrainConfig, to_dict
    from ..data import apply_split, fingerprint, load_split, read_dataset, resample_sample
    from ..training import can_resume, train, world_size

    if args.bn == BatchNormMode.FROZEN and not args.init:
        raise InputError("--bn frozen keeps the BatchNorm statistics of --init; a network trained from scratch has none")
    augment = augmentation(args)
    samples = [s for d in args.data for s in read_dataset(d)]
    split = load_split(args.split) if args.split else {}
    tr, val, test = apply_split(samples, split)
    if not tr:
        # Only a split can leave nothing: without one every slice trains (empty data fails earlier).
        raise InputError(f"no training slices: the split ({Path(args.split).name}) puts all {len(samples)} slices of the data "
                         f"in validation ({len(val)}) or test ({len(test)}); train on other data, or pass "
                         f"--split {SPLITS_DIR / 'all.json'} to train on every slice")
    check_pixel_mm(args.pixel_mm)
    init = load_checkpoint(args.init) if args.init else None
    # The model's config, with the working pixel it is trained at and that segment will apply.
    mcfg = init.config if init else ModelConfig(network=NetworkConfig(base_filters=args.base_filters,
                                                                      upsampling=args.upsampling))
    if args.pixel_mm is not None:
        mcfg = mcfg.with_pixel_mm(args.pixel_mm)
        if init:
            init = replace(init, config=mcfg)
    working = mcfg.inference.pixel_mm or None
    slice_mm = dict(parse_weights(args.slice_pixel_mm, "--slice-pixel-mm", "MM", *PIXEL_MM_RANGE))
    if slice_mm:
        # Slices of the named sources are taken as that pixel size and resampled to the
        # working pixel, the grid segment shows the network CT on (evaluate --slice-pixel-mm).
        strangers = sorted(set(slice_mm) - {s.source for s in samples})
        if strangers:
            raise InputError(f"--slice-pixel-mm names {strangers}, but the slices come from other sources")
        mm = lambda s: slice_mm.get(s.source)  # noqa: E731
        tr, val = ([resample_sample(s, (mm(s),) * 2, working) if mm(s) else s for s in part]
                   for part in (tr, val))
    log.info("training on %d slices, validating on %d, holding out %d", len(tr), len(val), len(test))
    cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                      crop=args.crop, lr=args.lr, lr_schedule=args.lr_schedule, loss=args.loss, seed=args.seed,
                      frozen_layers=args.frozen_layers, val_every=args.val_every,
                      source_weights=parse_weights(args.source_weights),
                      select_regions=args.select_regions, bf16=args.bf16,
                      workers=args.workers, bn=args.bn, ema_decay=args.ema)
    result = train(tr, val, args.out, cfg, mcfg, init=init, device=args.device,
                   fingerprint={"data": fingerprint(args.data), "split": Path(args.split).name if args.split else None,
                                **({"slice_pixel_mm": slice_mm, "pixel_mm": working} if slice_mm else {})},
                   augment=augment, progress=ProgressPrinter(json_lines=args.json_progress),
                   extra={"command": " ".join(sys.argv), "augment": to_dict(augment)},
                   resume_state=can_resume(cfg, world_size()), resume=args.resume)
    from ..atomic import atomic_write_bytes

    atomic_write_bytes(Path(args.out, "history.json"), json.dumps(result.history, indent=1).encode())
    if val:
        log.info("best validation Dice %.4f at epoch %d: %s", result.best_score, result.best_epoch, result.best_path)
    else:
        log.info("no validation slices: best.pt is the last epoch (%d): %s", result.best_epoch, result.best_path)
    return 0


COMMANDS = {"train": cmd_train}
