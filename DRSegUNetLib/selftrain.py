"""Weakly supervised self-learning, thesis §4.4 and §5.5: pseudo-labels → level 1 → level 2 …

No manual annotation is used. The stages, each a folder of the output folder:

- ``level0``: lung extraction and k-means pseudo-labels (``weak.lung_masks``,
  ``weak.pseudo_labels``)
  for every slice of the (labelled-by-pseudo-labels) inputs.
- ``level1``: :func:`training.train` from scratch on the level-0 labels
  (SelfTrainConfig.level1_*); then level 1 predicts labels for the same slices and
  for the ``extra`` (unlabelled) slices.
- ``levelK`` (K >= 2): ``train`` from level K-1's checkpoint with the first
  ``frozen_layers`` layers frozen, at ``level2_lr``, on the labels level K-1
  predicted (inputs and extras); then it predicts labels for all slices.

Every level folder holds ``labels.npz`` (``labelmaps.save_label_maps``) and
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

Inputs (``slices.read_slices``): CT volumes in HU (any format ``imageio.read_ct`` reads), sliced
axially in radiological display orientation, or ``.npz`` files of 8-bit slices (``ct_uint8``
(N, H, W), like COVID-19-CT-Seg) mapped to approximate HU with EightBitConfig and
lung-extracted with Otsu's threshold per slice (``LungConfig.threshold_method`` "auto";
with "thesis", at ``SelfTrainConfig.eight_bit_lung_threshold_hu``; ``weak.lung_config_for``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .config import (SELFTRAIN_LOSSES, EightBitConfig, InferenceConfig, LrSchedule, LungConfig, ModelConfig,
                     NetworkConfig, PseudoLabelConfig, SelfTrainConfig, TrainConfig, to_dict)
from .data import Sample, labels_to_allowed, resample_sample
from .errors import CheckpointError, InputError
from .labelmaps import load_label_maps, save_label_maps
from .metrics import label_agreement
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .slices import SliceInput, read_slices
from .vocabulary import GGO, INFECTION_NAME, LUNG_NAME, NUM_CLASSES, REGIONS
from .weak import lung_config_for, lung_masks, pseudo_labels

log = logging.getLogger(__name__)

STATE_FORMAT = "drsegunet-selftrain/2"  # /1 made its stage keys otherwise: such a folder is refused, not resumed


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
    if cfg.loss not in SELFTRAIN_LOSSES:
        problems.append(f"loss must be {' or '.join(map(repr, SELFTRAIN_LOSSES))} (got {cfg.loss!r})")
    if cfg.lr_schedule not in LrSchedule.values():
        problems.append(f"lr_schedule must be {' or '.join(map(repr, LrSchedule.values()))} (got {cfg.lr_schedule!r})")
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
                                                       "base_filters", "lr_schedule")}}
        if any(d.spacing is not None for d in data):
            settings["pixel_mm"] = InferenceConfig.pixel_mm  # part of the key only where it applies
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
            slices (``weak.lung_config_for``).
        pseudo: k-means and morphology constants.
        device: torch device for training and prediction.
        progress: called as ``progress(stage, step, total, message, level=K, ...)``.
        cancel: returns True to stop (raises Cancelled; a rerun resumes).

    Returns:
        SelfTrainResult with each level's checkpoint and metrics.
    """
    check_config(config)
    if not inputs:
        raise InputError("no inputs: give CT volumes in HU or .npz files of 8-bit slices")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    paths = [str(p) for p in inputs] + [str(p) for p in extras]
    data = _read_inputs(paths, len(inputs), eight_bit)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, _read_state(out / "state.json"), config, paths, data, len(inputs), eight_bit, device, progress,
               cancel)
    identities = [_input_identity(p) for p in paths]
    lung_cfgs = [to_dict(lung_config_for(d, config, lung)) for d in data]
    keys = stage_keys(config, data, len(inputs), identities, lung_cfgs, eight_bit, pseudo)
    result = SelfTrainResult(out)
    level0 = labels = run.stage(result, 0, keys[0], partial(_make_level0, run, lung_cfgs[: len(inputs)], pseudo))
    for level in range(1, config.levels + 1):
        labels = run.stage(result, level, keys[level],
                           partial(_train_level, run, level, keys[level], labels, level0, identities))
    return result


