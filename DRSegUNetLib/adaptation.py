"""Level 2: fine-tune a model on a user's accepted corrections, and gate the result.

The loop a radiologist runs -- segment, correct a few slices, accept, fine-tune, segment
again -- must make the next segmentation better and never silently worse. So a fine-tune:

1. trains on the accepted slices at the model's working pixel size, with every BatchNorm
   layer keeping the statistics of the model it starts from (a few crops are no estimate
   of them), mixing in *replay* slices of the model's own training data (shipped beside
   the bundled model) so it does not forget what it knew;
2. holds some corrected slices out (one in ``holdout_every``) and scores old and new model
   on them and on a *reference* set shipped with the model, which no fine-tune trains on;
3. is made active only when no reference region drops by more than ``tolerance`` and
   the held-out corrections do not get worse. Otherwise the new version is still saved
   (the user may make it active) and both numbers are reported.

The thesis's level 2 (first two layers frozen, learning rate 9.8e-6, BatchNorm
re-estimated, no replay) stays available as the ``thesis`` preset.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .checkpoint import Checkpoint
from .config import BatchNormMode, Bf16, EightBitConfig, FineTuneConfig, Loss, ReplayLoss, Trainable
from .data import Sample, labels_to_allowed, read_npz, resample_sample
from .errors import InputError
from .metrics import MetricAccumulator
from .preprocessing import eight_bit_to_hu
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .vocabulary import REGIONS

REPLAY = "replay"
REFERENCE = "reference"
CORRECTIONS = "corrections"
# Regions the gate compares by default (FineTuneConfig.gate_regions).
GATED_REGIONS = FineTuneConfig.gate_regions


PRESETS: dict[str, FineTuneConfig] = {
    "default": FineTuneConfig(),
    # Thesis §4.4.2 / §5.5: first two layers frozen, 9.8e-6, BatchNorm statistics
    # re-estimated from each batch (Keras' training mode), no replay.
    "thesis": FineTuneConfig(steps=0, epochs=10, lr=9.8e-6, frozen_layers=2, bn=BatchNormMode.TRAIN.value,
                             loss=Loss.CE.value, replay_fraction=0.0, alphas=(1.0,), soup=1),
}


def preset(name: str, **overrides: Any) -> FineTuneConfig:
    """A named preset (``default`` or ``thesis``) with ``overrides`` (None values ignored)."""
    if name not in PRESETS:
        raise InputError(f"unknown fine-tuning preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------- shipped data
@dataclass
class AdaptationData:
    """Replay and reference slices shipped beside a model (see :func:`load_adaptation_data`)."""

    replay: list[Sample] = field(default_factory=list)
    reference: list[Sample] = field(default_factory=list)
    spacing: dict[str, Optional[tuple[float, float]]] = field(default_factory=dict)  # sample name -> (row, col) mm

    def without_groups(self, groups: Sequence[str]) -> "AdaptationData":
        """The same sets without slices of ``groups`` (e.g. the volume a benchmark adapts to)."""
        keep = lambda ss: [s for s in ss if s.group not in set(groups)]  # noqa: E731
        return AdaptationData(keep(self.replay), keep(self.reference), self.spacing)


def adaptation_data_path(checkpoint_path: str | Path) -> Path:
    """``model.pt`` → ``model.adapt.npz`` beside it."""
    p = Path(checkpoint_path)
    return p.with_name(p.name[: -len(p.suffix)] + ".adapt.npz" if p.suffix else p.name + ".adapt.npz")


def adaptation_data_for(checkpoint_path: str | Path) -> Path:
    """The replay and reference slices a fine-tune from ``checkpoint_path`` uses: those beside it
    (:func:`adaptation_data_path`), else the bundled model's."""
    from . import default_model_path

    path = adaptation_data_path(checkpoint_path)
    return path if path.exists() else adaptation_data_path(default_model_path())


