"""The one training loop: level 1 from scratch, level 2 / fine-tuning from a checkpoint.

Adam + categorical cross-entropy (thesis §3.6) generalised to partial labels as a
*marginal* cross-entropy: a pixel whose annotation allows a set S of classes
contributes ``-log sum_{c in S} p_c`` (S of one class is plain cross-entropy; a
pixel that allows every class contributes nothing). MedSeg pixels labelled 0 allow
{background, lung}; COVID-19-CT-Seg infection pixels allow {GGO, consolidation};
so one network learns all four classes from datasets that each leave some
undecided. Optional soft Dice uses only pixels where a class is decided.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .checkpoint import Checkpoint, atomic_torch_save, load_checkpoint, nonfinite_keys, save_checkpoint
from .config import (Arch, BatchNormMode, InferenceConfig, Loss, LrSchedule, ModelConfig, NetworkConfig, Optimizer,
                     PreprocessConfig, TrainConfig, to_dict)
from .data import Sample, bit
from .device import bf16_enabled, resolve_device
from .errors import InputError
from .metrics import MetricAccumulator, mean_dice
from .network import DRSegUNet, build_network
from .preprocessing import normalize
from .progress import CancelCheck, ProgressCallback, check_cancel, report
from .vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG, NUM_CLASSES, REGIONS

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- losses
def allowed_to_mask(allowed: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(N, H, W) uint8 bitmask → (N, C, H, W) bool."""
    bits = (1 << torch.arange(num_classes, device=allowed.device, dtype=torch.int32)).view(1, -1, 1, 1)
    return (allowed.unsqueeze(1).to(torch.int32) & bits) != 0


