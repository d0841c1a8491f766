"""Weakly supervised self-learning, thesis §4.4 and §5.5: pseudo-labels → level 1 → level 2 …

No manual annotation is used. The stages, each a folder of the output folder:

- ``level0``: lung extraction (lungs.py) and k-means pseudo-labels (pseudolabels.py)
  for every slice of the (labelled-by-pseudo-labels) inputs.
- ``level1``: :func:`training.train` from scratch on the level-0 labels
  (SelfTrainConfig.level1_*); then level 1 predicts labels for the same slices and
  for the ``extra`` (unlabelled) slices.
- ``levelK`` (K >= 2): ``train`` from level K-1's checkpoint with the first
  ``frozen_layers`` layers frozen, at ``level2_lr``, on the labels level K-1
  predicted (inputs and extras); then it predicts labels for all slices.

Every level folder holds ``labels.npz`` (see :func:`save_label_maps`) and
``metrics.json``; levels >= 1 also hold ``best.pt`` (= ``last.pt``: there is no
validation set, so the last epoch is kept and nothing is selected on annotations).
``metrics.json`` scores each level's labels against the labels it was trained on
and against the level-0 pseudo-labels (the thesis's Table 15 kind of score); scores
against expert masks are ``evaluate --predictions``'s job.

Training targets are exclusive labels, every pixel decided
(``data.labels_to_allowed``); only slices whose labels contain some lung are
trained on (a slice without lung gives no information about the lesions).

Resuming: ``state.json`` records, per finished stage, a key of every setting and
input it depends on (and of the previous stage's key). A rerun skips finished stages
with the same key and redoes a stage whose settings changed, and every stage after
it; a stage interrupted mid-way starts again from its beginning. A finished stage's
files are checked before they are reused (``stage_outputs``: label maps of the inputs'
shapes and vocabulary, readable metrics, a checkpoint trained by that stage); a stage
whose files fail is done again, with a warning. Every file is written atomically,
``state.json`` last.

Inputs: CT volumes in HU (any format ``imageio.read_ct`` reads), sliced axially in
radiological display orientation, or ``.npz`` files of 8-bit slices (``ct_uint8``
(N, H, W), like COVID-19-CT-Seg) mapped to approximate HU with EightBitConfig and
lung-extracted with Otsu's threshold per slice (``LungConfig.threshold_method`` "auto";
with "thesis", at ``SelfTrainConfig.eight_bit_lung_threshold_hu``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write_bytes
from .config import (EightBitConfig, InferenceConfig, LungConfig, ModelConfig, NetworkConfig, PseudoLabelConfig,
                     SelfTrainConfig, TrainConfig, to_dict)
from .data import Sample, check_slices_npz, labels_to_allowed, read_npz, resample_sample
from .errors import CheckpointError, InputError
from .metrics import MetricAccumulator, region_mask
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .vocabulary import NUM_CLASSES, REGIONS

log = logging.getLogger(__name__)

STATE_FORMAT = "drsegunet-selftrain/1"


# ---------------------------------------------------------------- inputs
@dataclass
class SliceInput:
    """One input's axial slices in HU (or approximate HU for 8-bit slices).

    ``hu`` is (n, H, W) float32 in the axial display frame (``orientation.axial_view``);
    ``names``/``groups`` name each slice and the case it belongs to.
    """

    path: str
    hu: np.ndarray
    names: list[str]
    groups: list[str]
    eight_bit: bool
    spacing: Optional[tuple[float, float]] = None  # (row, col) mm; None: unknown
    image: Optional[sitk.Image] = None  # the CT volume (HU inputs), for 3D lung clean-up
    extra: bool = False

    def __len__(self) -> int:
        return int(self.hu.shape[0])


def read_slices(path: str | Path, eight_bit: EightBitConfig = EightBitConfig()) -> SliceInput:
    """Read a CT volume in HU, or an ``.npz`` with ``ct_uint8`` (N, H, W) 8-bit slices.

    The npz may also hold ``group`` (N,) (the case of each slice; default 0) and
    ``source_index`` (N,) (slice names). Raises InputError with one line otherwise.
    """
    from .imageio import read_ct
    from .inference import validate_ct_image
    from .lungs import axial_spacing
    from .orientation import axial_view
    from .preprocessing import eight_bit_to_hu

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist")
    if p.suffix.lower() == ".npz":
        d = read_npz(p, only=("ct_uint8", "group", "source_index"))  # expert masks, if any, stay unread
        ct = check_slices_npz(p, d if "ct_uint8" in d else read_npz(p))  # the error names what the file has
        group = d["group"] if "group" in d else np.zeros(len(ct), dtype=int)
        src = d["source_index"] if "source_index" in d else np.arange(len(ct))
        hu = np.stack([eight_bit_to_hu(s, eight_bit) for s in ct]).astype(np.float32, copy=False)
        # Names and groups as data.read_zenodo_npz gives them, so that scores line up.
        return SliceInput(str(p), hu, [f"z{int(s)}" for s in src], [f"zenodo{int(g)}" for g in group], True)
    image = read_ct(p)
    array = validate_ct_image(image, p.name)
    view, _ = axial_view(array, image.GetDirection())
    name = _volume_name(p)
    n = view.shape[0]
    return SliceInput(str(p), np.ascontiguousarray(view, dtype=np.float32), [f"{name}:{z}" for z in range(n)],
                      [name] * n, False, axial_spacing(image), image)


def _volume_name(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def lung_config_for(inp: SliceInput, cfg: SelfTrainConfig = SelfTrainConfig(),
                    lung: LungConfig = LungConfig(), threshold_hu: Optional[float] = None,
                    method: Optional[str] = None) -> LungConfig:
    """The lung-extraction constants for an input, with the threshold rule resolved.

    ``method`` (default ``lung.threshold_method``): "auto" is "otsu" for 8-bit slices
    and "thesis" for CT in HU; "thesis" is a fixed level, ``lung.threshold_hu`` for CT
    in HU and ``cfg.eight_bit_lung_threshold_hu`` for 8-bit slices; "otsu" is Otsu's
    level per slice (lungs.py). ``threshold_hu`` is a fixed level for every input
    ("thesis"; not with "otsu"). The result never says "auto".
    """
    from .lungs import THRESHOLD_METHODS

    method = lung.threshold_method if method is None else method
    if method not in THRESHOLD_METHODS:
        raise InputError(f"lung threshold must be one of {', '.join(THRESHOLD_METHODS)}, not {method!r}")
    if threshold_hu is not None:
        if method == "otsu":
            raise InputError("a fixed lung threshold (threshold_hu) and the Otsu threshold exclude each other")
        changes = dict(threshold_method="thesis", threshold_hu=float(threshold_hu))
    else:
        if method == "auto":
            method = "otsu" if inp.eight_bit else "thesis"
        changes = dict(threshold_method=method)
        if method == "thesis" and inp.eight_bit:
            changes["threshold_hu"] = cfg.eight_bit_lung_threshold_hu
    try:
        return dataclasses.replace(lung, **changes)
    except ValueError as e:  # e.g. a threshold outside [air, bone]
        raise InputError(str(e)) from None


def lung_masks(inp: SliceInput, cfg: LungConfig, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelCheck] = None) -> np.ndarray:
    """(n, H, W) bool lung masks of an input's slices (volumes: with the 3D clean-up)."""
    from .lungs import extract_lungs, extract_lungs_slice
    from .orientation import axial_view

    if inp.image is not None:
        check_cancel(cancel)
        mask = extract_lungs(inp.image, cfg)
        view, _ = axial_view(sitk.GetArrayViewFromImage(mask), inp.image.GetDirection())
        report(progress, "lungs", len(inp), len(inp), Path(inp.path).name)
        return np.ascontiguousarray(view) > 0
    out = np.zeros(inp.hu.shape, dtype=bool)
    for i in range(len(inp)):
        check_cancel(cancel)
        try:
            out[i] = extract_lungs_slice(inp.hu[i], cfg, spacing=inp.spacing)
        except InputError as e:
            raise InputError(f"{inp.path}, slice {i}: {e}") from None
        report(progress, "lungs", i + 1, len(inp), Path(inp.path).name)
    return out