def write_adaptation_data(path: str | Path, slices: Sequence[dict[str, Any]]) -> None:
    """Write slices ``{"ct_uint8" or "hu", "allowed", "name", "group", "role", "spacing"}``
    into one ``.npz`` (``role``: ``replay`` or ``reference``; ``spacing``: (row, col) mm or None)."""
    from .atomic import atomic_write_bytes
    import io

    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, s in enumerate(slices):
        if s["role"] not in (REPLAY, REFERENCE):
            raise ValueError(f"role must be {REPLAY} or {REFERENCE}, not {s['role']!r}")
        if "ct_uint8" in s:
            arrays[f"ct{i}"] = np.asarray(s["ct_uint8"], np.uint8)
        else:
            arrays[f"hu{i}"] = np.round(np.asarray(s["hu"], np.float32)).astype(np.int16)
        arrays[f"allowed{i}"] = np.asarray(s["allowed"], np.uint8)
        meta.append({"name": s["name"], "group": s["group"], "role": s["role"],
                     "spacing": list(s["spacing"]) if s.get("spacing") else None})
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_adaptation_data(path: str | Path, eight_bit: EightBitConfig = EightBitConfig()) -> AdaptationData:
    """Replay and reference slices of a model; an empty set when ``path`` does not exist."""
    path = Path(path)
    out = AdaptationData()
    if not path.exists():
        return out
    d = read_npz(path, what="the model's replay and reference slices")
    try:
        meta = json.loads(str(d["meta"]))
        for i, m in enumerate(meta):
            eight = f"ct{i}" in d
            hu = eight_bit_to_hu(d[f"ct{i}"], eight_bit) if eight else d[f"hu{i}"].astype(np.float32)
            s = Sample(hu, d[f"allowed{i}"], str(m["name"]), str(m["group"]), eight)
            (out.replay if m["role"] == REPLAY else out.reference).append(s)
            out.spacing[s.name] = tuple(m["spacing"]) if m.get("spacing") else None  # type: ignore[assignment]
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path} is not a model's replay/reference file ({e})") from None
    return out


# --------------------------------------------------------------------------- scoring
def score_samples(predictor, samples: Sequence[Sample], spacing: dict[str, Optional[tuple[float, float]]],
                  regions: Sequence[str] = tuple(REGIONS)) -> dict[str, float]:
    """Mean Dice per region over the slices that decide it (regions no slice decides are left out)."""
    acc = MetricAccumulator(regions)
    for s in samples:
        labels = predictor.predict_slices([s.hu], spacing=spacing.get(s.name), eight_bit=s.eight_bit)[0]
        acc.add(s.name, labels, {r: s.region_truth(r) for r in regions})
    return {r: v["mean"]["dice"] for r, v in acc.summary().items() if v["mean"]["dice"] is not None}


@dataclass
class GateResult:
    """Old and new model on the reference set and the held-out corrections."""

    reference_before: dict[str, float]
    reference_after: dict[str, float]
    holdout_before: dict[str, float]
    holdout_after: dict[str, float]
    tolerance: float
    n_reference: int
    n_holdout: int
    alpha: float = 1.0  # share of the fine-tuned weights in the version scored (adaptation.interpolate)
    regions: tuple[str, ...] = GATED_REGIONS  # reference regions held within ``tolerance``

    @property
    def reasons(self) -> list[str]:
        """Why the new model must not become active (empty: it may)."""
        why = []
        for r in self.regions:
            if r in self.reference_before and r in self.reference_after:
                drop = self.reference_before[r] - self.reference_after[r]
                if drop > self.tolerance:
                    why.append(f"reference {r} Dice {self.reference_before[r]:.3f} -> {self.reference_after[r]:.3f}")
        if self.holdout_before and self.holdout_after:
            b, a = _mean(self.holdout_before), _mean(self.holdout_after)
            if a < b - self.tolerance:
                why.append(f"held-out corrected slices: mean Dice {b:.3f} -> {a:.3f}")
        return why

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "tolerance": self.tolerance, "alpha": self.alpha,
                "regions": list(self.regions),
                "reference": {"before": self.reference_before, "after": self.reference_after, "slices": self.n_reference},
                "holdout": {"before": self.holdout_before, "after": self.holdout_after, "slices": self.n_holdout}}

    def summary(self) -> str:
        """One line for a log or the panel: before → after per region."""
        parts = [f"{r} {self.reference_before[r]:.3f}->{self.reference_after[r]:.3f}"
                 for r in self.reference_before if r in self.reference_after]
        text = "reference " + ", ".join(parts) if parts else "no reference slices"
        if self.alpha != 1.0:
            text += f" (weights {self.alpha:g} fine-tuned)"
        if self.holdout_before and self.holdout_after:
            text += (f"; held-out corrections {_mean(self.holdout_before):.3f}->{_mean(self.holdout_after):.3f}"
                     f" ({self.n_holdout} slices)")
        return text


def _mean(d: dict[str, float]) -> float:
    return float(np.mean(list(d.values()))) if d else float("nan")


