"""``python -m DRSegUNetLib``: segment, train, evaluate, info (and the work built on them).

Errors the user can fix (bad input, bad checkpoint) print one line and exit 2;
nothing half-written is left at an output path.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__, default_model_path

log = logging.getLogger("DRSegUNetLib")


class ProgressPrinter:
    """Turns progress callbacks into a one-line bar on stderr, or JSON lines on stdout."""

    def __init__(self, json_lines: bool = False, quiet: bool = False) -> None:
        self.json_lines, self.quiet = json_lines, quiet
        self._last = 0.0

    def __call__(self, stage: str, step: int, total: int, message: str = "", **info: Any) -> None:
        if self.json_lines:
            print(json.dumps({"stage": stage, "step": step, "total": total, "message": message, **info}), flush=True)
            return
        if self.quiet:
            return
        now = time.time()
        if step < total and now - self._last < 0.5 and stage != "epoch":
            return
        self._last = now
        width = 30
        done = int(width * step / total) if total else width
        end = "\n" if step >= total or stage == "epoch" else ""
        sys.stderr.write(f"\r{stage:>8} [{'#' * done}{'.' * (width - done)}] {step}/{total} {message}\033[K{end}")
        sys.stderr.flush()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m DRSegUNetLib",
                                     description="DRSegUNet: segment COVID-19 lung infection (GGO, consolidation) and lungs on chest CT.")
    parser.add_argument("--version", action="version", version=f"DRSegUNetLib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment a CT volume", description="Segment a chest CT in HU (NIfTI, NRRD, MHA, a DICOM file or a DICOM series folder) and write a label map (0 background, 1 GGO, 2 consolidation, 3 lung) with the input's geometry.")
    p.add_argument("input", help="CT volume in HU: .nii/.nii.gz/.nrrd/.mha/.dcm file or DICOM series folder")
    p.add_argument("output", help="label map to write (.nii.gz, .nrrd, .mha, ...)")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--seg-nrrd", default=None, help="also write a Slicer .seg.nrrd here")
    p.add_argument("--report", default=None, help="also write a JSON report (volumes, %% of lung involved)")
    p.add_argument("--overlay", default=None, help="also write a PNG overlay of the most involved slice")
    p.add_argument("--decision", choices=("argmax", "threshold"), default="argmax",
                   help="argmax (default) or the thesis's 0.5-threshold refinement (§4.5)")
    p.add_argument("--batch-size", type=int, default=4, help="slices per forward pass")
    _add_common(p)

    p = sub.add_parser("train", help="train a model", description="Train DRSegUNet (Adam + marginal categorical cross-entropy) on annotated slices; writes best.pt (best validation Dice) and last.pt atomically.")
    p.add_argument("data", nargs="+", help="MedSeg-style folders (images/, masks/) and/or COVID-19-CT-Seg-style .npz files")
    p.add_argument("--out", required=True, help="output folder for checkpoints and history.json")
    p.add_argument("--split", default=str(Path(__file__).parent / "splits" / "default.json"),
                   help="JSON split file naming validation and test slices (default: the bundled split)")
    p.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning / level 2)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128, help="square crop size in pixels (native resolution)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--loss", choices=("ce", "ce+dice"), default="ce")
    p.add_argument("--frozen-layers", type=int, default=0, help="freeze the first N layers (level 2: 2)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--upsampling", choices=("transpose", "upsample"), default="transpose")
    p.add_argument("--val-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-progress", action="store_true", help="print progress as JSON lines on stdout")
    _add_common(p)

    p = sub.add_parser("evaluate", help="score a model on annotated slices", description="Per-class Dice, IoU, precision, recall and F1 (mean over slices and pooled over pixels) of a model on a MedSeg-style folder or a COVID-19-CT-Seg-style .npz.")
    p.add_argument("data", help="MedSeg-style folder (images/*.jpg, masks/*.png) or .npz like zenodo20_dev.npz")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--json", required=True, help="where to write the metrics JSON")
    p.add_argument("--decision", choices=("argmax", "threshold"), default="argmax")
    p.add_argument("--split-part", choices=("all", "train", "val", "test"), default="all",
                   help="score only this part of --split (default: every slice in DATA)")
    p.add_argument("--split", default=str(Path(__file__).parent / "splits" / "default.json"))
    _add_common(p)

    p = sub.add_parser("info", help="describe a checkpoint", description="Print a checkpoint's config, classes, training data fingerprint and metrics as JSON.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_segment(args: argparse.Namespace) -> int:
    from .imageio import read_ct, write_image
    from .inference import Predictor

    image = read_ct(args.input)
    predictor = Predictor.from_checkpoint(args.model or default_model_path(), args.device,
                                          decision=args.decision, batch_size=args.batch_size)
    labels = predictor.predict(image, progress=ProgressPrinter())
    outputs = []
    write_image(labels, args.output)
    outputs.append(args.output)
    if args.seg_nrrd:
        from .segio import write_seg_nrrd

        write_seg_nrrd(labels, args.seg_nrrd)
        outputs.append(args.seg_nrrd)
    if args.report:
        from .report import compute_report, write_report

        rep = compute_report(labels)
        rep["input"] = str(args.input)
        rep["model"] = str(args.model or default_model_path())
        write_report(rep, args.report)
        outputs.append(args.report)
    if args.overlay:
        from .overlay import write_overlay

        write_overlay(image, labels, args.overlay)
        outputs.append(args.overlay)
    log.info("wrote %s", ", ".join(map(str, outputs)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import ModelConfig, NetworkConfig, TrainConfig
    from .data import apply_split, fingerprint, load_split, read_dataset
    from .training import train

    samples = [s for d in args.data for s in read_dataset(d)]
    split = load_split(args.split) if args.split else {}
    tr, val, test = apply_split(samples, split)
    log.info("training on %d slices, validating on %d, holding out %d", len(tr), len(val), len(test))
    cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                      crop=args.crop, lr=args.lr, lr_schedule=args.lr_schedule, loss=args.loss, seed=args.seed,
                      frozen_layers=args.frozen_layers, val_every=args.val_every)
    init = load_checkpoint(args.init) if args.init else None
    mcfg = ModelConfig(network=NetworkConfig(base_filters=args.base_filters, upsampling=args.upsampling))
    result = train(tr, val, args.out, cfg, mcfg, init=init, device=args.device,
                   fingerprint={"data": fingerprint(args.data), "split": Path(args.split).name if args.split else None},
                   progress=ProgressPrinter(json_lines=args.json_progress),
                   extra={"command": " ".join(sys.argv)})
    Path(args.out, "history.json").write_text(json.dumps(result.history, indent=1))
    log.info("best validation Dice %.4f at epoch %d: %s", result.best_score, result.best_epoch, result.best_path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_bytes
    from .data import apply_split, load_split, read_dataset
    from .inference import Predictor
    from .training import evaluate_samples

    predictor = Predictor.from_checkpoint(args.model or default_model_path(), args.device, decision=args.decision, batch_size=1)
    samples = read_dataset(args.data, predictor.config.eight_bit)
    if args.split_part != "all":
        parts = dict(zip(("train", "val", "test"), apply_split(samples, load_split(args.split))))
        samples = parts[args.split_part]
    summary = evaluate_samples(predictor, samples)
    out = {"data": str(args.data), "model": str(args.model or default_model_path()), "decision": args.decision,
           "n_slices": len(samples), "split_part": args.split_part, "metrics": summary}
    atomic_write_bytes(args.json, (json.dumps(out, indent=1) + "\n").encode())
    for region, m in summary.items():
        log.info("%-14s Dice mean %.4f  pooled %.4f  (%d slices)", region, m["mean"]["dice"] or 0.0,
                 (m["pooled"] or {}).get("dice", 0.0), m["n_slices"])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .network import keras_parameter_count

    path = args.model or default_model_path()
    ckpt = load_checkpoint(path)
    info = {"path": str(path), "config": ckpt.config.to_dict(), "class_names": list(ckpt.class_names),
            "parameters_keras": keras_parameter_count(ckpt.build_model()), "fingerprint": ckpt.fingerprint,
            "metrics": ckpt.metrics, "code_version": ckpt.code_version,
            "extra": {k: v for k, v in ckpt.extra.items() if k != "history"}}
    print(json.dumps(info, indent=1))
    return 0


COMMANDS = {"segment": cmd_segment, "train": cmd_train, "evaluate": cmd_evaluate, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import Cancelled, CheckpointError, InputError

    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return COMMANDS[args.command](args)
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
