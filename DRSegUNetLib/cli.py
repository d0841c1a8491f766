"""``python -m DRSegUNetLib``: segment, train, evaluate, info, lungs, pseudolabel, selftrain, crossval (and more).

Errors the user can fix (bad input, bad checkpoint) print one line and exit 2;
nothing half-written is left at an output path.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__, default_model_path
from .config import PIXEL_MM_RANGE, InferenceConfig, check_pixel_mm
from .slices import VOLUME_SUFFIXES, _volume_name

log = logging.getLogger("DRSegUNetLib")

DEFAULT_SPLIT = Path(__file__).parent / "splits" / "default.json"


class ProgressPrinter:
    """Turns progress callbacks into a one-line bar on stderr when it is a terminal, plain lines on
    stderr when it is a file or a pipe (no carriage returns or terminal escapes; at most one line a
    second, plus each stage's last step and every epoch), or JSON lines on stdout."""

    line_open = False  # a bar is on stderr without its newline (an error message starts a new line)
    BAR_INTERVAL_S = 0.5
    LINE_INTERVAL_S = 1.0

    def __init__(self, json_lines: bool = False, quiet: bool = False) -> None:
        self.json_lines, self.quiet = json_lines, quiet
        self._last = 0.0

    @staticmethod
    def _terminal() -> bool:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):  # replaced or closed
            return False

    def __call__(self, stage: str, step: int, total: int, message: str = "", **info: Any) -> None:
        if self.json_lines:
            print(json.dumps({"stage": stage, "step": step, "total": total, "message": message, **info}), flush=True)
            return
        if self.quiet:
            return
        terminal = self._terminal()
        now = time.time()
        last = step >= total or stage == "epoch"
        if not last and now - self._last < (self.BAR_INTERVAL_S if terminal else self.LINE_INTERVAL_S):
            return
        self._last = now
        if not terminal:
            sys.stderr.write(f"{stage} {step}/{total}{' ' + message if message else ''}\n")
            sys.stderr.flush()
            return
        width = 30
        done = int(width * step / total) if total else width
        end = "\n" if last else ""
        sys.stderr.write(f"\r{stage:>8} [{'#' * done}{'.' * (width - done)}] {step}/{total} {message}\033[K{end}")
        sys.stderr.flush()
        ProgressPrinter.line_open = not end

    @staticmethod
    def end_line() -> None:
        if ProgressPrinter.line_open:
            sys.stderr.write("\n")
            ProgressPrinter.line_open = False