def marginal_cross_entropy(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of ``-log P(class in allowed set)``; logits (N,C,H,W), allowed (N,H,W)."""
    mask = allowed_to_mask(allowed, logits.shape[1])
    logits = logits.float()
    log_all = torch.logsumexp(logits, dim=1)
    log_ok = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
    informative = ~mask.all(dim=1)
    loss = (log_all - log_ok)[informative]
    return loss.mean() if loss.numel() else logits.sum() * 0.0


def marginal_soft_dice(logits: torch.Tensor, allowed: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the classes, using only pixels where the class is decided."""
    mask = allowed_to_mask(allowed, logits.shape[1])
    prob = torch.softmax(logits.float(), dim=1)
    single = mask.sum(dim=1, keepdim=True) == 1
    target = (mask & single).float()  # class decided present
    decided = (single | ~mask).float()  # class decided (present or absent)
    inter = (prob * target * decided).sum(dim=(0, 2, 3))
    denom = (prob * decided).sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    present = target.sum(dim=(0, 2, 3)) > 0
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0.0


def region_soft_dice(logits: torch.Tensor, allowed: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the regions of ``vocabulary.REGIONS`` (GGO, consolidation,
    infection = GGO or consolidation, lung field), each scored where it is decided.

    A region's probability is the sum of its classes'; a pixel decides it when its allowed
    set lies inside the region or outside it. Unlike :func:`marginal_soft_dice`, this sees
    the extent of a lesion whose type is open (COVID-19-CT-Seg's infection masks, a
    correction accepted with "infection" checked): there neither GGO nor consolidation is
    decided, but the infection region is.
    """
    mask = allowed_to_mask(allowed, logits.shape[1])
    prob = torch.softmax(logits.float(), dim=1)
    losses = []
    for classes in REGIONS.values():
        rb = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        rb[list(classes)] = True
        rb = rb.view(1, -1, 1, 1)
        inside = ~(mask & ~rb).any(dim=1)
        outside = ~(mask & rb).any(dim=1)
        target = inside.float()
        if not bool(target.sum() > 0):
            continue
        decided = (inside | outside).float()
        p = (prob * rb).sum(dim=1)
        inter = (p * target).sum()
        denom = (p * decided).sum() + target.sum()
        losses.append(1 - (2 * inter + eps) / (denom + eps))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


LOSSES = Loss.values()


def compute_loss(logits: torch.Tensor, allowed: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == Loss.CE:
        return marginal_cross_entropy(logits, allowed)
    if kind == Loss.CE_DICE:
        return marginal_cross_entropy(logits, allowed) + marginal_soft_dice(logits, allowed)
    if kind == Loss.CE_REGIONDICE:
        return marginal_cross_entropy(logits, allowed) + region_soft_dice(logits, allowed)
    raise ValueError(f"unknown loss {kind!r}; use one of {', '.join(LOSSES)}")


# ---------------------------------------------------------------- sampling
INFECTION_BITS = bit(GGO, CONSOLIDATION)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation that bridges 8-bit slices and HU CT (geometry and intensity)."""

    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.25)
    flip_lr: float = 0.5
    hu_gain: tuple[float, float] = (0.9, 1.1)
    hu_shift: float = 40.0
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_hu: float = 20.0
    blur_sigma: float = 1.0
    foreground_fraction: float = 0.5  # crops centred on infection
    air_hu: float = -1000.0  # outside the slice (a crop's padding), and the level gain scales about
    gamma_window_hu: tuple[float, float] = (-1000.0, 100.0)  # gamma reshapes this window; HU above it stay
    blur_probability: float = 0.2
    blur_sigma_min: float = 0.3  # a blurred crop's sigma is drawn from (blur_sigma_min, blur_sigma)
    noise_probability: float = 0.3
    # Share of the crops not centred on a lesion that are centred on a dense pixel (above
    # ``hard_negative_hu``) decided to be lung and not lesion -- vessels, bronchial walls and
    # fissures, mostly near the hila (COVID-19-CT-Seg's lung masks decide them; MedSeg's do
    # not). 0 draws no such crops and leaves the random stream as it was.
    hard_negative_fraction: float = 0.0
    hard_negative_hu: float = -500.0


def sample_probabilities(samples: Sequence[Sample], source_weights: Optional[dict[str, float]] = None) -> np.ndarray:
    """Probability of drawing each sample: sources ("medseg", "zenodo", ...) equally often,
    or in the ratio ``source_weights`` gives (a source it does not name weighs 1)."""
    sources = [s.source for s in samples]
    counts = {k: sources.count(k) for k in set(sources)}
    sw = source_weights or {}
    strangers = sorted(set(sw) - set(counts))
    if strangers:
        raise InputError(f"source weights name {strangers}, but the training slices come from {sorted(counts)}")
    if not all(math.isfinite(v) and v >= 0 for v in sw.values()):
        raise InputError(f"source weights must be finite and >= 0, got {sw}")
    w = np.array([sw.get(k, 1.0) / counts[k] for k in sources])
    if not w.sum() > 0:
        raise InputError(f"source weights {sw} leave nothing to sample from sources {sorted(counts)}")
    return w / w.sum()


class PatchSampler:
    """Random augmented crops (HU, allowed) from samples; sources drawn equally often
    unless ``source_weights`` (source name -> relative frequency) says otherwise."""

    def __init__(self, samples: Sequence[Sample], crop: int, aug: AugmentConfig, seed: int,
                 source_weights: Optional[dict[str, float]] = None) -> None:
        self.samples = list(samples)
        self.crop = crop
        self.aug = aug
        self.rng = np.random.default_rng(seed)
        self.weights = sample_probabilities(self.samples, source_weights)
        # Pixels that can only be infection: centres for foreground-biased crops.
        self.fg = [np.argwhere(((s.allowed & INFECTION_BITS) != 0) & ((s.allowed & bit(BACKGROUND)) == 0))
                   for s in self.samples]
        # Dense pixels that can only be lung: centres for hard-negative crops.
        self.neg = ([np.argwhere((s.allowed == bit(LUNG)) & (s.hu > aug.hard_negative_hu)) for s in self.samples]
                    if aug.hard_negative_fraction > 0 else [np.empty((0, 2), int)] * len(self.samples))

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        rng, a, c = self.rng, self.aug, self.crop
        i = rng.choice(len(self.samples), p=self.weights)
        s = self.samples[i]
        h, w = s.hu.shape
        if len(self.fg[i]) and rng.random() < a.foreground_fraction:
            centre = self.fg[i][rng.integers(len(self.fg[i]))].astype(float)
        elif len(self.neg[i]) and rng.random() < a.hard_negative_fraction:
            centre = self.neg[i][rng.integers(len(self.neg[i]))].astype(float)
        else:
            centre = np.array([rng.uniform(0, h), rng.uniform(0, w)])
        theta = math.radians(rng.uniform(-a.rotate_deg, a.rotate_deg))
        scale = math.exp(rng.uniform(math.log(a.scale[0]), math.log(a.scale[1])))
        flip = -1.0 if rng.random() < a.flip_lr else 1.0
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        matrix = rot @ np.diag([1.0, flip]) / scale
        offset = centre - matrix @ np.array([c / 2, c / 2])
        hu = ndimage.affine_transform(s.hu, matrix, offset, (c, c), order=1, mode="constant", cval=a.air_hu)
        allowed = ndimage.affine_transform(s.allowed, matrix, offset, (c, c), order=0, mode="constant",
                                           cval=int(bit(BACKGROUND)))
        # Intensity: gain/shift about air, gamma within the window, blur, noise.
        hu = (hu - a.air_hu) * rng.uniform(*a.hu_gain) + a.air_hu + rng.uniform(-a.hu_shift, a.hu_shift)
        low, high = a.gamma_window_hu
        t = np.clip((hu - low) / (high - low), 0, 1)
        g = math.exp(rng.uniform(math.log(a.gamma[0]), math.log(a.gamma[1])))
        hu = np.where(hu < high, t**g * (high - low) + low, hu)
        if a.blur_sigma > 0 and rng.random() < a.blur_probability:
            hu = ndimage.gaussian_filter(hu, rng.uniform(a.blur_sigma_min, a.blur_sigma))
        if a.noise_hu > 0 and rng.random() < a.noise_probability:
            hu = hu + rng.normal(0, rng.uniform(0, a.noise_hu), hu.shape)
        return hu.astype(np.float32), allowed.astype(np.uint8)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.draw() for _ in range(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ---------------------------------------------------------------- evaluation
class SlicePredictor(Protocol):
    """What validation needs of a predictor (``inference.Predictor`` is one)."""

    def predict_slices(self, slices: Sequence[np.ndarray], spacing: Optional[Sequence[float]] = None,
                       eight_bit: bool = False) -> list[np.ndarray]: ...


def evaluate_samples(predictor: SlicePredictor, samples: Sequence[Sample],
                     regions: Sequence[str] = tuple(REGIONS)) -> dict[str, dict]:
    """Per-region metrics of ``predictor`` on annotated slices (see metrics.py)."""
    acc = MetricAccumulator(regions)
    for s in samples:
        pred = predictor.predict_slices([s.hu], eight_bit=s.eight_bit)[0]
        acc.add(s.name, pred, {r: s.region_truth(r) for r in regions})
    return acc.summary()


def estimate_normalisation(samples: Sequence[Sample], cfg: PreprocessConfig) -> PreprocessConfig:
    """Mean/std of clipped HU over all training pixels (the z-score constants)."""
    vals = np.concatenate([np.clip(s.hu, cfg.hu_min, cfg.hu_max).ravel()[::7] for s in samples])
    return replace(cfg, mean=round(float(vals.mean()), 2), std=round(float(vals.std()), 2))


# ---------------------------------------------------------------- training
def world_size() -> int:
    """Processes of this run: torchrun's WORLD_SIZE, 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(world size, rank, device) — joins the process group when run under ``torchrun``.

    gloo on CPU, NCCL on CUDA; each rank uses the GPU of its LOCAL_RANK.
    """
    import torch.distributed as dist

    world = world_size()
    if world <= 1:
        return 1, 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank(), device


class _CropStream(torch.utils.data.IterableDataset):
    """Endless (normalised crops, allowed) batches drawn by a PatchSampler per worker.

    In this process (no workers) the sampler is kept as ``self.sampler``, and ``rng_state``
    (its random generator's state, saved by an interrupted run) is where its draws continue."""

    def __init__(self, samples: Sequence[Sample], config: TrainConfig, augment: AugmentConfig, seed: int,
                 preprocess: PreprocessConfig, rng_state: Optional[dict[str, Any]] = None) -> None:
        self.samples, self.config, self.augment, self.seed, self.preprocess = samples, config, augment, seed, preprocess
        self.rng_state = rng_state
        self.sampler: Optional[PatchSampler] = None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed + (7919 * (info.id + 1) if info is not None else 0)
        sampler = PatchSampler(self.samples, self.config.crop, self.augment, seed, dict(self.config.source_weights))
        if info is None:
            if self.rng_state is not None:
                sampler.rng.bit_generator.state = self.rng_state
            self.sampler = sampler
        while True:
            hu, allowed = sampler.batch(self.config.batch_size)
            yield torch.from_numpy(normalize(hu, self.preprocess)), torch.from_numpy(allowed)


def _batch_stream(samples: Sequence[Sample], config: TrainConfig, augment: AugmentConfig, rank: int,
                  preprocess: PreprocessConfig, device: torch.device,
                  rng_state: Optional[dict[str, Any]] = None):
    """(iterator of training batches, its crop stream). ``config.workers`` = 0 draws them in
    this process (the reproducible default; ``rng_state`` continues an interrupted run's
    draws); N > 0 draws them in N worker processes ahead of the GPU (other random streams:
    worker k is seeded seed + rank + 7919 (k + 1))."""
    stream = _CropStream(samples, config, augment, config.seed + rank, preprocess, rng_state)
    if config.workers <= 0:
        return iter(stream), stream
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4,
                                         persistent_workers=False)
    return iter(loader), stream


def training_autocast(device: torch.device, mode: str):
    """bf16 autocast context for training steps (see TrainConfig.bf16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(device, mode))


# The narrowest first encoder that trains channels_last on CPU: with torch 2.13.0+cpu (oneDNN),
# the backward pass of its 1x1 stride-2 shortcut conv corrupts the heap at 4 or 8 start filters
# (a segmentation fault or "double free"; fine at 16, experiments/weak_supervision/JOURNAL.md).
CPU_CHANNELS_LAST_MIN_FILTERS = 16


def training_channels_last(device: torch.device, network: NetworkConfig, world: int = 1) -> bool:
    """Whether training steps run in the channels_last layout: always on CUDA; on CPU for one
    process (gloo DDP crashes with it) and a DRSegUNet of at least
    CPU_CHANNELS_LAST_MIN_FILTERS start filters. On this project's CPU a fine-tuning step of 4
    crops of 256 px in bf16 takes 0.75 s instead of 1.23 s (bench/train_step.py)."""
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and world == 1 and network.arch == Arch.DRSEGUNET.value
            and network.base_filters >= CPU_CHANNELS_LAST_MIN_FILTERS)


def weight_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers that hold weights, in forward order (what ``freeze_first_layers`` counts)."""
    return [(name, m) for name, m in model.named_modules()
            if len(list(m.children())) == 0 and any(True for _ in m.parameters(recurse=False))]


def freeze_first_layers(model: DRSegUNet, n: int) -> list[str]:
    """Freeze the first ``n`` weight-bearing layers in forward order (Keras' layer order).

    For DRSegUNet these are stem.conv1, stem.bn1, stem.conv2, stem.shortcut, ...
    Frozen BatchNorm layers also keep their running statistics (eval mode).
    Only for DRSegUNet: the thesis's layer order means nothing for other networks.
    """
    if n and not isinstance(model, DRSegUNet):
        raise ValueError(f"freezing layers is defined for DRSegUNet only, not {type(model).__name__} "
                         f"(arch {getattr(getattr(model, 'config', None), 'arch', '?')!r}); use frozen_layers=0")
    layers = weight_layers(model)
    if n >= len(layers) and layers:
        raise InputError(f"freezing {n} layers leaves nothing to train: the network has {len(layers)} layers "
                         f"with weights; freeze fewer (the thesis freezes 2)")
    frozen = []
    for name, m in layers[:n]:
        for p in m.parameters():
            p.requires_grad_(False)
        frozen.append(name)
    return frozen


BN_MODES = BatchNormMode.values()


def set_train_mode(model: torch.nn.Module, frozen: Sequence[str], bn: str = BatchNormMode.TRAIN.value) -> None:
    """Training mode, except BatchNorm layers that keep their running statistics: the
    frozen ones always, and every one with ``bn="frozen"`` (TrainConfig.bn)."""
    if bn not in BN_MODES:
        raise ValueError(f"unknown BatchNorm mode {bn!r}; choose from {', '.join(BN_MODES)}")
    model.train()
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (bn == BatchNormMode.FROZEN or name in frozen):
            m.eval()


def _diverged(epoch: int, what: str) -> InputError:
    """The error that stops a run whose loss or weights became NaN or infinite."""
    return InputError(f"training diverged in epoch {epoch} ({what}); lower the learning rate "
                      "or start from another model")


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_score: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Optional[DRSegUNet] = None  # the network after the last step (on its device)


class _WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics
    (``TrainConfig.ema_decay``): what validation scores and the checkpoints hold. Averaging
    the last few hundred steps smooths the step-to-step swing of a model trained on few
    slices, which otherwise makes the best validation epoch partly luck.

    The n-th update uses the decay min(decay, (1 + n) / (10 + n)): a short memory at first, so
    that a run from scratch is not validated on an average that still holds most of its
    random initial weights (at 0.998 they would keep 45 % of the weight after 400 steps)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        import copy

        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        self.updates += 1
        live = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                v.mul_(decay).add_(live[k].detach().to(v.dtype), alpha=1.0 - decay)
            else:
                v.copy_(live[k])


@dataclass
class _Setup:
    """What a training run steps: the network on its device, the optimiser and its schedule
    (train's first step, :func:`_setup`)."""

    model: torch.nn.Module  # the network
    net: torch.nn.Module  # what the steps run: the network, or its DDP wrapper
    config: ModelConfig  # the network's config, saved in every checkpoint
    opt: torch.optim.Optimizer
    sched: Optional[torch.optim.lr_scheduler.LRScheduler]
    device: torch.device
    world: int  # processes (torchrun), 1 alone
    rank: int
    frozen: list[str]  # names of the frozen layers
    channels_last: bool


def _setup(train_samples: Sequence[Sample], config: TrainConfig, model_config: Optional[ModelConfig],
           init: Optional[Checkpoint], device: str) -> _Setup:
    """Seed, build the network (``init``'s, or a new one from ``model_config`` with z-score
    constants of ``train_samples``), join the process group, freeze layers, make the optimiser."""
    torch.manual_seed(config.seed)
    dev = resolve_device(device)
    if init is not None:
        mcfg = init.config
        model = init.build_model()
    else:
        mcfg = model_config or ModelConfig()
        mcfg = replace(mcfg, preprocess=estimate_normalisation(train_samples, mcfg.preprocess))
        model = build_network(mcfg.network)
    world, rank, dev = _init_distributed(dev)
    channels_last = training_channels_last(dev, mcfg.network, world)
    model.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    frozen = freeze_first_layers(model, config.frozen_layers)
    if frozen:
        log.info("frozen layers: %s", ", ".join(frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == Optimizer.SGD:
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    elif config.optimizer == Optimizer.ADAM:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use adam or sgd")
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * config.steps_per_epoch,
                                                         eta_min=config.lr * 0.02)
             if config.lr_schedule == LrSchedule.COSINE else None)
    net: torch.nn.Module = model
    if world > 1:
        # Every rank draws different crops; gradients are averaged, so weights stay equal.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return _Setup(model, net, mcfg, opt, sched, dev, world, rank, frozen, channels_last)


def _check_settings(run: _Setup, train_samples: Sequence[Sample], val_samples: Sequence[Sample],
                    config: TrainConfig) -> None:
    """Fail before the first step on a precision, BatchNorm mode, source weight or selection
    region that cannot work."""
    training_autocast(run.device, config.bf16)
    set_train_mode(run.model, run.frozen, config.bn)
    sample_probabilities(train_samples, dict(config.source_weights))
    if config.select_regions and not val_samples:
        log.warning("no validation slices: select_regions %s has nothing to select on", ",".join(config.select_regions))
    elif config.select_regions:
        undecided = [r for r in config.select_regions if all(s.region_truth(r) is None for s in val_samples)]
        if undecided:
            raise InputError(f"no validation slice is annotated for {', '.join(undecided)}: "
                             "best.pt could never be chosen on it (see --select-regions)")


def _train_epoch(run: _Setup, batches, config: TrainConfig, epoch: int, step: int,
                 averaged: Optional[_WeightAverage], progress: Optional[ProgressCallback],
                 cancel: Optional[CancelCheck]) -> tuple[list[float], int]:
    """One epoch of ``config.steps_per_epoch`` steps: (each step's loss, steps taken in all)."""
    set_train_mode(run.model, run.frozen, config.bn)
    total_steps = config.epochs * config.steps_per_epoch
    losses = []
    for _ in range(config.steps_per_epoch):
        check_cancel(cancel)
        x, y = next(batches)
        x = x.unsqueeze(1).to(run.device, non_blocking=True)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(run.device, non_blocking=True)
        with training_autocast(run.device, config.bf16):
            loss = compute_loss(run.net(x).float(), y, config.loss)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        if run.sched is not None:
            run.sched.step()
        if averaged is not None:
            averaged.update(run.model)
        step += 1
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise _diverged(epoch, f"the loss became {losses[-1]} at step {step}")
        report(progress, "train", step, total_steps, f"epoch {epoch}/{config.epochs} loss {losses[-1]:.4f}",
               epoch=epoch, loss=losses[-1])
    bad = nonfinite_keys(run.model.state_dict())
    if bad:
        raise _diverged(epoch, f"weights such as {bad[0]} became NaN or infinite")
    return losses, step


@dataclass
class _Keeper:
    """Validation and checkpoints (rank 0): ``last.pt`` after every epoch, ``best.pt`` when
    the validation score improves; without validation slices, ``best.pt`` is the last epoch,
    written once by :meth:`finish`."""

    out_dir: Path
    config: ModelConfig
    scored: torch.nn.Module  # what is validated and saved: the network or its weight average
    predictor: SlicePredictor  # segments validation slices with ``scored``
    val_samples: Sequence[Sample]
    fingerprint: dict[str, Any]
    meta: dict[str, Any]
    best_score: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    final: Optional[Checkpoint] = None

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    def validate(self, entry: dict[str, Any], select_regions: Sequence[str]) -> None:
        """Add the validation Dice (mean over ``select_regions``, or all) and each region's to ``entry``."""
        self.scored.eval()
        summary = evaluate_samples(self.predictor, self.val_samples)
        entry["val_dice"] = mean_dice(summary, tuple(select_regions) or tuple(summary))
        entry["val"] = {r: v["mean"]["dice"] for r, v in summary.items()}

    def epoch_done(self, epoch: int, entry: dict[str, Any]) -> None:
        """Record ``entry`` in the history and write the epoch's checkpoints."""
        self.history.append(entry)
        score = entry.get("val_dice", -1.0 if self.val_samples else float(epoch))
        ckpt = Checkpoint.from_model(self.scored, self.config, half=False, fingerprint=self.fingerprint,
                                     metrics={"epoch": epoch, **{k: v for k, v in entry.items() if k != "epoch"}},
                                     extra={**self.meta, "history": self.history})
        save_checkpoint(ckpt, self.last_path)
        if not self.val_samples:  # best is the last epoch: best.pt is written once, after the last one
            self.best_score, self.best_epoch, self.final = score, epoch, ckpt
        elif "val_dice" in entry and score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            save_checkpoint(ckpt, self.best_path)

    def finish(self) -> None:
        """Write ``best.pt`` where no epoch did: the last epoch's, or (no epoch ran) the network as it is."""
        if self.final is not None:
            save_checkpoint(self.final, self.best_path)
        if not self.best_path.exists():
            save_checkpoint(Checkpoint.from_model(self.scored, self.config, fingerprint=self.fingerprint,
                                                  extra=self.meta), self.best_path)


RESUME_FILE = "resume.pt"  # in a run's folder while it runs (train's ``resume_state``)


def can_resume(config: TrainConfig, world: int = 1) -> bool:
    """Whether a run can save and continue from a resume state: crops drawn in this process
    (``workers`` 0) by a single process, whose random stream the state holds."""
    return config.workers <= 0 and world == 1


def _save_resume_state(path: Path, run: _Setup, averaged: Optional[_WeightAverage], keeper: _Keeper,
                       stream: _CropStream, identity: dict[str, Any], epoch: int, step: int, seconds: float) -> None:
    """Everything an interrupted run needs to go on as if it had not stopped: the live weights,
    the optimiser and schedule, the weight average, the crop and torch random streams, the
    history and the best score so far (not a model to use: a few times a checkpoint's size)."""
    state = {"identity": identity, "epoch": epoch, "step": step, "seconds": seconds,
             "model": run.model.state_dict(), "opt": run.opt.state_dict(),
             "sched": run.sched.state_dict() if run.sched is not None else None,
             "average": ({"model": averaged.model.state_dict(), "updates": averaged.updates}
                         if averaged is not None else None),
             "rng": stream.sampler.rng.bit_generator.state if stream.sampler is not None else None,
             "torch_rng": torch.get_rng_state(),
             "best_score": keeper.best_score, "best_epoch": keeper.best_epoch, "history": keeper.history}
    atomic_torch_save(state, path)


def _read_resume_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """An interrupted run's state (:func:`_save_resume_state`); InputError when it cannot be
    read or was written by a run with other data, options or network."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say which and what to do
        raise InputError(f"{path} cannot be read ({type(e).__name__}); delete it to start the run "
                         "from the beginning") from None
    saved = state.get("identity", {}) if isinstance(state, dict) else {}
    differ = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if differ:
        raise InputError(f"{path} was written by a run with other {', '.join(differ)}; resume with the "
                         "same data and options, or delete it (or use another --out) to start anew")
    return state


def train(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    model_config: Optional[ModelConfig] = None,
    init: Optional[Checkpoint] = None,
    device: str = "auto",
    fingerprint: Optional[dict[str, Any]] = None,
    augment: AugmentConfig = AugmentConfig(),
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCheck] = None,
    extra: Optional[dict[str, Any]] = None,
    resume_state: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Train and write ``best.pt`` (best validation Dice) and ``last.pt`` into ``out_dir``.

    ``init``: start from this checkpoint (level 2 / fine-tuning); its model config is
    kept. Otherwise the network is built from ``model_config`` with z-score
    constants estimated on ``train_samples``. Checkpoints are written atomically:
    ``last.pt`` after every epoch, ``best.pt`` when validation Dice improves. Without
    ``val_samples`` the last epoch is the best, and ``best.pt`` is written once when
    training ends (an older ``best.pt`` in ``out_dir`` is removed at the start, so an
    interrupted run never leaves one that is not its own). Validation applies the model's
    own decision rule and body restriction (``ModelConfig.inference``) on the slices' grid.

    ``resume_state``: also write ``out_dir/resume.pt`` after every epoch (:data:`RESUME_FILE`;
    removed when the run ends), from which ``resume`` continues a run that was stopped: the
    same steps and crops as if it had run through, and on CPU the same weights bit for bit
    (CUDA kernels are not deterministic run to run anyway). It must have the same data,
    options and network (:func:`can_resume` says which runs can). ``resume`` without such a
    file starts from the beginning.
    """
    if not train_samples:
        raise ValueError("no training samples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _setup(train_samples, config, model_config, init, device)
    if run.rank != 0:
        progress = None
    _check_settings(run, train_samples, val_samples, config)
    resume_path = out_dir / RESUME_FILE
    if (resume_state or resume) and not can_resume(config, run.world):
        raise InputError("a run can be resumed only when its crops are drawn in this process by one process "
                         "(workers 0, no torchrun)")
    identity = {"train_config": to_dict(config), "model_config": to_dict(run.config), "fingerprint": fingerprint or {},
                "n_train": len(train_samples), "n_val": len(val_samples), "augment": to_dict(augment)}
    state = _read_resume_state(resume_path, identity) if resume and resume_path.exists() else None
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["opt"])
        if run.sched is not None:
            run.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming %s after epoch %d of %d", out_dir, state["epoch"], config.epochs)
    batches, stream = _batch_stream(train_samples, config, augment, run.rank, run.config.preprocess, run.device,
                                    rng_state=state["rng"] if state is not None else None)
    # Validation uses the training run's precision (bf16="off" reproduces float32 runs).
    val_cfg = InferenceConfig.for_model(run.config, batch_size=1, cpu_bf16=config.bf16, cuda_bf16=config.bf16)
    from .inference import Predictor  # validation segments as inference does; the one use of inference here

    averaged = _WeightAverage(run.model, config.ema_decay) if config.ema_decay > 0 else None
    if averaged is not None and state is not None:
        averaged.model.load_state_dict(state["average"]["model"])
        averaged.updates = int(state["average"]["updates"])
    scored = averaged.model if averaged is not None else run.model  # what is validated and saved
    keeper = _Keeper(out_dir, run.config, scored,
                     Predictor(scored, run.config, run.device, val_cfg, channels_last=run.channels_last),
                     val_samples, fingerprint or {},
                     {"train_config": identity["train_config"], "n_train": len(train_samples), "n_val": len(val_samples),
                      "init": (init.extra.get("name") if init else None), **(extra or {})})
    if not val_samples and run.rank == 0:
        keeper.best_path.unlink(missing_ok=True)
    step, first, t0 = 0, 1, time.time()
    if state is not None:
        step, first, t0 = int(state["step"]), int(state["epoch"]) + 1, time.time() - float(state["seconds"])
        keeper.best_score, keeper.best_epoch, keeper.history = state["best_score"], state["best_epoch"], state["history"]
        if first > config.epochs and not val_samples:  # stopped after the last epoch, before best.pt was written
            keeper.final = load_checkpoint(keeper.last_path)
    try:
        for epoch in range(first, config.epochs + 1):
            losses, step = _train_epoch(run, batches, config, epoch, step, averaged, progress, cancel)
            entry: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.time() - t0, 1)}
            if run.rank != 0:
                continue  # rank 0 validates and writes checkpoints
            if val_samples and (epoch % config.val_every == 0 or epoch == config.epochs):
                keeper.validate(entry, config.select_regions)
            keeper.epoch_done(epoch, entry)
            if resume_state:
                _save_resume_state(resume_path, run, averaged, keeper, stream, identity, epoch, step, entry["seconds"])
            report(progress, "epoch", epoch, config.epochs,
                   f"epoch {epoch}: loss {entry['loss']:.4f}" + (f" val Dice {entry['val_dice']:.3f}" if "val_dice" in entry else ""),
                   **{k: v for k, v in entry.items() if k in ("loss", "val_dice")})
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # DataLoader workers (config.workers > 0)
        if shutdown is not None:
            shutdown()
    result = TrainResult(keeper.best_path, keeper.last_path, keeper.best_score, keeper.best_epoch, keeper.history,
                         run.model)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if run.rank != 0:
            return result
    keeper.finish()
    if resume_state or resume:
        resume_path.unlink(missing_ok=True)  # the run ended: nothing to resume, no optimiser state left behind
    return result