def pseudo_labels(inp: SliceInput, lungs: np.ndarray, cfg: PseudoLabelConfig = PseudoLabelConfig(),
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None) -> np.ndarray:
    """(n, H, W) uint8 pseudo-labels (0 background, 1 GGO, 3 lung) of an input's slices."""
    from .pseudolabels import pseudolabel_slice

    out = np.zeros(inp.hu.shape, dtype=np.uint8)
    for i in range(len(inp)):
        check_cancel(cancel)
        if lungs[i].any():
            out[i] = pseudolabel_slice(inp.hu[i], lungs[i], cfg)
        report(progress, "pseudolabels", i + 1, len(inp), Path(inp.path).name)
    return out


# ---------------------------------------------------------------- label files
def save_label_maps(path: str | Path, inputs: Sequence[str], maps: Sequence[np.ndarray]) -> None:
    """Write label maps atomically as ``.npz``.

    Layout: ``inputs`` (k,) str, the input each array belongs to; ``input_<i>``
    (n_i, H_i, W_i) uint8 per input, slices in the input's order (volumes: axial
    display frame, inferior to superior); and ``labels`` (N, H, W) uint8, all slices
    stacked, when they share one size. Values are in vocabulary.py's labels.
    """
    if len(inputs) != len(maps):
        raise ValueError("one label array per input")
    arrays: dict[str, np.ndarray] = {"inputs": np.array([str(s) for s in inputs], dtype=str)}
    for i, m in enumerate(maps):
        arrays[f"input_{i}"] = np.asarray(m, dtype=np.uint8)
    if maps and len({m.shape[1:] for m in maps}) == 1:
        arrays["labels"] = np.concatenate([np.asarray(m, dtype=np.uint8) for m in maps])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_label_maps(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """Inverse of :func:`save_label_maps`: (inputs, per-input label arrays). InputError
    with one line for a file that cannot be read or was not written by it."""
    what = "label maps .npz"
    recorded = read_npz(path, what, only=("inputs",)).get("inputs")
    if recorded is None:
        raise InputError(f"{path} has no 'inputs' array: it was not written by save_label_maps")
    inputs = [str(s) for s in recorded]
    names = [f"input_{i}" for i in range(len(inputs))]
    arrays = read_npz(path, what, only=names)  # the stacked 'labels' copy stays unread
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"{path} records {len(inputs)} inputs but has no {missing[0]!r} array")
    return inputs, [arrays[n] for n in names]