# --------------------------------------------------------------------------- fine-tuning
@dataclass
class CorrectionSlice:
    """One accepted slice as fine-tuning needs it (store.Correction carries more)."""

    ct_hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float]
    known: Optional[tuple[str, ...]]
    name: str
    source: str = ""
    slice_index: int = 0


def split_holdout(corrections: Sequence[CorrectionSlice], every: int) -> tuple[list[CorrectionSlice], list[CorrectionSlice]]:
    """(train, held out): of each source volume's slices in slice order, one in ``every``
    (the middle one of each run of ``every``) is held out; fewer than ``every`` slices of
    the volume: none (0 or 1 = none)."""
    if every <= 1:
        return list(corrections), []
    by_source: dict[str, list[CorrectionSlice]] = {}
    for c in corrections:
        by_source.setdefault(c.source, []).append(c)
    train_s, held = [], []
    for items in by_source.values():
        items = sorted(items, key=lambda c: c.slice_index)
        for i, c in enumerate(items):
            run_start = (i // every) * every
            if run_start + every <= len(items) and i == run_start + every // 2:
                held.append(c)
            else:
                train_s.append(c)
    return train_s, held


def correction_samples(corrections: Sequence[CorrectionSlice]) -> tuple[list[Sample], dict]:
    """Samples on the slices' own grid, and each one's (row, col) spacing in mm (by sample name)."""
    samples, spacing = [], {}
    for c in corrections:
        s = Sample(np.asarray(c.ct_hu, np.float32), labels_to_allowed(c.labels, c.known), c.name, CORRECTIONS)
        samples.append(s)
        spacing[c.name] = tuple(c.spacing)
    return samples, spacing


@dataclass
class FineTuneOutcome:
    checkpoint: Checkpoint
    gate: GateResult
    history: list[dict[str, Any]]
    n_train: int
    n_replay: int
    steps: int
    reference_cached: bool = False  # the starting model's reference scores were given, not computed


def _pixel_kl(new_logits, old_logits):
    """Per pixel KL(old || new) between the softmax distributions over dim 1."""
    import torch

    old = torch.log_softmax(old_logits.float(), dim=1)
    new = torch.log_softmax(new_logits.float(), dim=1)
    return (old.exp() * (old - new)).sum(dim=1)


def distillation_loss(new_logits, old_logits):
    """Mean over pixels of KL(old || new) between the class distributions (learning without forgetting)."""
    return _pixel_kl(new_logits, old_logits).mean()


def open_type_loss(new_logits, old_logits, allowed):
    """Where a lesion's type is open (allowed = {GGO, consolidation}), keep the starting model's
    split between the two: mean KL(old || new) of P(GGO | lesion) over those pixels."""
    from .data import bit
    from .vocabulary import CONSOLIDATION, GGO

    open_type = allowed == int(bit(GGO, CONSOLIDATION))
    if not bool(open_type.any()):
        return new_logits.sum() * 0.0
    pair = [GGO, CONSOLIDATION]
    return _pixel_kl(new_logits[:, pair], old_logits[:, pair])[open_type].mean()


# --------------------------------------------------------------------------- reference cache
REFERENCE_CACHE = "reference_scores.json"  # in the model store's folder
_CACHE_ENTRIES = 64


def reference_key(checkpoint_path: str | Path, data_path: str | Path, pixel_mm: Optional[float], device) -> str:
    """What a model's reference scores depend on: its weights, the reference slices, the
    working pixel and where it runs (bf16 on some CPUs, float32 elsewhere)."""
    import torch

    from .atomic import file_sha256
    from .device import resolve_device

    return "|".join([file_sha256(checkpoint_path), file_sha256(data_path), f"{pixel_mm}",
                     resolve_device(device).type, torch.__version__])


def cached_reference(cache: Path, key: str) -> Optional[dict[str, float]]:
    """The reference scores stored under ``key`` in ``cache`` (None: not there, or unreadable)."""
    try:
        entry = json.loads(Path(cache).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict) or not all(isinstance(v, (int, float)) for v in entry.values()):
        return None
    return {k: float(v) for k, v in entry.items()}


def remember_reference(cache: Path, key: str, scores: dict[str, float]) -> None:
    """Store ``scores`` under ``key`` (atomically; the oldest entries go past 64)."""
    from .atomic import atomic_write_bytes

    try:
        entries = json.loads(Path(cache).read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries.pop(key, None)
    entries[key] = {k: float(v) for k, v in scores.items()}
    while len(entries) > _CACHE_ENTRIES:
        entries.pop(next(iter(entries)))
    atomic_write_bytes(cache, json.dumps(entries, indent=1).encode("utf-8"))


def interpolate(start: dict, end: dict, alpha: float) -> dict:
    """Weights ``(1 - alpha) * start + alpha * end`` (BatchNorm counters taken from ``end``)."""
    return {k: (start[k] * (1 - alpha) + end[k] * alpha) if start[k].is_floating_point() else end[k] for k in start}


def _train_steps(model, init: Checkpoint, train_s: list[Sample], replay: list[Sample], config: FineTuneConfig,
                 device, progress: Optional[ProgressCallback], cancel: Optional[CancelCheck], steps: int,
                 channels_last: bool = False, done: int = 0, total: int = 0) -> list[dict]:
    """The fine-tuning loop: each step draws crops of the corrections and of the replay slices;
    the corrections train with ``config.loss``, the replay crops keep the starting model's
    predictions (``config.replay_loss``: "distill", or "labels" = their annotations).
    ``channels_last``: the model is in that layout (training.training_channels_last), and so
    are the crops and the starting model that the replay crops are held to. ``done`` of ``total``
    steps (all members of a soup) were taken before this call, for the progress report."""
    import torch

    from .preprocessing import normalize
    from .training import (AugmentConfig, PatchSampler, compute_loss, freeze_first_layers, set_train_mode,
                           training_autocast)

    torch.manual_seed(config.seed)
    total = max(total, done + steps)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    augment = AugmentConfig(rotate_deg=config.rotate_deg, scale=config.scale, foreground_fraction=config.foreground_fraction)
    n_replay = 0
    if replay and config.replay_fraction > 0:
        n_replay = min(config.batch_size - 1, max(1, round(config.batch_size * config.replay_fraction)))
    n_corr = config.batch_size - n_replay
    corr_sampler = PatchSampler(train_s, config.crop, augment, config.seed)
    replay_sampler = PatchSampler(replay, config.crop, augment, config.seed + 1) if n_replay else None
    frozen = freeze_first_layers(model, config.frozen_layers)
    if config.trainable == Trainable.BATCHNORM:
        for m in model.modules():
            if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    elif config.trainable != Trainable.ALL:
        raise InputError(f"unknown trainable {config.trainable!r}; use all or batchnorm")
    old = None
    if (n_replay and config.replay_loss == ReplayLoss.DISTILL) or config.keep_open_type:
        old = init.build_model().to(device, memory_format=layout).eval()
        for p in old.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    history = []
    pre = init.config.preprocess
    for step in range(1, steps + 1):
        check_cancel(cancel)
        set_train_mode(model, frozen, config.bn)
        hu, allowed = corr_sampler.batch(n_corr)
        if replay_sampler is not None:
            rhu, rallowed = replay_sampler.batch(n_replay)
            hu, allowed = np.concatenate([hu, rhu]), np.concatenate([allowed, rallowed])
        x = torch.from_numpy(normalize(hu, pre)).unsqueeze(1).to(device).contiguous(memory_format=layout)
        y = torch.from_numpy(allowed).to(device)
        with training_autocast(device, Bf16.AUTO.value):
            logits = model(x).float()
            loss = compute_loss(logits[:n_corr], y[:n_corr], config.loss)
            if config.keep_open_type:
                with torch.no_grad():
                    old_corr = old(x[:n_corr]).float()
                loss = loss + open_type_loss(logits[:n_corr], old_corr, y[:n_corr])
            if n_replay:
                if old is not None and config.replay_loss == ReplayLoss.DISTILL:
                    with torch.no_grad():
                        target = old(x[n_corr:]).float()
                    loss = loss + distillation_loss(logits[n_corr:], target)
                else:
                    loss = loss + compute_loss(logits[n_corr:], y[n_corr:], config.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.item())
        if not math.isfinite(value):
            raise InputError(f"fine-tuning diverged at step {step} (loss {value}); lower the learning rate")
        history.append({"step": step, "loss": value})
        report(progress, "train", done + step, total, f"step {done + step}/{total} loss {value:.4f}", loss=value)
    from .checkpoint import nonfinite_keys

    bad = nonfinite_keys(model.state_dict())
    if bad:
        raise InputError(f"fine-tuning diverged (weights such as {bad[0]} became NaN or infinite); lower the learning rate")
    model.eval()
    return history


def finetune(init: Checkpoint, corrections: Sequence[CorrectionSlice], config: FineTuneConfig = FineTuneConfig(),
             data: Optional[AdaptationData] = None, pixel_mm: Optional[float] = None,
             device: str = "auto", progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelCheck] = None, extra: Optional[dict[str, Any]] = None,
             reference_before: Optional[dict[str, float]] = None) -> FineTuneOutcome:
    """Fine-tune ``init`` on ``corrections`` and score old and new model (see the module docstring).

    ``data``: the model's replay and reference slices (None or empty: no replay, no
    reference gate). ``pixel_mm``: the working pixel size in mm to train and score at (None:
    the model's own, ``ModelConfig.inference.pixel_mm``; 0: the slices' own grid); the
    corrections (and replay slices with a spacing) are resampled to it, and the new model
    carries it. With
    ``config.alphas``, the new weights are interpolated with the starting ones
    (``(1 - a) * start + a * end``) and the largest ``a`` that passes the gate is kept.
    ``reference_before``: the starting model's reference scores when already known
    (:func:`cached_reference`); otherwise they are computed here.
    Returns the new checkpoint (float32, not saved) and the gate's verdict.
    """
    import torch

    from .inference import Predictor, resolve_device
    from .training import training_channels_last

    if not corrections:
        raise InputError("no accepted slices to fine-tune on")
    dev = resolve_device(device)
    data = data or AdaptationData()
    model_config = init.config if pixel_mm is None else init.config.with_pixel_mm(pixel_mm)
    pixel_mm = model_config.inference.pixel_mm or None  # None: the own grid from here on
    train_c, held = split_holdout(corrections, config.holdout_every)
    train_s, _ = correction_samples(train_c)
    held_s, held_spacing = correction_samples(held)  # scored as segment sees them: resampled by the predictor
    train_s = [resample_sample(s, c.spacing, pixel_mm) for s, c in zip(train_s, train_c)]
    replay = []
    if config.replay_fraction > 0:
        for s in data.replay:
            sp = data.spacing.get(s.name)
            replay.append(replace(resample_sample(s, sp, pixel_mm) if sp else s, group=REPLAY))
    steps = config.steps or max(1, math.ceil(len(train_s) / config.batch_size)) * config.epochs
    channels_last = training_channels_last(dev, init.config.network)
    model = init.build_model().to(dev)
    predictor = Predictor(model, model_config, dev, channels_last=channels_last)  # the layout it trains in
    ref_spacing = dict(data.spacing)
    if reference_before is None:
        report(progress, "gate", 0, 1, "scoring the starting model")
        ref_before = score_samples(predictor, data.reference, ref_spacing)
    else:
        ref_before = dict(reference_before)
    held_before = score_samples(predictor, held_s, held_spacing)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history, ends = [], []
    for member in range(max(1, config.soup)):
        model.load_state_dict(start)
        member_config = replace(config, seed=config.seed + member)
        history += [{**h, "member": member} for h in _train_steps(
            model, init, train_s, replay, member_config, dev, progress, cancel, steps, channels_last,
            done=member * steps, total=max(1, config.soup) * steps)]
        ends.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    end = {k: (sum(e[k] for e in ends) / len(ends)) if start[k].is_floating_point() else ends[-1][k] for k in start}
    gate = None
    alphas = sorted(set(config.alphas or (1.0,)), reverse=True)
    for i, alpha in enumerate(alphas):
        check_cancel(cancel)
        model.load_state_dict(interpolate(start, end, alpha))
        model.eval()
        report(progress, "gate", i + 1, len(alphas), f"scoring the new model (weight {alpha:g})")
        gate = GateResult(ref_before, score_samples(predictor, data.reference, ref_spacing), held_before,
                          score_samples(predictor, held_s, held_spacing), config.tolerance,
                          len(data.reference), len(held_s), alpha, tuple(config.gate_regions))
        if gate.passed:
            break
    assert gate is not None
    report(progress, "gate", len(alphas), len(alphas), gate.summary())
    model.to("cpu", memory_format=torch.contiguous_format)
    with torch.no_grad():
        ckpt = Checkpoint.from_model(model.eval(), model_config, half=False, fingerprint=init.fingerprint,
                                     metrics={"gate": gate.to_dict()}, extra={**(extra or {}), "history": history})
    return FineTuneOutcome(ckpt, gate, history, len(train_s), len(replay), steps, reference_before is not None)
