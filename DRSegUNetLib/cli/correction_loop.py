"""Commands of the correction loop: ``corrections add/list/remove``, ``finetune``, ``models``.

The stores default to the user's data folder (``store.default_home()``, ``$DRSEGUNET_HOME``
when set) -- the same ones the Slicer module uses.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ..config import (ActivatePolicy, BatchNormMode, FineTuneConfig, InferenceConfig, Loss, ReplayLoss,
                      check_pixel_mm)
from ..errors import InputError
from ..vocabulary import BACKGROUND_NAME, CHECKABLE, CLASS_NAMES, INFECTION_NAME, LABEL_LEGEND, NUM_CLASSES, REGIONS
from .common import (ProgressPrinter, add_common_options, add_json_progress, add_pixel_mm, add_store_option,
                     add_verbose, count, model_store, positive_float, positive_int, region_list, resolve_model)
from .files import check_nifti_signature


def add_parsers(sub) -> None:
    """Register ``finetune``, ``corrections`` and ``models`` on the subparsers ``sub``."""
    _add_finetune(sub)
    _add_corrections(sub)
    _add_models(sub)


def _add_finetune(sub) -> None:
    from ..adaptation import PRESETS

    ft = FineTuneConfig()
    p = sub.add_parser(
        "finetune", help="fine-tune level 2 on accepted corrections (gated)",
        description="Fine-tune a model on the slices of a corrections store and add the result to a model store as a "
                    "new version. The new version is scored against the one it started from on the reference slices "
                    "shipped with the model and on held-out corrected slices; it becomes active only if no reference "
                    "region loses more than --tolerance Dice and the held-out slices do not get worse (--activate). "
                    "Earlier versions are kept.")
    add_store_option(p, "corrections", "corrections store")
    add_store_option(p, "store", "model store (the new version is added here)")
    p.add_argument("--model", default=None, help="checkpoint file or store version number to start from "
                                                  "(default: the store's active version)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default: BatchNorm statistics kept, two fine-tunes of 20 Adam steps at 1e-4 with different "
                        "seeds, weights averaged, region Dice on the corrections, half of each batch from the "
                        "model's replay slices held to its own predictions, and the largest share of the new "
                        "weights that passes the gate (README, Fine-tuning); "
                        "thesis: the thesis's level 2 (first two layers frozen, lr 9.8e-6, 10 epochs, BatchNorm "
                        "re-estimated, no replay). The options below override the preset")
    p.add_argument("--steps", type=count, default=None,
                   help=f"optimisation steps of each fine-tune of the soup (default {ft.steps}; 0: use --epochs)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over the accepted slices when --steps is 0 (default {ft.epochs})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"Adam learning rate (default {ft.lr:g})")
    p.add_argument("--frozen-layers", type=count, default=None, help=f"first weight layers kept fixed (default {ft.frozen_layers})")
    p.add_argument("--bn", choices=BatchNormMode.values(), default=None, help=f"BatchNorm statistics: frozen keeps the model's, train re-estimates (default {ft.bn})")
    p.add_argument("--loss", choices=Loss.values(), default=None, help=f"training loss (default {ft.loss})")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"crops per step (default {ft.batch_size})")
    p.add_argument("--crop", type=positive_int, default=None, help=f"crop size in working pixels (default {ft.crop})")
    p.add_argument("--replay-fraction", type=float, default=None,
                   help=f"share of crops from the model's own replay slices (default {ft.replay_fraction:g}; 0: none)")
    p.add_argument("--replay-loss", choices=ReplayLoss.values(), default=None,
                   help=f"replay crops keep the starting model's predictions (distill) or learn their annotations "
                        f"(labels) (default {ft.replay_loss})")
    p.add_argument("--no-interpolation", action="store_true",
                   help="keep the fine-tuned weights as they are instead of the largest share of them "
                        f"({', '.join(f'{a:g}' for a in ft.alphas)}) that passes the gate")
    p.add_argument("--holdout-every", type=count, default=None,
                   help=f"hold one corrected slice in N out for the gate (default {ft.holdout_every}; 0: none)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"largest reference Dice drop that still activates the new version (default {ft.tolerance:g})")
    p.add_argument("--soup", type=positive_int, default=None,
                   help=f"fine-tune this many times with consecutive seeds and average the weights (default {ft.soup})")
    p.add_argument("--seed", type=count, default=None,
                   help=f"seed of the crops drawn and their augmentation (default {ft.seed})")
    p.add_argument("--gate-regions", type=region_list, default=None,
                   help=f"comma list of the reference regions held within --tolerance "
                        f"(default {','.join(ft.gate_regions)}; of {', '.join(REGIONS)})")
    p.add_argument("--activate", choices=ActivatePolicy.values(), default=ActivatePolicy.IF_BETTER.value,
                   help="make the new version active: if it passes the gate (default), always, or never")
    add_pixel_mm(p, "working pixel size in mm the corrections are resampled to, as segment uses, and the new "
                    "model carries (default: the starting model's, "
                    f"{InferenceConfig.pixel_mm:g} for models that do not say); 0 = their own grid")
    p.add_argument("--json", default=None, help="write the outcome (version, gate numbers) to this JSON file")
    add_json_progress(p)
    add_common_options(p)


def _add_corrections(sub) -> None:
    p = sub.add_parser("corrections", help="add, list or remove accepted correction slices",
                       description="The corrections store that finetune learns from (the Slicer module's Accept "
                                   "Corrections writes the same store). Corrections hold patient data.")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = csub.add_parser("add", help="accept slices of a CT and its label map",
                        description=f"Store axial slices of CT (in HU) with labels of our vocabulary ({LABEL_LEGEND}) "
                                    "on the CT's grid. Slice indices count along the "
                                    "axial view segment uses (0 = most inferior).")
    a.add_argument("ct", help="CT volume in HU (NIfTI, NRRD, MHA, DICOM)")
    a.add_argument("labels", help="label map with the CT's geometry")
    a.add_argument("--slices", required=True, help="comma-separated axial slice indices, e.g. 12,40,77")
    a.add_argument("--known", default=None,
                   help=f"what was checked on these slices, comma-separated from {', '.join(CHECKABLE)} "
                        f"(default: everything); {INFECTION_NAME} = the lesion outline, with GGO/consolidation left open")
    add_store_option(a, "store", "corrections store")
    add_verbose(a)
    a = csub.add_parser("list", help="list the stored slices")
    add_store_option(a, "store", "corrections store")
    a.add_argument("--json", action="store_true", help="one JSON object per slice")
    add_verbose(a)
    a = csub.add_parser("remove", help="remove stored slices by id")
    a.add_argument("ids", nargs="+", help="ids as listed by corrections list")
    add_store_option(a, "store", "corrections store")
    add_verbose(a)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list model versions or make one active",
                       description="The model store: version 1 is the bundled model; finetune adds versions.")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = msub.add_parser("list", help="list versions, the active one marked, with their gate numbers")
    add_store_option(a, "store", "model store")
    add_verbose(a)
    a = msub.add_parser("activate", help="make a version active (also one the gate did not activate)")
    a.add_argument("version", type=positive_int)
    add_store_option(a, "store", "model store")
    add_verbose(a)


def corrections_store(path: Optional[str], must_exist: bool):
    from ..store import CorrectionsStore, default_home

    root = Path(path) if path else default_home() / "corrections"
    if must_exist and not root.is_dir():
        raise InputError(f"corrections store {root} does not exist")
    if root.exists() and not root.is_dir():
        raise InputError(f"corrections store {root} is not a folder")
    return CorrectionsStore(root)


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..adaptation import (REFERENCE_CACHE, CorrectionSlice, adaptation_data_for, cached_reference, finetune,
                              load_adaptation_data, preset, reference_key, remember_reference)
    from ..checkpoint import load_checkpoint

    printer = ProgressPrinter(json_lines=args.json_progress)
    check_pixel_mm(args.pixel_mm)
    if args.replay_fraction is not None and not 0 <= args.replay_fraction < 1:
        raise InputError(f"--replay-fraction must be from 0 to below 1, got {args.replay_fraction}")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise InputError(f"--tolerance must be >= 0, got {args.tolerance}")
    config = preset(args.preset, steps=args.steps, epochs=args.epochs, lr=args.lr, frozen_layers=args.frozen_layers,
                    bn=args.bn, loss=args.loss, batch_size=args.batch_size, crop=args.crop,
                    replay_fraction=args.replay_fraction, holdout_every=args.holdout_every, tolerance=args.tolerance,
                    replay_loss=args.replay_loss, alphas=(1.0,) if args.no_interpolation else None,
                    gate_regions=args.gate_regions, seed=args.seed, soup=args.soup)
    store = model_store(args.store)
    start, parent = resolve_model(store, args.model)
    corrections = corrections_store(args.corrections, must_exist=True)
    ids = corrections.ids()
    if not ids:
        raise InputError(f"no accepted slices in {corrections.root}")
    slices = []
    for cid in ids:
        c = corrections.load(cid)
        slices.append(CorrectionSlice(c.ct_hu, c.labels, tuple(c.spacing), c.known, cid, c.source, c.slice_index))
    init = load_checkpoint(start)
    data_path = adaptation_data_for(start)
    data = load_adaptation_data(data_path, init.config.eight_bit)
    fingerprint = corrections.fingerprint(ids)
    # The starting model's reference scores are kept in the store, so that only its first
    # fine-tune pays for them (and a fine-tune from a fine-tuned version never does).
    cache = store.root / REFERENCE_CACHE
    pixel_mm = init.config.inference.pixel_mm if args.pixel_mm is None else args.pixel_mm  # what it runs at
    start_key = reference_key(start, data_path, pixel_mm, args.device)
    outcome = finetune(init, slices, config, data, args.pixel_mm, args.device, progress=printer,
                       extra={"corrections_fingerprint": fingerprint, "n_corrections": len(slices)},
                       reference_before=cached_reference(cache, start_key))
    if not outcome.reference_cached:
        remember_reference(cache, start_key, outcome.gate.reference_before)
    version = _add_version(args, store, outcome, config, ids, fingerprint, start, parent)
    new_path = version.path
    remember_reference(cache, reference_key(new_path, adaptation_data_for(new_path), pixel_mm, args.device),
                       outcome.gate.reference_after)
    _announce(args, store, version, outcome, parent, printer, config.soup)
    return 0


def _add_version(args: argparse.Namespace, store, outcome, config, ids, fingerprint, start, parent):
    """Add the fine-tuned model to the model store, with its card; make it active as --activate says."""
    from ..checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="drsegunet-finetune-") as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(outcome.checkpoint, path)
        version = store.add_version(path, card={
            "level": 2, "preset": args.preset, "corrections_fingerprint": fingerprint, "corrections_used": ids,
            "pixel_mm": outcome.checkpoint.config.inference.pixel_mm or None, "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "steps": outcome.steps, "soup": config.soup, "replay_slices": outcome.n_replay, "started_from": str(start),
            "gate": outcome.gate.to_dict(), "loss_history": [h["loss"] for h in outcome.history]},
            parent=parent)
    if _activates(args, outcome.gate):
        store.set_active(version)
    return version


def _activates(args: argparse.Namespace, gate) -> bool:
    return args.activate == ActivatePolicy.ALWAYS or (args.activate == ActivatePolicy.IF_BETTER and gate.passed)


def _announce(args: argparse.Namespace, store, version, outcome, parent, printer, soup: int) -> None:
    """The outcome of finetune: a progress line ("done"), --json, and a message on stderr.
    steps counts the steps of each fine-tune of the soup; soup says how many were averaged."""
    gate = outcome.gate
    activate = _activates(args, gate)
    previous = parent.version if parent is not None else None
    if activate:
        message = f"saved model version {version.version}, now active ({gate.summary()})"
    else:
        why = "; ".join(gate.reasons) if args.activate == ActivatePolicy.IF_BETTER else "--activate never"
        message = (f"saved model version {version.version} but did NOT make it active ({why}); the active model is "
                   f"still v{store.active().version}. Make it active anyway with: python -m DRSegUNetLib models "
                   f"activate {version.version}")
    result = {"version": version.version, "path": str(version.path), "activated": activate, "parent": previous,
              "gate": gate.to_dict(), "steps": outcome.steps, "soup": soup, "reference_cached": outcome.reference_cached}
    if args.json:
        from ..atomic import atomic_write_bytes

        atomic_write_bytes(Path(args.json), (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    printer("done", 1, 1, message, **result)
    if not args.json_progress:
        print(message, file=sys.stderr)


def parse_slices(text: str, n: int) -> list[int]:
    try:
        idx = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--slices must be comma-separated integers, got {text!r}") from None
    if not idx:
        raise InputError("--slices names no slice")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise InputError(f"--slices {','.join(map(str, bad))} out of range: the CT has {n} axial slices (0 to {n - 1})")
    return sorted(set(idx))


def cmd_corrections(args: argparse.Namespace) -> int:
    if args.action == "add":
        check_nifti_signature(args.ct)
        check_nifti_signature(args.labels)
        return _corrections_add(args)
    store = corrections_store(args.store, must_exist=args.action == "remove")
    if args.action == "list":
        for info in store.items():
            if args.json:
                print(json.dumps({"id": info.id, "source": info.source, "slice": info.slice_index, "time": info.time,
                                  "shape": list(info.shape), "spacing": list(info.spacing),
                                  "known": list(info.known) if info.known else None}))
            else:
                known = ",".join(info.known) if info.known else "all"
                print(f"{info.id}  slice {info.slice_index:4d}  {info.shape[0]}x{info.shape[1]}  known {known}  {info.source}")
        if not args.json:
            print(f"{len(store)} accepted slices in {store.root}", file=sys.stderr)
        return 0
    missing = [i for i in args.ids if i not in store]
    if missing:
        raise InputError(f"no correction {', '.join(missing)} in {store.root} (see corrections list)")
    for cid in args.ids:
        store.remove(cid)
    print(f"removed {len(args.ids)} slices; {len(store)} left in {store.root}", file=sys.stderr)
    return 0


def _known(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """The segments --known names; None: every segment checked."""
    if not text:
        return None
    known = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = sorted(set(known) - set(CHECKABLE))
    if bad or not known:
        raise InputError(f"--known: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(CHECKABLE)}")
    return None if set(known) >= set(CLASS_NAMES) - {BACKGROUND_NAME} else known  # every segment checked: None


def _read_labels_for(args: argparse.Namespace):
    """(CT image, its voxels, the label map's voxels) of corrections add, checked against each other."""
    import numpy as np
    import SimpleITK as sitk

    from ..imageio import read_ct
    from ..orientation import axial_spacing, axial_view
    from ..preprocessing import check_ct_hu

    ct = read_ct(args.ct)
    labels = read_ct(args.labels)
    if labels.GetSize() != ct.GetSize():
        raise InputError(f"{args.labels} is {labels.GetSize()} voxels but the CT is {ct.GetSize()}; they must match")
    for what, a, b in (("spacing", labels.GetSpacing(), ct.GetSpacing()), ("origin", labels.GetOrigin(), ct.GetOrigin()),
                       ("direction", labels.GetDirection(), ct.GetDirection())):
        if not np.allclose(a, b, atol=1e-3, rtol=1e-4):
            raise InputError(f"{args.labels} has another {what} than the CT ({tuple(round(x, 4) for x in a)} vs "
                             f"{tuple(round(x, 4) for x in b)}); resample it onto the CT's grid")
    ct_array = sitk.GetArrayViewFromImage(ct)
    check_ct_hu(ct_array, args.ct)
    lab_array = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(lab_array.dtype, np.floating) and not np.array_equal(lab_array, np.round(lab_array)):
        raise InputError(f"{args.labels} has fractional values; a label map has {', '.join(map(str, range(NUM_CLASSES)))}")
    values = np.unique(lab_array)
    if values.min() < 0 or values.max() >= NUM_CLASSES:
        raise InputError(f"{args.labels} has labels {sorted(int(v) for v in values if not 0 <= v < NUM_CLASSES)}; "
                         f"ours are {LABEL_LEGEND}")
    return ct, ct_array, lab_array


def _corrections_add(args: argparse.Namespace) -> int:
    import numpy as np

    from ..lungs import axial_spacing
    from ..orientation import axial_view

    known = _known(args.known)
    store = corrections_store(args.store, must_exist=False)
    if store.root.exists() and any(store.root.iterdir()) and not (store.root / store.INDEX).exists() \
            and not store.ids():
        raise InputError(f"{store.root} is not a corrections store (it holds other files); give an empty or new folder")
    ct, ct_array, lab_array = _read_labels_for(args)
    ct_view = axial_view(ct_array, ct.GetDirection())[0]
    lab_view = axial_view(lab_array, ct.GetDirection())[0]
    chosen = parse_slices(args.slices, ct_view.shape[0])
    spacing = axial_spacing(ct.GetSpacing(), ct.GetDirection())
    source = f"{Path(args.ct).name} | {Path(args.ct).resolve()}"
    pending = [(n, np.asarray(ct_view[n]), np.asarray(lab_view[n]).astype(np.uint8)) for n in chosen]
    ids = [store.add(c, lab, spacing, source, n, known=known) for n, c, lab in pending]
    print(f"added {len(ids)} slices ({', '.join(map(str, chosen))}) to {store.root}; {len(store)} in all", file=sys.stderr)
    for cid in ids:
        print(cid)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    store = model_store(args.store)
    if args.action == "activate":
        try:
            v = store.set_active(args.version)
        except KeyError:
            raise InputError(f"the store {store.root} has no version {args.version}") from None
        print(f"model version {v.version} is active ({v.path})", file=sys.stderr)
        return 0
    active = store.active().version
    for v in store.versions():
        gate = v.card.get("gate") or {}
        note = ""
        if gate:
            note = "  gate passed" if gate.get("passed") else "  gate refused: " + "; ".join(gate.get("reasons", []))
        print(f"{'*' if v.version == active else ' '} {v.label}  {v.path}{note}")
    return 0


COMMANDS = {"finetune": cmd_finetune, "corrections": cmd_corrections, "models": cmd_models}