def labels_for_dataset(path: str | Path, data: str | Path, n: int) -> np.ndarray:
    """Label maps in ``path`` aligned with the ``n`` slices of dataset ``data``.

    ``path`` holds ``labels`` (N, H, W); or it was written by :func:`save_label_maps`
    for several inputs, one of which is ``data`` (then that input's array is used).
    """
    p = Path(path)
    what = "predictions .npz"
    name = "labels"
    inputs = read_npz(p, what, only=("inputs",)).get("inputs")
    if inputs is not None:  # only the array of ``data`` is decompressed, not every input's
        want = Path(data).resolve()
        same = [i for i, s in enumerate(inputs) if Path(str(s)).resolve() == want]
        if not same:  # a relative path recorded from another working folder: the file name must do
            same = [i for i, s in enumerate(inputs) if Path(str(s)).name == want.name]
        if len(same) == 1:
            name = f"input_{same[0]}"
        else:  # made for other data
            log.warning("%s records label maps of %s, not of %s; using its stacked labels",
                        p, ", ".join(map(str, inputs)), data)
    d = read_npz(p, what, only=(name, "labels"))
    chosen = d.get(name, d.get("labels"))
    if chosen is None:
        raise InputError(f"{p} has no 'labels' array (N, H, W) uint8 of label maps; it has {sorted(read_npz(p, what))}")
    if chosen.ndim != 3 or len(chosen) != n:
        raise InputError(f"{p}: 'labels' {chosen.shape} does not match {data} ({n} slices): expected ({n}, H, W)")
    if not (np.issubdtype(chosen.dtype, np.integer) or chosen.dtype == bool):
        raise InputError(f"{p}: labels are {chosen.dtype}; label maps are integers 0-3 (uint8)")
    low, high = (int(chosen.min()), int(chosen.max())) if chosen.size else (0, 0)
    if low < 0 or high >= NUM_CLASSES:
        raise InputError(f"{p}: label value {low if low < 0 else high} is not in the vocabulary (0-3)")
    return chosen.astype(np.uint8, copy=False)