def _number(kind: type, low: float, open_low: bool = True):
    """An argparse type: a finite ``kind`` above ``low`` (or from ``low`` with ``open_low=False``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"want {'an integer' if kind is int else 'a number'} "
                                             f"{'>' if open_low else '>='} {low:g}, not {text!r}")
        return value
    return parse


_positive_int, _positive_float, _count = _number(int, 0), _number(float, 0.0), _number(int, 0, open_low=False)


def _add_training_budget(p: argparse.ArgumentParser, epochs: int) -> None:
    """Options shared by train and crossval: the budget, crops, optimiser and loss."""
    p.add_argument("--epochs", type=_positive_int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=50, help="optimiser steps per epoch (default 50)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="crops per step (default 8)")
    p.add_argument("--crop", type=_positive_int, default=128,
                   help="square crop size in pixels (native resolution; default 128)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant (default) or cosine decay over the run")
    p.add_argument("--loss", choices=("ce", "ce+dice", "ce+regiondice"), default="ce",
                   help="ce (default): marginal cross-entropy; ce+dice adds a soft Dice term per class "
                        "where the class is decided; ce+regiondice a soft Dice per region (GGO, "
                        "consolidation, infection, lung), which also sees lesions of open type")


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing augmented crops ahead of the step (default 0: in this process, "
                        "reproducible; use several on a GPU)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m DRSegUNetLib",
                                     description="DRSegUNet: segment COVID-19 lung infection (GGO, consolidation) and lungs on chest CT.")
    parser.add_argument("--version", action="version", version=f"DRSegUNetLib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment CT volumes",
                       description="Segment chest CT in HU (NIfTI, NRRD, MHA, a DICOM file or a DICOM series folder) and write a label map (0 background, 1 GGO, 2 consolidation, 3 lung) with the input's geometry. "
                                   "One volume: segment INPUT OUTPUT [--seg-nrrd P] [--report P] [--overlay P]. "
                                   "Many volumes with one model load: segment INPUT... --out-dir DIR (inputs may be files, folders of volumes, DICOM series folders, or --list FILE); finished outputs are skipped on a rerun, and --shard K/N splits the work across workers or GPUs.")
    p.add_argument("paths", nargs="*", metavar="INPUT [OUTPUT]",
                   help="one CT and its label-map path, or (with --out-dir) any number of inputs")
    p.add_argument("--model", default=None, help="checkpoint file or model-store version number (default: the store's "
                                              "active version; the bundled model until a fine-tune adds one)")
    p.add_argument("--store", default=None, help="model store folder for --model (default: the user's data folder, "
                                              "$DRSEGUNET_HOME when set)")
    p.add_argument("--seg-nrrd", default=None, help="also write a Slicer .seg.nrrd here (one volume)")
    p.add_argument("--report", default=None, help="also write a JSON report (volumes, %% of lung involved) (one volume)")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of the most involved slice (one volume)")
    p.add_argument("--out-dir", default=None, help="many volumes: write NAME.nii.gz (+ outputs of --outputs) here")
    p.add_argument("--list", default=None, help="many volumes: a text file with one input path per line")
    p.add_argument("--outputs", default="labels,report",
                   help="many volumes: comma list of labels, seg, report, overlay (default labels,report)")
    p.add_argument("--shard", default=None, help="many volumes: K/N processes every N-th input starting at K (0-based)")
    p.add_argument("--overwrite", action="store_true", help="many volumes: redo inputs whose outputs exist")
    _add_segment_options(p)
    _add_common(p)

    p = sub.add_parser("segment-stream", help="segment one CT into a shared label array, a JSON line per slice",
                       description="Segment INPUT slice by slice into LABELS, an existing .npy uint8 array shaped like "
                                   "the CT's (z, y, x) voxel array, printing one JSON line per finished slice. The "
                                   "Slicer module runs this in a separate process and fills the segments as the lines "
                                   "arrive; it cancels by ending the process (a slice is announced only once it is written).")
    p.add_argument("input", help="CT in HU (any format segment reads)")
    p.add_argument("labels", help="existing .npy uint8 array (z, y, x) the labels are written into")
    p.add_argument("--model", default=None, help="checkpoint file or model-store version number (default: the store's "
                                              "active version; the bundled model until a fine-tune adds one)")
    p.add_argument("--store", default=None, help="model store folder for --model (default: the user's data folder, "
                                              "$DRSEGUNET_HOME when set)")
    _add_segment_options(p)
    _add_common(p)

    p = sub.add_parser("train", help="train a model", description="Train DRSegUNet (Adam + marginal categorical cross-entropy) on annotated slices; writes best.pt (best validation Dice) and last.pt atomically.")
    p.add_argument("data", nargs="+", help="MedSeg-style folders (images/, masks/) and/or COVID-19-CT-Seg-style .npz files")
    p.add_argument("--out", required=True, help="output folder for checkpoints and history.json")
    p.add_argument("--split", default=str(DEFAULT_SPLIT),
                   help="JSON split file naming validation and test slices (default: the bundled "
                        "splits/default.json; \"\" = every slice trains)")
    p.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning / level 2)")
    _add_training_budget(p, epochs=40)
    p.add_argument("--frozen-layers", type=_count, default=0, help="freeze the first N layers (default 0; level 2: 2)")
    p.add_argument("--base-filters", type=int, default=16,
                   help="filters of the first layer, doubled at each level down (default 16: the thesis's network)")
    p.add_argument("--upsampling", choices=("transpose", "upsample"), default="transpose",
                   help="decoder: transposed convolutions (default transpose) or up-sampling and a convolution")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (default 1)")
    p.add_argument("--source-weights", default="", metavar="SRC=W,...",
                   help="relative frequency of crops per source, e.g. medseg=3,zenodo=1 (default: equal)")
    p.add_argument("--select-regions", default="", metavar="R,...",
                   help="regions whose mean validation Dice picks best.pt, e.g. ggo,lung (default: all)")
    p.add_argument("--slice-pixel-mm", default="", metavar="SRC=MM,...",
                   help="take the training and validation slices of these sources as MM pixels and resample them "
                        "to --pixel-mm, the grid segment runs the network on for CT, e.g. zenodo=1.5 (default: none)")
    p.add_argument("--pixel-mm", type=float, default=InferenceConfig.pixel_mm,
                   help=f"working pixel size for --slice-pixel-mm (default {InferenceConfig.pixel_mm:g})")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast for training steps; auto (default) = on CUDA and on CPUs with native "
                        "bf16 (off reproduces float32 runs exactly)")
    _add_workers(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and augmentation (default 0)")
    p.add_argument("--json-progress", action="store_true", help="print progress as JSON lines on stdout")
    _add_common(p)

    from .crossval import MODELS

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
    _add_training_budget(p, epochs=5)
    p.add_argument("--seed", type=int, default=0, help="seed of every model's training (default 0)")
    _add_workers(p)
    p.add_argument("--json-progress", action="store_true", help="print progress as JSON lines on stdout")
    # For tests and smoke runs only: every model at this width; the first N slices per source.
    p.add_argument("--base-filters", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--limit-slices", type=int, default=None, help=argparse.SUPPRESS)
    _add_common(p)

    p = sub.add_parser("evaluate", help="score a model (or saved label maps) on annotated slices",
                       description="Per-class Dice, IoU, precision, recall and F1 (mean over slices and pooled over pixels) of a model on a MedSeg-style folder or a COVID-19-CT-Seg-style .npz. "
                                   "With --predictions, score saved label maps instead of a model: an .npz with 'labels' (N, H, W) uint8 in our vocabulary (0 background, 1 GGO, 2 consolidation, 3 lung), one map per slice of DATA in the order DATA is read, "
                                   "such as the outputs of lungs, pseudolabel or selftrain (OUT/levelK/labels.npz) on DATA.")
    p.add_argument("data", help="MedSeg-style folder (images/*.jpg, masks/*.png) or .npz like zenodo20_dev.npz")
    p.add_argument("--model", default=None, help="checkpoint file or model-store version number (default: the store's "
                                              "active version; the bundled model until a fine-tune adds one)")
    p.add_argument("--store", default=None, help="model store folder for --model (default: the user's data folder, "
                                              "$DRSEGUNET_HOME when set)")
    p.add_argument("--predictions", default=None, help="score the label maps in this .npz instead of a model")
    p.add_argument("--by-group", action="store_true", help="also summarise per case group (the 'group' of the .npz)")
    p.add_argument("--regions", default=None,
                   help="comma list of regions to score (ggo, consolidation, infection, lung; default: all the data decides)")
    p.add_argument("--json", required=True, help="where to write the metrics JSON")
    p.add_argument("--decision", choices=("argmax", "threshold"), default="argmax",
                   help="argmax (default) or the thesis's 0.5-threshold refinement (§4.5)")
    _add_inference_options(p)
    p.add_argument("--split-part", choices=("all", "train", "val", "test"), default="all",
                   help="score only this part of --split (default all: every slice in DATA; the JSON and a note "
                        "on stderr say how many scored slices are in each part)")
    p.add_argument("--slice-pixel-mm", type=float, default=0.0,
                   help="pixel size in mm to assume for DATA's slices, which carry no geometry; the network then runs "
                        f"at --pixel-mm as segment does on CT (default 0: on the slices' own grid)")
    p.add_argument("--pixel-mm", type=float, default=InferenceConfig.pixel_mm,
                   help=f"working pixel size in mm with --slice-pixel-mm (default {InferenceConfig.pixel_mm:g})")
    p.add_argument("--threshold-averaged", action="store_true",
                   help="also write the Inf-Net-style Dice averaged over 256 probability thresholds per slice "
                        "(docs/crossval.md; needs --model, not --predictions; doubles the time)")
    p.add_argument("--split", default=str(DEFAULT_SPLIT),
                   help="split file that says which slices trained the model (train), validated it (val) or were "
                        "held out (test) (default: the bundled model's splits/default.json)")
    _add_common(p)

    from .config import SelfTrainConfig

    st = SelfTrainConfig()
    p = sub.add_parser("lungs", help="lung mask of a CT volume (thesis §4.4.1 steps 1-3)",
                       description="Extract the lungs of a CT volume in HU (NIfTI, NRRD, MHA, DICOM) and write a label map with the input's geometry (lung = --value, default 3, the vocabulary's lung label). "
                                   "INPUT may also be an .npz of 8-bit slices (ct_uint8, like zenodo20_dev.npz), mapped to approximate HU; OUTPUT is then an .npz with 'labels' (N, H, W) for evaluate --predictions.")
    p.add_argument("input", help="CT volume in HU, DICOM series folder, or .npz with ct_uint8")
    p.add_argument("output", help="label map (volume format, or .npz)")
    _add_lung_threshold(p, st)
    p.add_argument("--value", type=int, default=3, help="label value of lung pixels (default 3 = lung; 1 for a 0/1 mask)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    p = sub.add_parser("pseudolabel", help="k-means pseudo-labels of a CT volume (thesis §4.4.1)",
                       description="Lung extraction, k-means (K=3) on the lung-extracted image (--cluster-domain) and morphological clean-up: a label map 0 background, 1 GGO, 3 lung with the input's geometry. "
                                   "INPUT may also be an .npz of 8-bit slices (ct_uint8); OUTPUT is then an .npz with 'labels' (N, H, W) for evaluate --predictions.")
    p.add_argument("input", help="CT volume in HU, DICOM series folder, or .npz with ct_uint8")
    p.add_argument("output", help="label map (volume format, or .npz)")
    p.add_argument("--lung-mask", default=None, help="use this lung mask (nonzero = lung) of a volume instead of extracting one")
    _add_lung_threshold(p, st)
    _add_cluster_domain(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    p = sub.add_parser("selftrain", help="weakly supervised self-learning: pseudo-labels, level 1, level 2 (thesis §4.4)",
                       description="Recursive learning without annotations (thesis §4.4.2, §5.5): k-means pseudo-labels (OUT/level0); level 1 trained from scratch on them, then predicting labels for the inputs and --extra slices (OUT/level1); "
                                   "level 2 fine-tuned from level 1 with its first layers frozen at a lower learning rate on those labels (OUT/level2); and so on for --levels. "
                                   "Each level keeps best.pt, labels.npz and metrics.json; OUT/state.json lets a rerun skip finished levels (an interrupted level starts again).")
    p.add_argument("inputs", nargs="+", help="CT volumes in HU (files, folders, DICOM series folders) and/or .npz files of 8-bit slices (ct_uint8)")
    p.add_argument("--out", required=True, help="output folder (level0, level1, ..., state.json)")
    p.add_argument("--extra", nargs="*", default=[],
                   help="more unlabelled inputs, labelled first by level 1's predictions (default: none)")
    p.add_argument("--levels", "--rounds", dest="levels", type=int, default=st.levels,
                   help=f"trained levels: 1 from scratch, 2.. fine-tuned (default {st.levels})")
    p.add_argument("--level1-lr", type=float, default=st.level1_lr, help=f"default {st.level1_lr:g} (thesis §5.5)")
    p.add_argument("--level1-epochs", type=int, default=st.level1_epochs, help=f"default {st.level1_epochs} (thesis §5.5)")
    p.add_argument("--level2-lr", type=float, default=st.level2_lr, help=f"levels >= 2; default {st.level2_lr:g} (thesis §5.5)")
    p.add_argument("--level2-epochs", type=int, default=st.level2_epochs, help=f"levels >= 2; default {st.level2_epochs}")
    p.add_argument("--frozen-layers", type=int, default=st.frozen_layers, help=f"levels >= 2; default {st.frozen_layers} (stem conv1, bn1)")
    p.add_argument("--steps-per-epoch", type=int, default=st.steps_per_epoch,
                   help=f"optimiser steps per epoch (default {st.steps_per_epoch}: one pass over the training slices)")
    p.add_argument("--batch-size", type=int, default=st.batch_size, help=f"crops per step (default {st.batch_size})")
    p.add_argument("--crop", type=int, default=st.crop, help=f"square training crop in pixels (default {st.crop})")
    p.add_argument("--loss", choices=("ce", "ce+dice"), default=st.loss,
                   help=f"ce: marginal cross-entropy, ce+dice adds a soft Dice term (default {st.loss})")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=st.lr_schedule,
                   help="every level: constant (default, thesis) or cosine decay to 2%% of the level's rate")
    p.add_argument("--base-filters", type=int, default=st.base_filters,
                   help=f"network width (default {st.base_filters}; 16 = the thesis's network)")
    p.add_argument("--seed", type=int, default=st.seed, help=f"seed of k-means and of every level (default {st.seed})")
    p.add_argument("--threshold", choices=("auto", "thesis", "otsu"), default="auto",
                   help="lung threshold rule: auto (default) = Otsu per slice for 8-bit .npz slices, the thesis's fixed -170 HU for CT in HU; "
                        "thesis = fixed levels (--threshold-hu, --eight-bit-threshold-hu); otsu = Otsu per slice for every input")
    p.add_argument("--eight-bit-threshold-hu", type=float, default=st.eight_bit_lung_threshold_hu,
                   help=f"with --threshold thesis: lung threshold for 8-bit .npz slices in approx. HU (default {st.eight_bit_lung_threshold_hu:g})")
    p.add_argument("--threshold-hu", type=float, default=None, help="lung threshold for CT in HU (default -170, thesis; not with --threshold otsu)")
    _add_cluster_domain(p)
    p.add_argument("--json-progress", action="store_true", help="print progress as JSON lines on stdout")
    _add_common(p)

    from .cli_loop import add_parsers

    add_parsers(sub, _add_common, _positive_int, _positive_float, _count)

    p = sub.add_parser("export", help="make a small (fp16) copy of a checkpoint for bundling",
                       description="Copy a checkpoint with float16 weights (half the size), recording the code commit and test metrics given as JSON files.")
    p.add_argument("model", help="checkpoint to export (e.g. a training run's best.pt)")
    p.add_argument("output", help="where to write the exported checkpoint")
    p.add_argument("--test-metrics", nargs="*", default=[],
                   help="evaluate --json outputs of this checkpoint to record in it; each must name this checkpoint "
                        "(default: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    p = sub.add_parser("info", help="describe a checkpoint or list a model store's versions",
                       description="Print a checkpoint's config, classes, training data fingerprint and metrics as "
                                   "JSON; for a model-store folder, list its versions with the active one marked "
                                   "(as models list does).")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint, store version number, or model-store folder (default: the active version of the "
                        "store in the user's data folder, $DRSEGUNET_HOME when set; the bundled model until a "
                        "fine-tune adds one)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _name_defaults(parser)
    return parser


def _help_names_default(action: argparse.Action) -> bool:
    """Whether an option's help says its default: "default" and the value as a word (a path's file
    name will do; an empty default needs only the word). None and False defaults need nothing."""
    import re

    default, text = action.default, action.help or ""
    if default is None or default is False or default == argparse.SUPPRESS:
        return True
    if "default" not in text:
        return False
    if isinstance(default, (str, list, tuple)) and not default:
        return True
    values = {str(default)}
    if isinstance(default, float):
        values.add(f"{default:g}")
    if isinstance(default, str) and "/" in default:
        values.add(Path(default).name)
    return any(re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w-])", text) for v in values)


def _name_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default X)" to the help of every option of every command that does not say its
    default, and give -v/--verbose its help where it has none (options the correction-loop commands
    of cli_loop add)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _name_defaults(sub)
        elif action.option_strings and action.dest == "verbose" and not action.help:
            action.help = "log debug messages"
        elif action.option_strings and action.help and action.help != argparse.SUPPRESS \
                and not _help_names_default(action):
            action.help = f"{action.help} (default {action.default})"


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _check_writable_folder(out: Path) -> None:
    """OSError now, before any work, when ``out`` could not be written later: the nearest
    folder of its path that exists is a file or cannot be written to (writers make the
    missing folders below it)."""
    import errno
    import os

    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


# The first bytes of files that are sometimes renamed .nii or .nii.gz by mistake.
_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG picture"), (b"\x89PNG\r\n\x1a\n", "a PNG picture"), (b"GIF8", "a GIF picture"),
               (b"II*\x00", "a TIFF picture"), (b"MM\x00*", "a TIFF picture"), (b"BM", "a BMP picture"),
               (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"NRRD", "an NRRD image"))


def check_nifti_signature(path: str | Path) -> None:
    """InputError when a file named .nii or .nii.gz is not NIfTI at all (neither gzip nor a NIfTI
    header), saying what it looks like: the reader would call it truncated."""
    import struct

    from .errors import InputError

    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(132)
    if head[:2] == b"\x1f\x8b":
        return  # gzip: read_ct checks what it holds
    if len(head) >= 4 and {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} & {348, 540}:
        if name.endswith(".gz"):
            raise InputError(f"{path.name} is an uncompressed NIfTI file named .nii.gz; rename it to .nii")
        return
    if not head:
        raise InputError(f"{path.name} is empty (0 bytes); give a CT volume (NIfTI, NRRD, MHA or DICOM)")
    kind = "a DICOM file" if head[128:132] == b"DICM" else next((k for m, k in _SIGNATURES if head.startswith(m)), None)
    raise InputError(f"{path.name} is not a NIfTI file{f' but {kind}' if kind else ''} (it has neither a NIfTI "
                     "header nor gzip compression); give a CT volume (NIfTI, NRRD, MHA or DICOM) with its own "
                     "file extension")


def _read_ct(path: str | Path):
    """imageio.read_ct, after check_nifti_signature."""
    from .imageio import read_ct

    check_nifti_signature(path)
    return read_ct(path)


def _check_outputs(inputs: Sequence[Any], outputs: Sequence[Any], writable: bool = True) -> None:
    """InputError when an output path is an input (by any path to the same file) or another output;
    with ``writable``, OSError when an output's folder could not be written (_check_writable_folder)."""
    import os

    from .errors import InputError

    ins = [Path(p) for p in inputs if p]
    outs = [Path(p) for p in outputs if p]
    for i, out in enumerate(outs):
        if out.is_dir():  # found now, not after the other outputs were replaced
            raise InputError(f"output {out} is a folder; give a file name")
        if writable:
            _check_writable_folder(out)
        for inp in ins:
            if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
                raise InputError(f"output {out} is the input {inp}; write the output to another path")
        if any(out.resolve() == other.resolve() for other in outs[:i]):
            raise InputError(f"output {out} is given twice; give each output its own path")
    _remove_stale_temporaries(outs)


