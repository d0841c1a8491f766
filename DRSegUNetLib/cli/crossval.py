"""``crossval``: 5-fold cross-validation of DRSegUNet and baselines (docs/crossval.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from .common import (ProgressPrinter, add_common_options, add_json_progress, add_training_budget, add_workers)


def add_parsers(sub) -> None:
    from ..crossval import MODELS

    p = sub.add_parser("crossval", help="5-fold cross-validation of DRSegUNet and baselines (docs/crossval.md)",
                       description="Train each model on 4 folds and score it on the 5th, for every fold of DRSegUNetLib/splits/folds.json (MedSeg slices by a seeded permutation, COVID-19-CT-Seg by CT volume). "
                                   "Every model gets the same fixed budget and no validation set: the last step's network is scored (nothing is selected on the test fold), with argmax labels (as evaluate) and the threshold-averaged Dice of the probabilities. "
                                   "Writes OUT/<model>/fold<k>/{last.pt,result.json} (a rerun skips folds whose result.json exists) and the tables OUT/summary.md and OUT/summary.json.")
    p.add_argument("medseg", metavar="MEDSEG_DIR", help="MedSeg train50 folder (images/, masks/)")
    p.add_argument("zenodo", metavar="ZENODO_NPZ", help="COVID-19-CT-Seg .npz (zenodo20_dev.npz)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list of models (default {','.join(MODELS)}: all)")
    p.add_argument("--folds", default="0,1,2,3,4", help="comma list of folds to run (default 0,1,2,3,4)")
    p.add_argument("--folds-file", default=None, help="folds JSON (default: the bundled splits/folds.json)")
    add_training_budget(p, epochs=5)
    p.add_argument("--seed", type=int, default=0, help="seed of every model's training (default 0)")
    add_workers(p)
    add_json_progress(p)
    # For tests and smoke runs only: every model at this width; the first N slices per source.
    p.add_argument("--base-filters", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--limit-slices", type=int, default=None, help=argparse.SUPPRESS)
    add_common_options(p)


def cmd_crossval(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from ..crossval import FOLDS_PATH, run_crossval

    try:
        folds = [int(f) for f in args.folds.split(",") if f.strip()]
    except ValueError:
        raise InputError(f"--folds wants a comma list of fold numbers, not {args.folds!r}") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                      crop=args.crop, lr=args.lr, lr_schedule=args.lr_schedule, loss=args.loss, seed=args.seed,
                      workers=args.workers)
    out = run_crossval(args.medseg, args.zenodo, args.out, models, folds, cfg, device=args.device,
                       folds_path=args.folds_file or FOLDS_PATH, base_filters=args.base_filters,
                       limit_slices=args.limit_slices, progress=ProgressPrinter(json_lines=args.json_progress))
    ProgressPrinter.end_line()
    if args.json_progress:
        print(json.dumps({"stage": "done", "summary": str(Path(args.out, "summary.json"))}), flush=True)
    else:
        print(out["markdown"])
    return 0


COMMANDS = {"crossval": cmd_crossval}