@dataclass
class _Run:
    """What every stage of one run shares: the output folder and its ``state.json``, the
    settings, the slices (the inputs, then the extras) and whether a stage was done again."""

    out: Path
    state: dict[str, Any]
    config: SelfTrainConfig
    paths: list[str]  # as given: the inputs, then the extras
    data: list[SliceInput]
    n_inputs: int
    eight_bit: EightBitConfig
    device: str
    progress: Optional[ProgressCallback]
    cancel: Optional[CancelCheck]
    redone: bool = False  # once a stage is done again, every later one is too (it was built on the old one)

    @property
    def inputs(self) -> list[SliceInput]:
        return self.data[: self.n_inputs]

    def stage(self, result: SelfTrainResult, level: int, key: str,
              make: Callable[[], tuple[list[np.ndarray], dict[str, Any]]]) -> list[np.ndarray]:
        """Level ``level``'s label maps: reused when it finished earlier with ``key``, else
        made by ``make`` (which writes its files) and marked finished. Adds to ``result``."""
        stage = f"level{level}"
        earlier = self._reuse(stage, key, self.inputs if level == 0 else self.data, checkpoint=level > 0)
        if earlier:
            log.info("level %d: finished earlier, skipped", level)
            result.skipped.append(stage)
            labels, metrics = earlier
        else:
            t0 = time.time()
            labels, metrics = make()
            self._mark(stage, key, time.time() - t0)
        if level > 0:
            result.checkpoints.append(self.out / stage / "best.pt")
        result.metrics.append(metrics)
        return labels

    def _reuse(self, stage: str, key: str, labelled: Sequence[SliceInput],
               checkpoint: bool) -> Optional[tuple[list[np.ndarray], dict[str, Any]]]:
        """A stage finished earlier with these settings: its checked labels and metrics; None: do it."""
        rec = self.state["stages"].get(stage)
        if self.redone or not (isinstance(rec, dict) and rec.get("key") == key):
            return None
        try:
            return stage_outputs(self.out / stage, key, labelled, checkpoint)
        except (InputError, CheckpointError) as e:
            log.warning("%s finished earlier, but its files cannot be reused (%s); doing it again", stage, e)
            return None

    def _mark(self, stage: str, key: str, seconds: float) -> None:
        self.state["stages"][stage] = {"key": key, "seconds": round(seconds, 1),
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.state["inputs"], self.state["extras"] = self.paths[: self.n_inputs], self.paths[self.n_inputs:]
        self.state["config"] = to_dict(self.config)
        _write_json(self.out / "state.json", self.state)
        self.redone = True


def _read_inputs(paths: Sequence[str], n_inputs: int, eight_bit: EightBitConfig) -> list[SliceInput]:
    """The slices of the inputs, then of the extras (the paths after the first ``n_inputs``:
    ``extra`` set); InputError for a path given twice."""
    resolved = [str(Path(p).resolve()) for p in paths]
    dupes = sorted({p for p in resolved if resolved.count(p) > 1})
    if dupes:
        raise InputError(f"an input is given twice (inputs and --extra must differ): {dupes[0]}")
    data = [read_slices(p, eight_bit) for p in paths]
    for d in data[n_inputs:]:
        d.extra = True
    log.info("self-training on %d slices (%d inputs) plus %d extra slices", sum(map(len, data[:n_inputs])),
             n_inputs, sum(len(d) for d in data if d.extra))
    return data


def _read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of an earlier run in the output folder, or a new state."""
    if not path.is_file():
        return {"format": STATE_FORMAT, "stages": {}}
    try:
        state = json.loads(path.read_text())
        assert state.get("format") == STATE_FORMAT and isinstance(state.get("stages"), dict)
    except (ValueError, AssertionError):
        raise InputError(f"{path} is not a state file of this version's self-training ({STATE_FORMAT}); "
                         "use an empty output folder") from None
    return state


def _make_level0(run: _Run, lung_cfgs: Sequence[dict[str, Any]],
                 pseudo: PseudoLabelConfig) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Lung extraction and k-means pseudo-labels of the inputs; writes ``level0``'s files."""
    report(run.progress, "level", 0, run.config.levels + 1, "level 0: lung extraction and k-means pseudo-labels")
    t0 = time.time()
    main, labels = run.inputs, []
    for d, lcfg in zip(main, lung_cfgs):
        lungs = lung_masks(d, LungConfig(**lcfg), _prefixed(run.progress, 0), run.cancel)
        if not lungs.any():
            log.warning("no lung found in %s (%d slices): it adds nothing to the training "
                        "(is it a chest CT in HU?)", d.path, len(d))
        labels.append(pseudo_labels(d, lungs, pseudo, _prefixed(run.progress, 0), run.cancel))
    if not any(p.any() for p in labels):
        raise InputError(f"no slice has lung in any input ({', '.join(Path(d.path).name for d in main)}); "
                         "nothing to train on (are they chest CT in HU? is the lung threshold right for them?)")
    folder = run.out / "level0"
    save_label_maps(folder / "labels.npz", [d.path for d in main], labels)
    # Per input, then summed: inputs may have slices of different sizes.
    lung_px = sum(int(np.isin(p, REGIONS[LUNG_NAME]).sum()) for p in labels)
    metrics = {"level": 0, "what": "lung extraction + k-means pseudo-labels (thesis §4.4.1)",
               "n_slices": sum(len(p) for p in labels),
               "n_slices_with_lung": sum(int(p.reshape(len(p), -1).any(axis=1).sum()) for p in labels),
               "ggo_fraction_of_lung": float(sum(int((p == GGO).sum()) for p in labels) / max(1, lung_px)),
               "lung_configs": list(lung_cfgs), "pseudolabel_config": to_dict(pseudo),
               "eight_bit": to_dict(run.eight_bit), "seconds": round(time.time() - t0, 1)}
    _write_json(folder / "metrics.json", metrics)
    return labels, metrics


def _train_level(run: _Run, level: int, key: str, prev: list[np.ndarray], level0: list[np.ndarray],
                 identities: Sequence[dict[str, Any]]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Level ``level`` (>= 1): trained on the labels ``prev`` of the level before, then it labels
    every slice; writes the level's folder (checkpoints, labels, metrics)."""
    from .checkpoint import load_checkpoint
    from .network import DRSegUNet
    from .training import freeze_first_layers, train

    folder = run.out / f"level{level}"
    trained_on = run.inputs if level == 1 else run.data  # extras have labels from level 1 on
    report(run.progress, "level", level, run.config.levels + 1, f"level {level}: training")
    t0 = time.time()
    samples = _training_samples(trained_on, prev)
    if not samples:
        raise InputError(f"level {level}: no slice has lung in the level-{level - 1} labels; nothing to train on "
                         "(is the lung threshold right for these images?)")
    tcfg = level_train_config(run.config, level, len(samples))
    init = None if level == 1 else load_checkpoint(run.out / f"level{level - 1}" / "best.pt")
    mcfg = ModelConfig(network=NetworkConfig(base_filters=run.config.base_filters), eight_bit=run.eight_bit)
    frozen = freeze_first_layers(DRSegUNet(init.config.network if init else mcfg.network), tcfg.frozen_layers)
    res = train(samples, [], folder, tcfg, mcfg, init=init, device=run.device, progress=_prefixed(run.progress, level),
                cancel=run.cancel, fingerprint={"inputs": identities[: len(trained_on)], "selftrain_key": key},
                extra={"name": f"selftrain level {level}", "level": level, "frozen": frozen})
    t_train = time.time() - t0
    report(run.progress, "level", level, run.config.levels + 1, f"level {level}: predicting labels")
    t1 = time.time()
    labels = predict_labels(res.best_path, run.data, run.device, progress=_prefixed(run.progress, level),
                            cancel=run.cancel)
    save_label_maps(folder / "labels.npz", [d.path for d in run.data], labels)
    metrics = {"level": level, "init": None if level == 1 else f"level{level - 1}/best.pt",
               "train_config": to_dict(tcfg), "frozen_layers": frozen, "n_train_slices": len(samples),
               "n_predicted_slices": sum(map(len, run.data)), "history": res.history,
               "seconds_train": round(t_train, 1), "seconds_predict": round(time.time() - t1, 1),
               "vs_training_labels": label_agreement(labels[: len(trained_on)], prev, trained_on),
               "vs_pseudolabels": label_agreement(labels[: run.n_inputs], level0, run.inputs)}
    _write_json(folder / "metrics.json", metrics)
    log.info("level %d: trained on %d slices in %.0f s; labels agree with its training labels: infection Dice %s",
             level, len(samples), t_train,
             _fmt(metrics["vs_training_labels"]["all"].get(INFECTION_NAME, {}).get("mean", {}).get("dice")))
    return labels, metrics


def _training_samples(inputs: Sequence[SliceInput], labels: Sequence[np.ndarray]) -> list[Sample]:
    """The slices with some lung in their labels, as exclusive training targets; CT with a
    geometry at the working pixel size, as segment applies the model (8-bit slices have no
    spacing and stay on their own grid)."""
    return [resample_sample(Sample(d.hu[j], labels_to_allowed(lab[j]), d.names[j], d.groups[j], d.eight_bit),
                            d.spacing, InferenceConfig.pixel_mm)
            for d, lab in zip(inputs, labels) for j in range(len(d)) if lab[j].any()]


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"