def _remove_stale_temporaries(outputs: Sequence[Path]) -> None:
    """Temporary files of these outputs that a killed run left (atomic.remove_stale_temporaries)."""
    from .atomic import remove_stale_temporaries

    for out in outputs:
        for stale in remove_stale_temporaries(out):
            log.info("removed %s, a temporary file of an interrupted run", stale)


@contextmanager
def _writing(final: Path | str, staged: Path):
    """Errors of a writer writing ``staged`` (the temporary file of output ``final``) as OSErrors that
    name ``final``: an OSError without a file name (a full disk) or naming the temporary file, and
    SimpleITK's RuntimeError (e.g. "fwrite wrote only ..." of the NRRD writer)."""
    import errno
    import os

    try:
        yield staged
    except OSError as e:
        if e.errno is None or e.filename not in (None, str(staged), os.fspath(staged)):
            raise
        raise type(e)(e.errno, e.strerror, str(final)) from None
    except RuntimeError as e:
        if "SimpleITK" not in str(e) and "ITK ERROR" not in str(e):
            raise
        lines = [ln.strip().removeprefix("[nrrd]").strip() for ln in str(e).splitlines() if ln.strip()]
        raise OSError(errno.EIO, f"could not be written: {lines[-1] if lines else 'ITK error'}; is the disk full?",
                      str(final)) from None