# ---------------------------------------------------------------- scores
def _group_key(g: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(\d+)$", g)
    return (m.group(1), int(m.group(2))) if m else (g, -1)


class GroupedMetrics:
    """MetricAccumulator over all slices and per group (case)."""

    def __init__(self, regions: Iterable[str] = tuple(REGIONS)) -> None:
        self.regions = tuple(regions)
        self.all = MetricAccumulator(self.regions)
        self.groups: dict[str, MetricAccumulator] = {}

    def add(self, group: str, name: str, pred: np.ndarray, truths: dict[str, Optional[np.ndarray]]) -> None:
        self.all.add(name, pred, truths)
        self.groups.setdefault(group, MetricAccumulator(self.regions)).add(name, pred, truths)

    def summary(self) -> dict[str, dict]:
        return self.all.summary()

    def by_group(self) -> dict[str, dict]:
        return {g: self.groups[g].summary() for g in sorted(self.groups, key=_group_key)}


def label_agreement(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], inputs: Sequence[SliceInput],
                    regions: Iterable[str] = tuple(REGIONS)) -> dict[str, Any]:
    """Scores of label maps against other label maps (e.g. a level vs its pseudo-labels)."""
    gm = GroupedMetrics(regions)
    for pred, ref, inp in zip(preds, refs, inputs):
        for j in range(len(inp)):
            gm.add(inp.groups[j], inp.names[j], pred[j], {r: region_mask(ref[j], r) for r in gm.regions})
    return {"all": gm.summary(), "by_group": gm.by_group()}


# ---------------------------------------------------------------- the run
@dataclass
class SelfTrainResult:
    out_dir: Path
    checkpoints: list[Path] = field(default_factory=list)  # best.pt of levels 1..n
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.json of levels 0..n
    skipped: list[str] = field(default_factory=list)  # stages found finished


