"""What the command families share: the progress printer, argparse number types, the options
several commands take (declared here once), and the model a ``--model`` names.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .. import PACKAGE_DIR, default_model_path
from ..config import Bf16, Decision, InferenceConfig, Loss, LrSchedule
from ..errors import InputError

log = logging.getLogger("DRSegUNetLib")

SPLITS_DIR = PACKAGE_DIR / "splits"
DEFAULT_SPLIT = SPLITS_DIR / "default.json"


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


# ---------------------------------------------------------------- argparse types
def number_type(kind: type, low: float, open_low: bool = True):
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


positive_int, positive_float, count = number_type(int, 0), number_type(float, 0.0), number_type(int, 0, open_low=False)


def region_list(text: str) -> tuple[str, ...]:
    """An argparse type: a comma list of region names (vocabulary.REGIONS), in order, once each."""
    from ..vocabulary import REGIONS

    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in REGIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"want a comma list of {', '.join(REGIONS)}, not {text!r}")
    return names


# ---------------------------------------------------------------- options of several commands
def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """--device, --threads and --verbose: every command that runs a network."""
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_verbose(p)


def add_json_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json-progress", action="store_true", help="print progress as JSON lines on stdout")


def add_store_option(p: argparse.ArgumentParser, name: str, what: str) -> None:
    """``--NAME``: a store folder in the user's data folder by default."""
    p.add_argument(f"--{name}", default=None,
                   help=f"{what} folder (default: the user's data folder, $DRSEGUNET_HOME when set)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and --store of the commands that apply a model (see :func:`load_predictor`)."""
    p.add_argument("--model", default=None, help="checkpoint file or model-store version number (default: the store's "
                                              "active version; the bundled model until a fine-tune adds one)")
    p.add_argument("--store", default=None, help="model store folder for --model (default: the user's data folder, "
                                              "$DRSEGUNET_HOME when set)")


def add_pixel_mm(p: argparse.ArgumentParser, help_text: str) -> None:
    """--pixel-mm: the working pixel size the network runs at; default None, the model's own
    (``ModelConfig.inference.pixel_mm``); 0 the slices' own grid."""
    p.add_argument("--pixel-mm", type=float, default=None, help=help_text)


def add_decision(p: argparse.ArgumentParser) -> None:
    """--decision: default None, the model's own rule (``ModelConfig.inference.decision``)."""
    p.add_argument("--decision", choices=Decision.values(), default=None,
                   help="argmax or the thesis's 0.5-threshold refinement (§4.5) (default: the model's rule, "
                        f"{InferenceConfig.decision} for models that do not say)")


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """Options of the decision rule shared by segment and evaluate (see :func:`load_predictor`)."""
    p.add_argument("--cpu-bf16", choices=Bf16.values(), default=Bf16.AUTO.value,
                   help="bfloat16 on CPU: auto (default) = where the CPU has native bf16 (about 2x faster; a few "
                        "near-tie pixels may differ from float32)")
    p.add_argument("--flip-tta", action="store_true",
                   help="average the probabilities of each slice and its left-right mirror (twice the time)")


def add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing augmented crops ahead of the step (default 0: in this process, "
                        "reproducible; use several on a GPU)")


def add_training_budget(p: argparse.ArgumentParser, epochs: int) -> None:
    """Options shared by train and crossval: the budget, crops, optimiser and loss."""
    p.add_argument("--epochs", type=positive_int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--steps-per-epoch", type=positive_int, default=50, help="optimiser steps per epoch (default 50)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="crops per step (default 8)")
    p.add_argument("--crop", type=positive_int, default=128,
                   help="square crop size in pixels (native resolution; default 128)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--lr-schedule", choices=LrSchedule.values(), default=LrSchedule.CONSTANT.value,
                   help="constant (default) or cosine decay over the run")
    p.add_argument("--loss", choices=Loss.values(), default=Loss.CE.value,
                   help="ce (default): marginal cross-entropy; ce+dice adds a soft Dice term per class "
                        "where the class is decided; ce+regiondice a soft Dice per region (GGO, "
                        "consolidation, infection, lung), which also sees lesions of open type")


# ---------------------------------------------------------------- the model a --model names
def model_store(path: Optional[str]):
    """The model store at ``path``, or the one in the user's data folder."""
    from ..store import ModelStore, default_home

    return ModelStore(Path(path) if path else default_home() / "models", bundled=default_model_path())


def resolve_model(store, model: Optional[str]):
    """(checkpoint path, store version or None) for ``--model``: a file, a version number, or None = active."""
    if model is None:
        v = store.active()
        return v.path, v
    if model.isdigit():
        try:
            v = store.get(int(model))
        except KeyError:
            raise InputError(f"--model {model}: the store {store.root} has no version {model} "
                             f"(it has {', '.join(str(x.version) for x in store.versions())})") from None
        return v.path, v
    path = Path(model)
    if not path.is_file():
        raise InputError(f"checkpoint {model} does not exist")
    return path, store.version_of(path)


def load_predictor(args: argparse.Namespace, batch_size: int):
    """The model of ``--model`` (a file or a store version; default: the store's active version)
    with the options of segment/evaluate; --pixel-mm and --decision override the model's own."""
    from ..inference import Predictor

    path, version = resolve_model(model_store(args.store), args.model)
    if version is not None and not version.bundled and args.model is None:
        log.info("using the active model v%d of %s (python -m DRSegUNetLib models list)", version.version,
                 model_store(args.store).root)
    overrides = {} if args.decision is None else {"decision": args.decision}
    if args.pixel_mm is not None:  # else the model's own working pixel
        overrides["pixel_mm"] = args.pixel_mm or None
    return Predictor.from_checkpoint(path, args.device, batch_size=batch_size, cpu_bf16=args.cpu_bf16,
                                     flip_tta=args.flip_tta, **overrides)