def _check_written_nifti(final: Path | str, staged: Path) -> None:
    """OSError naming ``final`` when the NIfTI file just written to ``staged`` is shorter than its
    header says: the NIfTI writer reports no error when the disk fills up."""
    import errno

    from .errors import InputError
    from .imageio import _check_nifti_complete

    try:
        _check_nifti_complete(staged)
    except InputError:
        raise OSError(errno.ENOSPC, "written incompletely (is the disk full?)", str(final)) from None


def _segment_one(predictor, input_path: str, labels_path: Path, seg_nrrd=None, report=None, overlay=None,
                 progress=None) -> list[str]:
    """Segment one CT and write its outputs all-or-nothing (a failure leaves every old file as it was)."""
    from .imageio import output_set, write_image

    image = _read_ct(input_path)
    uncertainty: list = []
    labels = predictor.predict(image, progress=progress, uncertainty=uncertainty)
    outputs = []
    with output_set() as stage:
        if seg_nrrd:
            from .segio import write_seg_nrrd

            with _writing(seg_nrrd, stage(seg_nrrd)) as tmp:
                write_seg_nrrd(labels, tmp)
            outputs.append(str(seg_nrrd))
        if report:
            from .report import add_uncertainty, compute_report, write_report

            rep = compute_report(labels, progress=progress)
            rep.update(input=str(input_path), model=str(predictor.source), inference=predictor.settings())
            add_uncertainty(rep, uncertainty)
            with _writing(report, stage(report)) as tmp:
                write_report(rep, tmp)
            outputs.append(str(report))
        if overlay:
            from .overlay import write_overlay

            with _writing(overlay, stage(overlay)) as tmp:
                index = write_overlay(image, labels, tmp)
            log.info("overlay %s shows axial slice %d of %d (0 = most inferior)", overlay, index,
                     _axial_slices(labels))
            outputs.append(str(overlay))
        # The label map last: its presence marks a finished input for reruns.
        with _writing(labels_path, stage(labels_path)) as tmp:
            write_image(labels, tmp)
            if str(labels_path).lower().endswith((".nii", ".nii.gz")):
                _check_written_nifti(labels_path, tmp)
        outputs.append(str(labels_path))
    return outputs


def _axial_slices(image) -> int:
    from .orientation import axial_shape

    return axial_shape(image.GetSize(), image.GetDirection())[0]


def _looks_like_dicom_series(folder: Path) -> bool:
    from .imageio import _is_dicom

    files = sorted(f for f in folder.iterdir() if f.is_file())
    return any(f.suffix.lower() == ".dcm" or _is_dicom(f) for f in files[:5])