def check_config(cfg: SelfTrainConfig) -> None:
    """Raise InputError for settings that cannot work."""
    problems = []
    if cfg.levels < 1:
        problems.append(f"levels must be >= 1 (got {cfg.levels})")
    for name in ("level1_lr", "level2_lr"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            problems.append(f"{name} must be a positive number (got {v})")
    for name in ("level1_epochs", "level2_epochs", "batch_size", "base_filters"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.steps_per_epoch < 0:
        problems.append(f"steps_per_epoch must be >= 0 (0: one pass over the slices; got {cfg.steps_per_epoch})")
    if cfg.crop < 16:
        problems.append(f"crop must be at least 16 pixels (got {cfg.crop})")
    if cfg.frozen_layers < 0:
        problems.append(f"frozen_layers must be >= 0 (got {cfg.frozen_layers})")
    elif cfg.levels >= 2 and cfg.frozen_layers and cfg.base_filters >= 1:  # found now, not after level 1
        import torch

        from .network import DRSegUNet
        from .training import weight_layers

        with torch.device("meta"):  # the layers without their weights' memory or initialisation
            n_layers = len(weight_layers(DRSegUNet(NetworkConfig(base_filters=cfg.base_filters))))
        if cfg.frozen_layers >= n_layers:
            problems.append(f"frozen_layers {cfg.frozen_layers} leaves level 2 nothing to train: the network has "
                            f"{n_layers} layers with weights")
    if cfg.loss not in ("ce", "ce+dice"):
        problems.append(f"loss must be 'ce' or 'ce+dice' (got {cfg.loss!r})")
    if cfg.lr_schedule not in ("constant", "cosine"):
        problems.append(f"lr_schedule must be 'constant' or 'cosine' (got {cfg.lr_schedule!r})")
    if problems:
        raise InputError("bad self-training settings: " + "; ".join(problems))


def _input_identity(path: str) -> dict[str, Any]:
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"path": str(p.resolve()), "files": len(files), "bytes": sum(f.stat().st_size for f in files),
            "mtime_ns": max((f.stat().st_mtime_ns for f in files), default=0)}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _prefixed(progress: Optional[ProgressCallback], level: int) -> Optional[ProgressCallback]:
    if progress is None:
        return None

    def cb(stage: str, step: int, total: int, message: str = "", **info: Any) -> None:
        progress(stage, step, total, f"level {level}: {message}" if message else f"level {level}", level=level, **info)

    return cb


def level_train_config(cfg: SelfTrainConfig, level: int, n_slices: int) -> TrainConfig:
    """The TrainConfig of a level (1: from scratch; >= 2: fine-tuning, frozen layers)."""
    first = level == 1
    steps = cfg.steps_per_epoch or max(1, math.ceil(n_slices / cfg.batch_size))
    return TrainConfig(epochs=cfg.level1_epochs if first else cfg.level2_epochs, steps_per_epoch=steps,
                       batch_size=cfg.batch_size, crop=cfg.crop, lr=cfg.level1_lr if first else cfg.level2_lr,
                       loss=cfg.loss, seed=cfg.seed + level - 1, frozen_layers=0 if first else cfg.frozen_layers,
                       lr_schedule=cfg.lr_schedule, val_every=1)


def predict_labels(checkpoint: Path, inputs: Sequence[SliceInput], device: str = "auto", batch_size: int = 8,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCheck] = None) -> list[np.ndarray]:
    """Argmax labels (n_i, H, W) uint8 of a checkpoint on every slice of every input."""
    from .inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device, batch_size=batch_size)
    total, done = sum(len(i) for i in inputs), 0
    out = []
    for inp in inputs:
        labels = np.zeros(inp.hu.shape, dtype=np.uint8)
        for start in range(0, len(inp), 4 * batch_size):
            check_cancel(cancel)
            stop = min(start + 4 * batch_size, len(inp))
            # CT with a geometry: at the working pixel size.
            labels[start:stop] = np.stack(predictor.predict_slices(list(inp.hu[start:stop]), inp.spacing,
                                                                   eight_bit=inp.eight_bit))
            done += stop - start
            report(progress, "predict", done, total, f"{done}/{total} slices")
        out.append(labels)
    return out


def stage_keys(config: SelfTrainConfig, data: Sequence[SliceInput], n_inputs: int,
               identities: Sequence[dict[str, Any]], lung_cfgs: Sequence[dict[str, Any]],
               eight_bit: EightBitConfig, pseudo: PseudoLabelConfig) -> list[str]:
    """``state.json``'s key of each stage, level 0 to ``config.levels``: a hash of every setting
    and input it depends on, and of the previous stage's key (module docstring, Resuming).

    ``data``: the inputs then the extras (``read_slices``); ``identities`` and ``lung_cfgs``
    per item of ``data``; the first ``n_inputs`` are pseudo-labelled at level 0."""
    keys = [_key("level0", identities[:n_inputs], to_dict(eight_bit), lung_cfgs[:n_inputs], to_dict(pseudo))]
    for level in range(1, config.levels + 1):
        first = level == 1
        settings = {"lr": config.level1_lr if first else config.level2_lr,
                    "epochs": config.level1_epochs if first else config.level2_epochs,
                    "frozen_layers": 0 if first else config.frozen_layers,
                    **{k: getattr(config, k) for k in ("steps_per_epoch", "batch_size", "crop", "loss", "seed",
                                                       "base_filters")}}
        if config.lr_schedule != "constant":
            settings["lr_schedule"] = config.lr_schedule  # absent for the default: older runs keep their keys
        if any(d.spacing is not None for d in data):
            settings["pixel_mm"] = InferenceConfig.pixel_mm  # part of the key only where it applies
        if any(d.eight_bit for d in data):
            # Labels of 8-bit slices are cleared outside a body found at Otsu's level
            # (inference.restrict_to_body); levels made with the -500 rule are redone.
            settings["body_8bit"] = "otsu"
        keys.append(_key(f"level{level}", keys[-1], settings, identities[n_inputs:] if first else None))
    return keys


