"""Checkpoint files: ``export`` (a small fp16 copy for bundling, with its test metrics) and ``info``
(what a checkpoint holds, or a model store's versions).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..errors import InputError
from .common import add_verbose, log, model_store, resolve_model
from .correction_loop import cmd_models
from .files import check_outputs, file_sha256


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="make a small (fp16) copy of a checkpoint for bundling",
                       description="Copy a checkpoint with float16 weights (half the size), recording the code commit and test metrics given as JSON files.")
    p.add_argument("model", help="checkpoint to export (e.g. a training run's best.pt)")
    p.add_argument("output", help="where to write the exported checkpoint")
    p.add_argument("--test-metrics", nargs="*", default=[],
                   help="evaluate --json outputs of this checkpoint to record in it; each must name this checkpoint "
                        "(default: none)")
    add_verbose(p)

    p = sub.add_parser("info", help="describe a checkpoint or list a model store's versions",
                       description="Print a checkpoint's working pixel size, config, classes, training data "
                                   "fingerprint and metrics as JSON; for a model-store folder, list its versions with the active one marked "
                                   "(as models list does).")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint, store version number, or model-store folder (default: the active version of the "
                        "store in the user's data folder, $DRSEGUNET_HOME when set; the bundled model until a "
                        "fine-tune adds one)")
    add_verbose(p)


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
        same = d["model_sha256"] == file_sha256(model)
    else:
        try:
            same = Path(named).samefile(model)
        except OSError:
            same = False
    if not same:
        raise InputError(f"--test-metrics {path} holds metrics of {named}, not of {model}: run evaluate "
                         f"--model {model} and record its JSON")
    return d


def half_where_it_fits(state_dict: dict) -> dict:
    """Floating tensors in float16, except those with a value beyond float16's range, which stay
    float32 (BatchNorm running variances of the decoders reach 1e5: in float16 they would become
    inf, and the checkpoint would not load). A few kB of a ~11 MB file."""
    import torch

    top = torch.finfo(torch.float16).max

    def fits(v) -> bool:
        return v.is_floating_point() and (v.numel() == 0 or float(v.abs().max()) <= top)

    return {k: v.half() if fits(v) else v for k, v in state_dict.items()}


def cmd_export(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint, save_checkpoint

    check_outputs([args.model, *args.test_metrics], [args.output])
    ckpt = load_checkpoint(args.model)
    metrics = [_metrics_of(path, args.model) for path in args.test_metrics]  # all checked before anything is written
    ckpt.state_dict = half_where_it_fits(ckpt.state_dict)
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
    from ..store import _VERSION_DIR, ModelStore

    for root in (folder, folder / "models"):
        if root.is_dir() and ((root / ModelStore.ACTIVE).exists()
                              or any(_VERSION_DIR.match(d.name) and (d / ModelStore.CHECKPOINT).is_file()
                                     for d in root.iterdir())):
            return root
    return None


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..network import keras_parameter_count

    if args.model and Path(args.model).is_dir():
        store = _model_store_folder(Path(args.model))
        if store is None:
            raise InputError(f"{args.model} is a folder but not a model store (no version folders v0002, ... "
                             "and no active.json); give a checkpoint file or a model-store folder")
        return cmd_models(argparse.Namespace(action="list", store=str(store)))
    store = model_store(None)
    path, _ = resolve_model(store, args.model)  # a file, a version number, or the store's active version
    ckpt = load_checkpoint(path)
    info = {"path": str(path),
            "store": {"root": str(store.root), "active": store.active().version,
                      "versions": [v.version for v in store.versions()]},
            # The grid segment runs the network on (None: the CT's own); --pixel-mm overrides it.
            "working_pixel_mm": ckpt.config.inference.pixel_mm or None,
            "config": ckpt.config.to_dict(), "class_names": list(ckpt.class_names),
            "parameters_keras": keras_parameter_count(ckpt.build_model()), "fingerprint": ckpt.fingerprint,
            "metrics": ckpt.metrics, "code_version": ckpt.code_version,
            "extra": {k: v for k, v in ckpt.extra.items() if k != "history"}}
    print(json.dumps(info, indent=1))
    return 0


COMMANDS = {"export": cmd_export, "info": cmd_info}