def expand_inputs(paths: Sequence[str], list_file: Optional[str]) -> list[Path]:
    """Files stay; a folder of DICOM files is one input; other folders give their volume files.

    What a folder holds besides its volume files (sub-folders, DICOM series among them, and
    files of other types) is not segmented: a warning lists it and says why."""
    items = [Path(p) for p in paths]
    if list_file:
        items += [Path(line.strip()) for line in Path(list_file).read_text().splitlines() if line.strip() and not line.startswith("#")]
    out: list[Path] = []
    for p in items:
        if p.is_dir():
            if _looks_like_dicom_series(p):
                out.append(p)
                continue
            skipped = []
            for f in sorted(p.iterdir()):
                if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES):
                    out.append(f)
                elif f.is_dir():
                    skipped.append(f"{f.name}/ (a DICOM series folder: give it as an input of its own)"
                                   if _looks_like_dicom_series(f) else f"{f.name}/ (a folder: folders are not searched)")
                else:
                    skipped.append(f"{f.name} (not a volume file: {', '.join(VOLUME_SUFFIXES)})")
            if skipped:
                shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
                log.warning("skipped %d item(s) of %s: %s", len(skipped), p, shown)
        else:
            out.append(p)
    return out


def _add_segment_options(p: argparse.ArgumentParser) -> None:
    """The decision rule, batch and working pixel of segment and segment-stream (see _predictor)."""
    p.add_argument("--decision", choices=("argmax", "threshold"), default="argmax",
                   help="argmax (default) or the thesis's 0.5-threshold refinement (§4.5)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="slices per forward pass (default 4)")
    _add_inference_options(p)
    p.add_argument("--pixel-mm", type=float, default=InferenceConfig.pixel_mm,
                   help=f"working pixel size of the network in mm (default {InferenceConfig.pixel_mm:g}, about the "
                        "training slices'): slices are resampled to it and the labels come back on the CT's grid; "
                        "0 = the CT's own grid")


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """Options of the decision rule shared by segment and evaluate (see _predictor)."""
    p.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 on CPU: auto (default) = where the CPU has native bf16 (about 2x faster; a few "
                        "near-tie pixels may differ from float32)")
    p.add_argument("--flip-tta", action="store_true",
                   help="average the probabilities of each slice and its left-right mirror (twice the time)")


def _predictor(args: argparse.Namespace, batch_size: int):
    """The model of ``--model`` (a file or a store version; default: the store's active version)
    with the options of segment/evaluate."""
    from .cli_loop import model_store, resolve_model
    from .inference import Predictor

    path, version = resolve_model(model_store(args.store), args.model)
    if version is not None and not version.bundled and args.model is None:
        log.info("using the active model v%d of %s (python -m DRSegUNetLib models list)", version.version,
                 model_store(args.store).root)
    return Predictor.from_checkpoint(path, args.device, decision=args.decision,
                                     batch_size=batch_size, cpu_bf16=args.cpu_bf16, flip_tta=args.flip_tta,
                                     pixel_mm=args.pixel_mm or None)


def cmd_segment(args: argparse.Namespace) -> int:
    from .errors import CheckpointError, InputError
    from .imageio import check_volume_output

    check_pixel_mm(args.pixel_mm)
    if args.out_dir is None:
        if len(args.paths) != 2 or args.list or args.shard:
            raise InputError("give INPUT OUTPUT, or inputs with --out-dir DIR for many volumes")
        check_volume_output(args.paths[1])
        _check_outputs(args.paths[:1], [args.paths[1], args.seg_nrrd, args.report, args.overlay])
        predictor = _predictor(args, args.batch_size)
        written = _segment_one(predictor, args.paths[0], Path(args.paths[1]), args.seg_nrrd, args.report,
                               args.overlay, progress=ProgressPrinter())
        log.info("wrote %s", ", ".join(written))
        return 0

    if args.seg_nrrd or args.report or args.overlay:
        raise InputError("with --out-dir, choose extra outputs with --outputs, not --seg-nrrd/--report/--overlay")
    wanted = {w.strip() for w in args.outputs.split(",") if w.strip()}
    unknown = wanted - {"labels", "seg", "report", "overlay"}
    if unknown:
        raise InputError(f"unknown --outputs {sorted(unknown)}; choose from labels, seg, report, overlay")
    inputs = expand_inputs(args.paths, args.list)
    if not inputs:
        raise InputError("no inputs found")
    names = [_volume_name(p) for p in inputs]
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
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder (it is created if missing)")

    def targets(name: str) -> dict[str, Optional[Path]]:
        return {"labels": out_dir / f"{name}.nii.gz",
                "seg": out_dir / f"{name}.seg.nrrd" if "seg" in wanted else None,
                "report": out_dir / f"{name}.json" if "report" in wanted else None,
                "overlay": out_dir / f"{name}.png" if "overlay" in wanted else None}

    for p, nm in zip(inputs, names):
        _check_outputs([p], list(targets(nm).values()), writable=False)
    todo = [(p, nm) for p, nm in zip(inputs, names)
            if args.overwrite or not all(t.exists() for t in targets(nm).values() if t is not None)]
    log.info("%d input(s), %d already done, %d to segment", len(inputs), len(inputs) - len(todo), len(todo))
    if not todo:
        return 0
    _check_writable_folder(targets(todo[0][1])["labels"])  # only when there is something to write
    predictor = _predictor(args, args.batch_size)
    failed = []
    printer = ProgressPrinter()
    for i, (path, name) in enumerate(todo, 1):
        t = targets(name)
        try:
            _segment_one(predictor, str(path), t["labels"], t["seg"], t["report"], t["overlay"])
        except (InputError, CheckpointError) as e:
            failed.append(f"{path}: {e}")
            log.error("%s: %s", path, e)
        printer("volumes", i, len(todo), name)
    if failed:
        print(f"error: {len(failed)} of {len(todo)} input(s) failed; first: {failed[0]}", file=sys.stderr)
        return 2
    return 0


def _parse_weights(text: str, option: str = "--source-weights", what: str = "WEIGHT",
                   low: float = 0.0, high: float = math.inf) -> tuple[tuple[str, float], ...]:
    """SOURCE=VALUE,... pairs with low <= VALUE <= high (finite)."""
    from .errors import InputError

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


def _parse_regions(text: str) -> tuple[str, ...]:
    from .errors import InputError
    from .vocabulary import REGIONS

    names = tuple(filter(None, (t.strip() for t in text.split(","))))
    bad = [n for n in names if n not in REGIONS]
    if bad:
        raise InputError(f"--select-regions: unknown region(s) {', '.join(bad)}; known: {', '.join(REGIONS)}")
    return names


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import ModelConfig, NetworkConfig, TrainConfig
    from .data import apply_split, fingerprint, load_split, read_dataset, resample_sample
    from .errors import InputError
    from .training import train

    samples = [s for d in args.data for s in read_dataset(d)]
    split = load_split(args.split) if args.split else {}
    tr, val, test = apply_split(samples, split)
    if not tr:
        # Only a split can leave nothing: without one every slice trains (empty data fails earlier).
        raise InputError(f"no training slices: the split ({Path(args.split).name}) puts all {len(samples)} slices of the data "
                         f"in validation ({len(val)}) or test ({len(test)}); train on other data, or pass "
                         f"--split {Path(__file__).parent / 'splits' / 'all.json'} to train on every slice")
    slice_mm = dict(_parse_weights(args.slice_pixel_mm, "--slice-pixel-mm", "MM", *PIXEL_MM_RANGE))
    if slice_mm:
        # Slices of the named sources are taken as that pixel size and resampled to the
        # working pixel, the grid segment shows the network CT on (evaluate --slice-pixel-mm).
        check_pixel_mm(args.pixel_mm)
        strangers = sorted(set(slice_mm) - {s.source for s in samples})
        if strangers:
            raise InputError(f"--slice-pixel-mm names {strangers}, but the slices come from other sources")
        mm = lambda s: slice_mm.get(s.source)  # noqa: E731
        tr, val = ([resample_sample(s, (mm(s),) * 2, args.pixel_mm or None) if mm(s) else s for s in part]
                   for part in (tr, val))
    log.info("training on %d slices, validating on %d, holding out %d", len(tr), len(val), len(test))
    cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                      crop=args.crop, lr=args.lr, lr_schedule=args.lr_schedule, loss=args.loss, seed=args.seed,
                      frozen_layers=args.frozen_layers, val_every=args.val_every,
                      source_weights=_parse_weights(args.source_weights),
                      select_regions=_parse_regions(args.select_regions), bf16=args.bf16,
                      workers=args.workers)
    init = load_checkpoint(args.init) if args.init else None
    mcfg = ModelConfig(network=NetworkConfig(base_filters=args.base_filters, upsampling=args.upsampling))
    result = train(tr, val, args.out, cfg, mcfg, init=init, device=args.device,
                   fingerprint={"data": fingerprint(args.data), "split": Path(args.split).name if args.split else None,
                                **({"slice_pixel_mm": slice_mm, "pixel_mm": args.pixel_mm or None} if slice_mm else {})},
                   progress=ProgressPrinter(json_lines=args.json_progress),
                   extra={"command": " ".join(sys.argv)})
    from .atomic import atomic_write_bytes

    atomic_write_bytes(Path(args.out, "history.json"), json.dumps(result.history, indent=1).encode())
    if val:
        log.info("best validation Dice %.4f at epoch %d: %s", result.best_score, result.best_epoch, result.best_path)
    else:
        log.info("no validation slices: best.pt is the last epoch (%d): %s", result.best_epoch, result.best_path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .atomic import atomic_write_bytes
    from .data import apply_split, load_split, read_dataset
    from .errors import InputError
    from .labelmaps import labels_for_dataset
    from .metrics import GroupedMetrics, ThresholdAveragedAccumulator
    from .vocabulary import REGIONS

    _check_outputs([args.data, args.predictions, args.model, args.split], [args.json])
    regions = tuple(REGIONS)
    if args.regions:
        regions = tuple(r.strip() for r in args.regions.split(",") if r.strip())
        unknown = sorted(set(regions) - set(REGIONS))
        if unknown or not regions:
            raise InputError(f"unknown --regions {unknown}; choose from {', '.join(REGIONS)}")
    if args.predictions:
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
        score = lambda s: (preds[id(s)], None)  # noqa: E731
    else:
        check_pixel_mm(args.pixel_mm)
        check_pixel_mm(args.slice_pixel_mm, "--slice-pixel-mm")
        spacing = (args.slice_pixel_mm,) * 2 if args.slice_pixel_mm else None
        predictor = _predictor(args, 1)
        samples = read_dataset(args.data, predictor.config.eight_bit)

        def score(s):  # labels and, once, the probabilities behind them
            labels, prob = predictor.labels(s.hu[None], spacing, eight_bit=s.eight_bit)
            return labels[0], prob[0]
    parts = dict(zip(("train", "val", "test"), apply_split(samples, load_split(args.split) if args.split else {})))
    if args.split_part != "all":
        samples = parts[args.split_part]
    scored = {id(s) for s in samples}
    checkpoint = None if args.predictions else predictor.checkpoint
    split = {"file": Path(args.split).name if args.split else None,
             "model_trained_with": ((checkpoint.fingerprint or {}).get("split") if checkpoint is not None else None),
             **{part: sum(id(s) in scored for s in members) for part, members in parts.items()}}
    _split_note(args, split, len(samples))
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
    model = None if args.predictions else predictor.source
    out = {"data": str(args.data), "model": model, "model_sha256": _file_sha256(model) if model else None,
           "decision": None if args.predictions else args.decision,
           "bf16": None if args.predictions else predictor.uses_bf16,
           "flip_tta": None if args.predictions else predictor.inference.flip_tta,
           "slice_pixel_mm": None if args.predictions else (args.slice_pixel_mm or None),
           "pixel_mm": None if args.predictions or not args.slice_pixel_mm else predictor.inference.pixel_mm,
           "n_slices": len(samples), "split_part": args.split_part,
           # how many scored slices the split puts in each part: "train" ones taught the model
           "split": split, "n_slices_in_training_part": split["train"], "metrics": summary}
    if args.predictions:
        out["predictions"] = str(args.predictions)
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


def _file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _split_note(args: argparse.Namespace, split: dict, n: int) -> None:
    """One line on stderr: how many of the ``n`` slices to be scored trained the model under the split."""
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


def cmd_crossval(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .crossval import FOLDS_PATH, run_crossval
    from .errors import InputError

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


def _add_cluster_domain(p: argparse.ArgumentParser) -> None:
    from .config import PseudoLabelConfig

    p.add_argument("--cluster-domain", choices=("image", "lung"), default=PseudoLabelConfig.cluster_domain,
                   help="what k-means (K=3) clusters: image (default, thesis step 5) = the lung-extracted image with "
                        "air outside the lung; lung = the lung pixels only (the brightest third: mostly vessels)")


def _add_lung_threshold(p: argparse.ArgumentParser, st) -> None:
    p.add_argument("--threshold", choices=("auto", "thesis", "otsu"), default="auto",
                   help="air/tissue threshold rule (lungs.py): auto (default) = otsu for 8-bit .npz slices, thesis for CT in HU; "
                        f"thesis = a fixed level, -170 HU for CT in HU as in the thesis ({st.eight_bit_lung_threshold_hu:g} approx. HU for 8-bit slices), or --threshold-hu; "
                        "otsu = Otsu's level of each slice after Gaussian smoothing (for intensities that are not calibrated HU)")
    p.add_argument("--threshold-hu", type=float, default=None,
                   help="a fixed air/tissue level in (approx.) HU for every input; implies --threshold thesis")


def _read_for_labels(path: str, threshold_hu: Optional[float], method: str = "auto",
                     output: Optional[str] = None, other_inputs: Sequence[Optional[str]] = ()):
    """(SliceInput, LungConfig) of a CT volume in HU or an .npz of 8-bit slices, after checking
    that ``output`` is a label-map path _write_labels can write for it (without overwriting an input)."""
    from .errors import InputError
    from .imageio import check_volume_output
    from .slices import read_slices
    from .weak import lung_config_for

    if output is not None:
        check_volume_output(output, npz=True)
        _check_outputs([path, *other_inputs], [output])
        if Path(path).suffix.lower() == ".npz" and not output.lower().endswith(".npz"):
            raise InputError(f"{path} holds 8-bit slices without CT geometry: write an .npz, not {Path(output).name}")
        if Path(path).suffix.lower() != ".npz" and output.lower().endswith(".npz"):
            raise InputError(f"{path} is a CT volume: write a volume (.nii.gz, .nrrd, .mha), which keeps its "
                             f"geometry, not {Path(output).name}")
    check_nifti_signature(path)
    inp = read_slices(path)
    return inp, lung_config_for(inp, threshold_hu=threshold_hu, method=method)


def _threshold_text(cfg) -> str:
    if cfg.threshold_method == "otsu":
        return f"Otsu per slice, sigma {cfg.otsu_sigma_px:g} px"
    return f"{cfg.threshold_hu:g} HU"


def _write_labels(inp, labels, output: str) -> None:
    """Write (n, H, W) labels in the axial display frame: .npz, or a volume with the input's geometry."""
    import numpy as np
    import SimpleITK as sitk

    from .imageio import output_set, write_image
    from .labelmaps import save_label_maps
    from .orientation import axial_view

    if output.lower().endswith(".npz"):
        save_label_maps(output, [inp.path], [labels])
        return
    _, inverse = axial_view(sitk.GetArrayViewFromImage(inp.image), inp.image.GetDirection())
    image = sitk.GetImageFromArray(np.ascontiguousarray(inverse(labels.astype(np.uint8))))
    image.CopyInformation(inp.image)
    with output_set() as stage, _writing(output, stage(output)) as tmp:
        write_image(image, tmp)
        if output.lower().endswith((".nii", ".nii.gz")):
            _check_written_nifti(output, tmp)


def _require_lung(inp, lungs, where: str) -> None:
    """InputError when an input has no lung at all (slices above or below the lungs may have none)."""
    from .errors import InputError

    if lungs.any():
        return
    h, w = inp.hu.shape[1:]
    hint = (f"its axial slices are {h}x{w} px: is it a coronal or sagittal image?" if min(h, w) < 16
            else "is it a chest CT in HU?")
    raise InputError(f"no lung found in {inp.path} ({len(inp)} axial slice(s), {where}); {hint}")


def cmd_lungs(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .weak import lung_masks

    if not 0 < args.value < 256:
        raise InputError(f"--value must be 1..255, not {args.value}")
    inp, cfg = _read_for_labels(args.input, args.threshold_hu, args.threshold, args.output)
    masks = lung_masks(inp, cfg, progress=ProgressPrinter())
    threshold = _threshold_text(cfg)
    _require_lung(inp, masks, f"threshold: {threshold}")
    _write_labels(inp, masks.astype("uint8") * args.value, args.output)
    log.info("lungs in %d of %d slices (threshold: %s): wrote %s", int(masks.any(axis=(1, 2)).sum()), len(inp),
             threshold, args.output)
    return 0


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    import numpy as np

    from .config import PseudoLabelConfig
    from .errors import InputError
    from .weak import lung_masks, pseudo_labels

    printer = ProgressPrinter()
    inp, cfg = _read_for_labels(args.input, args.threshold_hu, args.threshold, args.output, [args.lung_mask])
    if args.lung_mask:
        from .imageio import mask_on_grid
        from .orientation import axial_view

        if inp.image is None:
            raise InputError("--lung-mask works with CT volumes, not with 8-bit .npz slices")
        mask = mask_on_grid(_read_ct(args.lung_mask), inp.image, f"lung mask {args.lung_mask}")
        view, _ = axial_view(mask, inp.image.GetDirection())
        lungs = np.ascontiguousarray(view) != 0
        _require_lung(inp, lungs, f"the lung mask {args.lung_mask} is empty")
    else:
        lungs = lung_masks(inp, cfg, progress=printer)
        _require_lung(inp, lungs, f"threshold: {_threshold_text(cfg)}")
    labels = pseudo_labels(inp, lungs, PseudoLabelConfig(cluster_domain=args.cluster_domain), progress=printer)
    _write_labels(inp, labels, args.output)
    log.info("pseudo-labels: %d GGO and %d lung pixels in %d slices: wrote %s", int((labels == 1).sum()),
             int((labels == 3).sum()), len(inp), args.output)
    return 0


def cmd_selftrain(args: argparse.Namespace) -> int:
    from .config import LungConfig, PseudoLabelConfig, SelfTrainConfig
    from .errors import InputError
    from .selftrain import run_selftrain

    inputs = expand_inputs(args.inputs, None)
    extras = expand_inputs(args.extra, None) if args.extra else []
    if not inputs:
        raise InputError("no inputs found")
    cfg = SelfTrainConfig(levels=args.levels, level1_lr=args.level1_lr, level1_epochs=args.level1_epochs,
                          level2_lr=args.level2_lr, level2_epochs=args.level2_epochs, frozen_layers=args.frozen_layers,
                          steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, crop=args.crop,
                          loss=args.loss, seed=args.seed, base_filters=args.base_filters,
                          lr_schedule=args.lr_schedule, eight_bit_lung_threshold_hu=args.eight_bit_threshold_hu)
    if args.threshold == "otsu" and args.threshold_hu is not None:
        raise InputError("--threshold-hu is a fixed level: not with --threshold otsu")
    try:
        lung = LungConfig(threshold_method=args.threshold)
        if args.threshold_hu is not None:
            lung = LungConfig(threshold_method=args.threshold, threshold_hu=args.threshold_hu)
    except ValueError as e:  # e.g. a threshold outside [air, bone]
        raise InputError(str(e)) from None
    printer = ProgressPrinter(json_lines=args.json_progress)
    t0 = time.time()
    result = run_selftrain(inputs, args.out, cfg, extras=extras, lung=lung,
                           pseudo=PseudoLabelConfig(cluster_domain=args.cluster_domain), device=args.device,
                           progress=printer)
    printer("done", 1, 1, f"{len(result.checkpoints)} level(s) in {args.out} ({time.time() - t0:.0f} s; "
                          f"skipped as finished: {', '.join(result.skipped) or 'none'})",
            checkpoints=[str(p) for p in result.checkpoints])
    return 0


def _loop_command(name: str):
    def run(args: argparse.Namespace) -> int:
        from . import cli_loop

        printer = ProgressPrinter(json_lines=getattr(args, "json_progress", False))
        if name == "corrections" and args.action == "add":
            check_nifti_signature(args.ct)
            check_nifti_signature(args.labels)
        return getattr(cli_loop, f"cmd_{name}")(args, printer)
    return run


def cmd_segment_stream(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import InputError

    check_pixel_mm(args.pixel_mm)
    image = _read_ct(args.input)
    shape = tuple(image.GetSize()[::-1])
    try:
        labels = np.load(args.labels, mmap_mode="r+")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot open {args.labels} as a .npy array ({e})") from None
    if labels.dtype != np.uint8 or labels.shape != shape:
        raise InputError(f"{args.labels} is {labels.dtype} {labels.shape}; the CT needs uint8 {shape}")
    predictor = _predictor(args, args.batch_size)
    printer = ProgressPrinter(json_lines=True)
    printer("loaded", 0, 0, "model loaded", settings=predictor.settings())
    done = 0
    for result in predictor.iter_slices(image):
        result.place(labels)
        labels.flush()  # on disk (the shared page cache) before the line that announces it
        done += 1
        printer("slice", done, result.total, index=result.index, uncertainty=round(float(result.uncertainty or 0.0), 5))
    printer("done", done, done, "segmented")
    return 0


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _metrics_of(path: str, model: str) -> dict:
    """An ``evaluate --json`` output that scored the checkpoint ``model``; InputError otherwise.

    evaluate records the checkpoint's sha256 (and its path); a file without the sha256 (written
    before evaluate recorded it) must name ``model`` by its path."""
    from .errors import InputError

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"--test-metrics {path} is not JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("metrics"), dict) or "data" not in d:
        raise InputError(f"--test-metrics {path} is not an evaluate --json output")
    if d.get("predictions"):
        raise InputError(f"--test-metrics {path} scores saved label maps ({d['predictions']}), "
                         f"not the checkpoint {model}")
    if not d.get("model"):
        raise InputError(f"--test-metrics {path} names no model; run evaluate --model {model} and record its JSON")
    named = str(d["model"])
    if d.get("model_sha256"):
        same = d["model_sha256"] == _file_sha256(model)
    else:
        try:
            same = Path(named).samefile(model)
        except OSError:
            same = False
    if not same:
        raise InputError(f"--test-metrics {path} holds metrics of {named}, not of {model}: run evaluate "
                         f"--model {model} and record its JSON")
    return d


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, save_checkpoint

    _check_outputs([args.model, *args.test_metrics], [args.output])
    ckpt = load_checkpoint(args.model)
    metrics = [_metrics_of(path, args.model) for path in args.test_metrics]  # all checked before anything is written
    ckpt.state_dict = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt.state_dict.items()}
    ckpt.extra = {**ckpt.extra, "exported_from": str(args.model), "export_commit": _git_commit()}
    for d in metrics:
        ckpt.metrics.setdefault("test", {})[Path(d["data"]).name] = {
            r: {"dice_mean": m["mean"]["dice"], "dice_pooled": (m["pooled"] or {}).get("dice"), "n_slices": m["n_slices"]}
            for r, m in d["metrics"].items()}
    save_checkpoint(ckpt, args.output)
    log.info("wrote %s (%.1f MB)", args.output, Path(args.output).stat().st_size / 1e6)
    return 0


def _model_store_folder(folder: Path) -> Optional[Path]:
    """``folder`` if it is a model store (version folders or an active pointer), its ``models``
    subfolder if that is one (the user's data folder), else None."""
    from .store import _VERSION_DIR, ModelStore

    for root in (folder, folder / "models"):
        if root.is_dir() and ((root / ModelStore.ACTIVE).exists()
                              or any(_VERSION_DIR.match(d.name) and (d / ModelStore.CHECKPOINT).is_file()
                                     for d in root.iterdir())):
            return root
    return None


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .errors import InputError
    from .network import keras_parameter_count

    if args.model and Path(args.model).is_dir():
        store = _model_store_folder(Path(args.model))
        if store is None:
            raise InputError(f"{args.model} is a folder but not a model store (no version folders v0002, ... "
                             "and no active.json); give a checkpoint file or a model-store folder")
        from . import cli_loop

        return cli_loop.cmd_models(argparse.Namespace(action="list", store=str(store)), None)
    from .cli_loop import model_store, resolve_model

    store = model_store(None)
    path, _ = resolve_model(store, args.model)  # a file, a version number, or the store's active version
    ckpt = load_checkpoint(path)
    info = {"path": str(path),
            "store": {"root": str(store.root), "active": store.active().version,
                      "versions": [v.version for v in store.versions()]},
            "config": ckpt.config.to_dict(), "class_names": list(ckpt.class_names),
            "parameters_keras": keras_parameter_count(ckpt.build_model()), "fingerprint": ckpt.fingerprint,
            "metrics": ckpt.metrics, "code_version": ckpt.code_version,
            "extra": {k: v for k, v in ckpt.extra.items() if k != "history"}}
    print(json.dumps(info, indent=1))
    return 0


COMMANDS = {"segment": cmd_segment, "segment-stream": cmd_segment_stream, "train": cmd_train, "evaluate": cmd_evaluate, "finetune": _loop_command("finetune"), "corrections": _loop_command("corrections"),
            "models": _loop_command("models"),
            "export": cmd_export, "info": cmd_info, "lungs": cmd_lungs, "pseudolabel": cmd_pseudolabel,
            "selftrain": cmd_selftrain, "crossval": cmd_crossval}


def _stdout_closed_by_reader(error: BrokenPipeError) -> bool:
    """Whether a BrokenPipeError is stdout's: a pipe (``info | head -1``) whose reader has gone."""
    import os
    import stat

    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return error.filename is None and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))


def _drop_stdout() -> None:
    """Point stdout (and stderr when it is the same pipe) at /dev/null, so that nothing more is written
    to the closed pipe, not even by Python's flush at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        try:
            same = os.path.sameopenfile(sys.stdout.fileno(), sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            same = False
        os.dup2(devnull, sys.stdout.fileno())
        if same:
            os.dup2(devnull, sys.stderr.fileno())
    finally:
        os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; exit 2 with one line on stderr for what the user can fix: bad input, a bad
    checkpoint, a torch older than ``DRSegUNetLib.MIN_TORCH``, and OSErrors (a missing file, a folder that cannot be written, a full disk), each
    naming the path."""
    from .errors import Cancelled, CheckpointError, InputError, TorchVersionError

    try:
        parser = build_parser()  # the finetune and corrections parsers import the modules that need torch
    except TorchVersionError as e:  # a torch older than MIN_TORCH: one line, as for bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup(args)
    try:
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is seen below
        return code
    except (InputError, CheckpointError, TorchVersionError) as e:
        ProgressPrinter.end_line()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if not _stdout_closed_by_reader(e):
            return _os_error(args, e)
        _drop_stdout()  # the reader has what it wanted (e.g. `info | head -1`): not an error
        return 0
    except OSError as e:  # a folder that cannot be written, a path that is a file, a missing file, a full disk
        return _os_error(args, e)
    except Cancelled:
        ProgressPrinter.end_line()
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        ProgressPrinter.end_line()
        print("interrupted", file=sys.stderr)
        return 130


def _os_error(args: argparse.Namespace, e: OSError) -> int:
    if getattr(args, "verbose", False):
        raise e
    ProgressPrinter.end_line()
    what = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    print(f"error: {what} ({e.strerror})" if what and e.strerror else f"error: {e.strerror or e}", file=sys.stderr)
    return 2