def stage_outputs(folder: Path, key: str, inputs: Sequence[SliceInput],
                  checkpoint: bool) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The label maps and metrics a finished stage left in ``folder``, checked before they are
    reused: one label array per input, of its slices' shape, with vocabulary values; metrics
    a JSON object; with ``checkpoint``, a ``best.pt`` that loads and was trained for this
    stage (its ``selftrain_key`` is ``key``). InputError or CheckpointError otherwise."""
    from .checkpoint import load_checkpoint

    try:
        _, maps = load_label_maps(folder / "labels.npz")
    except InputError as e:
        raise InputError(f"{folder / 'labels.npz'} cannot be read ({e})") from None
    if len(maps) != len(inputs) or any(m.shape != d.hu.shape for m, d in zip(maps, inputs)):
        raise InputError(f"{folder / 'labels.npz'} holds label maps of {[m.shape for m in maps]}, "
                         f"not of the inputs' {[d.hu.shape for d in inputs]}")
    if any(m.size and (int(m.min()) < 0 or int(m.max()) >= NUM_CLASSES) for m in maps):
        raise InputError(f"{folder / 'labels.npz'} has label values outside the vocabulary (0-{NUM_CLASSES - 1})")
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder / 'metrics.json'} cannot be read ({type(e).__name__})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{folder / 'metrics.json'} is not a metrics record")
    if checkpoint:
        made_for = load_checkpoint(folder / "best.pt").fingerprint.get("selftrain_key")
        if made_for != key:
            raise InputError(f"{folder / 'best.pt'} was not trained by this stage (its key {made_for}, not {key})")
    return list(maps), metrics


def run_selftrain(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    config: SelfTrainConfig = SelfTrainConfig(),
    *,
    extras: Sequence[str | Path] = (),
    eight_bit: EightBitConfig = EightBitConfig(),
    lung: LungConfig = LungConfig(),
    pseudo: PseudoLabelConfig = PseudoLabelConfig(),
    device: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCheck] = None,
) -> SelfTrainResult:
    """Pseudo-labels, then ``config.levels`` levels of recursive training (module docstring).

    Args:
        inputs: CT volumes in HU and/or ``.npz`` files of 8-bit slices (pseudo-labelled at level 0).
        out_dir: folder for ``state.json`` and ``level0``, ``level1``, ...
        config: levels, learning rates, epochs, crops (SelfTrainConfig).
        extras: more unlabelled inputs, first labelled by level 1's predictions.
        eight_bit: the 8-bit → approx. HU rule for ``.npz`` slices.
        lung: lung-extraction constants; ``lung.threshold_method`` "auto" (default)
            uses Otsu's threshold for 8-bit slices and ``lung.threshold_hu`` for HU
            volumes; "thesis" uses ``config.eight_bit_lung_threshold_hu`` for 8-bit
            slices (``lung_config_for``).
        pseudo: k-means and morphology constants.
        device: torch device for training and prediction.
        progress: called as ``progress(stage, step, total, message, level=K, ...)``.
        cancel: returns True to stop (raises Cancelled; a rerun resumes).

    Returns:
        SelfTrainResult with each level's checkpoint and metrics.
    """
    from .checkpoint import load_checkpoint
    from .network import DRSegUNet
    from .training import freeze_first_layers, train

    check_config(config)
    if not inputs:
        raise InputError("no inputs: give CT volumes in HU or .npz files of 8-bit slices")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    paths = [str(p) for p in inputs] + [str(p) for p in extras]
    resolved = [str(Path(p).resolve()) for p in paths]
    dupes = sorted({p for p in resolved if resolved.count(p) > 1})
    if dupes:
        raise InputError(f"an input is given twice (inputs and --extra must differ): {dupes[0]}")
    data = [read_slices(p, eight_bit) for p in paths]
    for d in data[len(inputs):]:
        d.extra = True
    main = data[: len(inputs)]
    log.info("self-training on %d slices (%d inputs) plus %d extra slices", sum(map(len, main)), len(main),
             sum(len(d) for d in data if d.extra))

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state: dict[str, Any] = {"format": STATE_FORMAT, "stages": {}}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
            assert state.get("format") == STATE_FORMAT and isinstance(state.get("stages"), dict)
        except (ValueError, AssertionError):
            raise InputError(f"{state_path} is not a self-training state file; use an empty output folder") from None

    identities = [_input_identity(p) for p in paths]
    lung_cfgs = [to_dict(lung_config_for(d, config, lung)) for d in data]
    keys = stage_keys(config, data, len(inputs), identities, lung_cfgs, eight_bit, pseudo)

    def reuse(stage: str, key: str, labelled: Sequence[SliceInput],
              checkpoint: bool) -> Optional[tuple[list[np.ndarray], dict[str, Any]]]:
        """A stage finished earlier with these settings: its checked labels and metrics; None: do it."""
        rec = state["stages"].get(stage)
        if redone or not (isinstance(rec, dict) and rec.get("key") == key):
            return None
        try:
            return stage_outputs(out / stage, key, labelled, checkpoint)
        except (InputError, CheckpointError) as e:
            log.warning("%s finished earlier, but its files cannot be reused (%s); doing it again", stage, e)
            return None

    def mark(stage: str, key: str, seconds: float) -> None:
        state["stages"][stage] = {"key": key, "seconds": round(seconds, 1),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        state["inputs"], state["extras"] = [str(p) for p in inputs], [str(p) for p in extras]
        state["config"] = to_dict(config)
        _write_json(state_path, state)

    result = SelfTrainResult(out)
    total_stages = config.levels + 1
    redone = False  # once a stage is done again, every later one is too (it was built on the old one)

    # ---- level 0: pseudo-labels of the inputs
    stage = "level0"
    earlier = reuse(stage, keys[0], main, checkpoint=False)
    if earlier:
        log.info("level 0: finished earlier, skipped")
        result.skipped.append(stage)
        prev, metrics = earlier
        result.metrics.append(metrics)
    else:
        report(progress, "level", 0, total_stages, "level 0: lung extraction and k-means pseudo-labels")
        t0 = time.time()
        prev = []
        for d, lcfg in zip(main, lung_cfgs):
            lungs = lung_masks(d, LungConfig(**lcfg), _prefixed(progress, 0), cancel)
            if not lungs.any():
                log.warning("no lung found in %s (%d slices): it adds nothing to the training "
                            "(is it a chest CT in HU?)", d.path, len(d))
            prev.append(pseudo_labels(d, lungs, pseudo, _prefixed(progress, 0), cancel))
        if not any(p.any() for p in prev):
            raise InputError(f"no slice has lung in any input ({', '.join(Path(d.path).name for d in main)}); "
                             "nothing to train on (are they chest CT in HU? is the lung threshold right for them?)")
        save_label_maps(out / stage / "labels.npz", [d.path for d in main], prev)
        # Per input, then summed: inputs may have slices of different sizes.
        lung_px = sum(int(np.isin(p, REGIONS["lung"]).sum()) for p in prev)
        metrics = {"level": 0, "what": "lung extraction + k-means pseudo-labels (thesis §4.4.1)",
                   "n_slices": sum(len(p) for p in prev),
                   "n_slices_with_lung": sum(int(p.reshape(len(p), -1).any(axis=1).sum()) for p in prev),
                   "ggo_fraction_of_lung": float(sum(int((p == 1).sum()) for p in prev) / max(1, lung_px)),
                   "lung_configs": lung_cfgs[: len(inputs)], "pseudolabel_config": to_dict(pseudo),
                   "eight_bit": to_dict(eight_bit), "seconds": round(time.time() - t0, 1)}
        _write_json(out / stage / "metrics.json", metrics)
        result.metrics.append(metrics)
        mark(stage, keys[0], time.time() - t0)
        redone = True
    level0 = prev

    # ---- levels 1..n
    for level in range(1, config.levels + 1):
        stage = f"level{level}"
        folder = out / stage
        trained_on = main if level == 1 else data  # extras have labels from level 1 on
        earlier = reuse(stage, keys[level], data, checkpoint=True)
        if earlier:
            log.info("level %d: finished earlier, skipped", level)
            result.skipped.append(stage)
            prev, metrics = earlier
            result.checkpoints.append(folder / "best.pt")
            result.metrics.append(metrics)
            continue
        report(progress, "level", level, total_stages, f"level {level}: training")
        t0 = time.time()
        # CT with a geometry trains at the working pixel size, as segment applies the model
        # (8-bit slices have no spacing and stay on their own grid).
        samples = [resample_sample(Sample(d.hu[j], labels_to_allowed(lab[j]), d.names[j], d.groups[j], d.eight_bit),
                                   d.spacing, InferenceConfig.pixel_mm)
                   for d, lab in zip(trained_on, prev) for j in range(len(d)) if lab[j].any()]
        if not samples:
            raise InputError(f"level {level}: no slice has lung in the level-{level - 1} labels; nothing to train on "
                             "(is the lung threshold right for these images?)")
        tcfg = level_train_config(config, level, len(samples))
        init = None if level == 1 else load_checkpoint(out / f"level{level - 1}" / "best.pt")
        mcfg = ModelConfig(network=NetworkConfig(base_filters=config.base_filters), eight_bit=eight_bit)
        frozen = freeze_first_layers(DRSegUNet(init.config.network if init else mcfg.network), tcfg.frozen_layers)
        res = train(samples, [], folder, tcfg, mcfg, init=init, device=device, progress=_prefixed(progress, level),
                    cancel=cancel, fingerprint={"inputs": identities[: len(trained_on)], "selftrain_key": keys[level]},
                    extra={"name": f"selftrain level {level}", "level": level, "frozen": frozen})
        t_train = time.time() - t0
        report(progress, "level", level, total_stages, f"level {level}: predicting labels")
        t1 = time.time()
        labels = predict_labels(res.best_path, data, device, progress=_prefixed(progress, level), cancel=cancel)
        save_label_maps(folder / "labels.npz", [d.path for d in data], labels)
        metrics = {"level": level, "init": None if level == 1 else f"level{level - 1}/best.pt",
                   "train_config": to_dict(tcfg), "frozen_layers": frozen, "n_train_slices": len(samples),
                   "n_predicted_slices": sum(map(len, data)), "history": res.history,
                   "seconds_train": round(t_train, 1), "seconds_predict": round(time.time() - t1, 1),
                   "vs_training_labels": label_agreement(labels[: len(trained_on)], prev, trained_on),
                   "vs_pseudolabels": label_agreement(labels[: len(main)], level0, main)}
        _write_json(folder / "metrics.json", metrics)
        result.metrics.append(metrics)
        result.checkpoints.append(res.best_path)
        mark(stage, keys[level], time.time() - t0)
        redone = True
        log.info("level %d: trained on %d slices in %.0f s; labels agree with its training labels: infection Dice %s",
                 level, len(samples), t_train,
                 _fmt(metrics["vs_training_labels"]["all"].get("infection", {}).get("mean", {}).get("dice")))
        prev = labels
    return result


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"
