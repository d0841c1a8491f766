"""Method constants, in frozen dataclasses, saved inside every checkpoint.

Nothing that defines the method (HU windows, thresholds, structuring elements,
k, learning rates) is written inline elsewhere: it is read from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Optional

from .vocabulary import CONSOLIDATION_NAME, GGO_NAME, INFECTION_NAME, LUNG_NAME, NUM_CLASSES


class Choice(str, Enum):
    """A setting with a fixed set of string values (a config field, a command-line option).

    Members are ``str``: they compare equal to the plain strings that configs, JSON files and
    checkpoints hold ("auto" == Bf16.AUTO), so those keep loading. The config fields themselves
    hold the plain strings (``.value``). A member formats as its value and pickles as a plain
    ``str``, so one that slips into a message or a checkpoint reads as before.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __reduce_ex__(self, protocol):
        return str, (str(self.value),)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The plain strings, in declaration order (``choices=`` of an option, messages)."""
        return tuple(m.value for m in cls)


@dataclass(frozen=True)
class PreprocessConfig:
    """Thesis §4.2: clip HU to [hu_min, hu_max], then z-score with fixed constants.

    ``mean``/``std`` are the statistics of clipped HU over the training pixels; they
    are fixed per model (not per slice) so that a crop and a full slice of the same
    CT are normalised alike.
    """

    hu_min: float = -1000.0
    hu_max: float = 100.0
    mean: float = -500.0
    std: float = 450.0


@dataclass(frozen=True)
class EightBitConfig:
    """Documented rule mapping 8-bit lung-window images to approximate HU.

    ``hu = low + value / 255 * (high - low)``: grey 0 is air (-1000 HU) and 255 the
    upper end of a lung window (W1500/L-600 → +150 HU). The images are not
    invertible to HU; training augments intensity so the model does not depend on it.
    """

    low: float = -1000.0
    high: float = 150.0


class Upsampling(Choice):
    """NetworkConfig.upsampling: the decoder's up-sampling."""

    TRANSPOSE = "transpose"  # the thesis's 3x3 stride-2 transposed convolution
    UPSAMPLE = "upsample"  # nearest up-sampling and a 3x3 convolution (Table 13)


class Arch(Choice):
    """NetworkConfig.arch: which network a checkpoint holds."""

    DRSEGUNET = "drsegunet"
    MONAI_UNET = "monai_unet"


@dataclass(frozen=True)
class NetworkConfig:
    """Which network a checkpoint holds (network.build_network builds it).

    ``arch``: "drsegunet" (the thesis's network) or "monai_unet" (MONAI's residual
    U-Net, the comparison baseline of crossval.py; needs the ``monai`` package).
    For "monai_unet" the channels are ``base_filters * 2**i`` (i = 0..depth) with
    ``res_units`` residual units per level; ``upsampling`` applies to DRSegUNet only.
    Checkpoints written before ``arch`` existed load as "drsegunet".
    """

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    base_filters: int = 16
    depth: int = 4
    upsampling: str = Upsampling.TRANSPOSE.value  # Upsampling: transpose (thesis default) or upsample
    arch: str = Arch.DRSEGUNET.value  # Arch
    res_units: int = 2  # monai_unet only: residual units per level (MONAI's num_res_units)


class ThresholdMethod(Choice):
    """LungConfig.threshold_method: how the air/tissue level is chosen (lungs.py, "Threshold")."""

    AUTO = "auto"
    THESIS = "thesis"
    OTSU = "otsu"


THRESHOLD_METHODS = ThresholdMethod.values()  # LungConfig.threshold_method


@dataclass(frozen=True)
class LungConfig:
    """Thesis §4.4.1 steps 1-3: lung extraction."""

    window_low: float = -1000.0  # HU of air
    window_high: float = 400.0  # HU of bone
    threshold_hu: float = -170.0
    # How the air/tissue level is chosen (lungs.py, "Threshold"): "thesis" = threshold_hu;
    # "otsu" = Otsu's level of each slice's window-normalised image, smoothed first;
    # "auto" = "otsu" for 8-bit sources (not HU), "thesis" for CT in HU. The lungs.py
    # functions take CT in HU, so there "auto" is "thesis"; the readers of 8-bit
    # slices (weak.lung_config_for) resolve it to "otsu".
    threshold_method: str = ThresholdMethod.AUTO.value
    otsu_sigma_px: float = 1.0  # Gaussian smoothing (pixels) before Otsu; chosen on zenodo20 groups 0-4 (lungs.py)
    otsu_bins: int = 256  # histogram bins on the normalised [0, 1] scale
    n_components: int = 2  # bwareafilt(bw, 2)
    # Additions to the thesis (see lungs.py): what is not lung although it is air.
    min_air_hu: float = -500.0  # a CT in HU has air below this; otherwise not HU
    min_component_mm2: float = 100.0  # smaller air pockets (oesophagus, noise) are not lung
    min_second_fraction: float = 0.1  # blobs 2..n_components: at least this fraction of the largest
    min_extra_fraction: float = 0.1  # further blobs (a lung split by consolidation): same test
    airway_max_mm2: float = 600.0  # a blob this small near the body's midline is trachea/bronchus
    airway_band_fraction: float = 0.1  # "near the midline": within this fraction of body width
    max_junction_mm: float = 20.0  # touching lungs are split at junctions up to this thick
    closing_radius_mm: float = 10.0  # fills lesions at the lung border (per side of the body)
    min_volume_fraction: float = 0.1  # volumes: 3D blobs under this fraction of the largest go
    assumed_fov_mm: float = 350.0  # pixel size = this / slice width when spacing is unknown

    def __post_init__(self) -> None:
        if self.threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"threshold_method must be one of {', '.join(THRESHOLD_METHODS)}, "
                             f"not {self.threshold_method!r}")
        if not (self.otsu_bins >= 2 and self.otsu_sigma_px >= 0):
            raise ValueError(f"Otsu needs otsu_bins >= 2 and otsu_sigma_px >= 0 "
                             f"(got {self.otsu_bins}, {self.otsu_sigma_px:g})")
        if not self.window_low < self.threshold_hu < self.window_high:  # NaN fails too
            raise ValueError(f"the lung threshold must lie between the HU of air and bone "
                             f"({self.window_low:g} and {self.window_high:g}), not {self.threshold_hu:g}")


class ClusterDomain(Choice):
    """PseudoLabelConfig.cluster_domain: what k-means clusters."""

    IMAGE = "image"
    LUNG = "lung"


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Thesis §4.4.1 steps 5-6: k-means and morphological clean-up."""

    k: int = 3
    seed: int = 0
    line_length: int = 8
    line_angle_deg: float = 50.0
    disk_radius: int = 6
    # Additions (see pseudolabels.py).
    n_init: int = 4  # k-means restarts (fixed, so results are reproducible)
    disk_approximation: int = 4  # MATLAB strel('disk', r, N): default N=4; 0 = exact Euclidean disk
    hu_min: float = -1000.0  # k-means sees HU clipped to the thesis's air..bone window
    hu_max: float = 400.0
    # What k-means clusters. "image" (thesis step 5): the lung-extracted image, where every
    # pixel outside the lung is air (hu_min), so one of the K=3 centres sits at the masked
    # background and the lung is split between the other two. "lung": the lung pixels
    # only, split in three (the brightest third is mostly vessels). Chosen on COVID-19-CT-Seg
    # groups 0-4: pseudo-label infection Dice 0.244 ("image") vs 0.143 ("lung");
    # experiments/weak_supervision/JOURNAL.md, "The thesis's k-means".
    cluster_domain: str = ClusterDomain.IMAGE.value

    def __post_init__(self) -> None:
        if self.cluster_domain not in ClusterDomain.values():
            raise ValueError(f"cluster_domain must be {' or '.join(map(repr, ClusterDomain.values()))}, "
                             f"not {self.cluster_domain!r}")


class Loss(Choice):
    """TrainConfig.loss (training.compute_loss)."""

    CE = "ce"  # marginal cross-entropy (thesis)
    CE_DICE = "ce+dice"  # plus a soft Dice per class where the class is decided
    CE_REGIONDICE = "ce+regiondice"  # plus a soft Dice per region (vocabulary.REGIONS)


class LrSchedule(Choice):
    CONSTANT = "constant"  # thesis
    COSINE = "cosine"


class Bf16(Choice):
    """bfloat16 autocast (TrainConfig.bf16, InferenceConfig.cpu_bf16 and cuda_bf16)."""

    AUTO = "auto"  # where the hardware computes bf16 natively
    ON = "on"
    OFF = "off"


class BatchNormMode(Choice):
    """TrainConfig.bn: BatchNorm statistics during training."""

    TRAIN = "train"  # re-estimated from each batch
    FROZEN = "frozen"  # the starting model's (eval mode); the affine weights still train


class Optimizer(Choice):
    ADAM = "adam"  # thesis
    SGD = "sgd"  # momentum 0.9


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    steps_per_epoch: int = 50
    batch_size: int = 8
    crop: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = Loss.CE.value  # Loss
    seed: int = 0
    lr_schedule: str = LrSchedule.CONSTANT.value  # LrSchedule
    val_every: int = 1
    frozen_layers: int = 0  # level 2 freezes the first two layers (stem conv1, bn1)
    # Relative frequency of crops per source ("medseg", "zenodo", ...; a source not named
    # weighs 1). Empty: every source equally often.
    source_weights: tuple[tuple[str, float], ...] = ()
    # Regions whose mean validation Dice picks best.pt (empty: all regions).
    select_regions: tuple[str, ...] = ()
    # bfloat16 autocast for the forward pass and loss (weights and Adam stay float32):
    # "auto" = on CUDA and on CPUs with native bf16 (fine-tuning epochs 2x faster here, 2.96 against 5.79 s:
    # docs/bench_cpu_bf16_2026-11-27.md), "on", "off".
    bf16: str = Bf16.AUTO.value
    # Processes that draw augmented crops ahead of the training step (0: in this process,
    # the reproducible default; a GPU wants several, its CPU crops are the bottleneck).
    workers: int = 0
    # BatchNorm during training: "train" re-estimates running statistics from each batch
    # (Keras' and the thesis's behaviour; what training from scratch needs), "frozen" keeps
    # the statistics of the starting model (eval mode) while still training the affine
    # weights -- what fine-tuning on a few slices needs (issue 18).
    bn: str = BatchNormMode.TRAIN.value
    optimizer: str = Optimizer.ADAM.value  # adam (thesis) or sgd (moves parameters by their gradient's size)
    # Exponential moving average of the weights, validated and saved instead of the live
    # weights (0: off, the thesis's behaviour; e.g. 0.998 averages about the last 500 steps).
    ema_decay: float = 0.0


class Trainable(Choice):
    """FineTuneConfig.trainable: which weights a fine-tune trains."""

    ALL = "all"  # every weight past the frozen layers
    BATCHNORM = "batchnorm"  # only BatchNorm scales and shifts


class ReplayLoss(Choice):
    """FineTuneConfig.replay_loss: what replay crops train."""

    DISTILL = "distill"  # the starting model's own predictions (learning without forgetting)
    LABELS = "labels"  # their annotations


class ActivatePolicy(Choice):
    """When ``finetune`` makes its new model version active."""

    IF_BETTER = "if-better"  # if it passes the gate
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class FineTuneConfig:
    """Level 2 on accepted corrections (adaptation.py; issue 18). Defaults chosen on the
    adaptation benchmark (bench/adaptation.py, README): every BatchNorm layer keeps the
    starting model's statistics, Adam at 1e-4 for a fixed number of steps, a loss that
    sees a lesion's extent when its type is open (region Dice), and replay of the model's
    own training slices. ``adaptation.PRESETS["thesis"]`` is the thesis's level 2 (§4.4.2,
    §5.5: first two layers frozen, learning rate 9.8e-6, epochs over the slices)."""

    # Optimisation steps of each member of the soup (below); 0 = ``epochs`` passes over the
    # accepted slices. The default, 2 x 20 steps, takes as many steps as the earlier 40 x 1
    # (README, "Fine-tuning on your corrections").
    steps: int = 20
    epochs: int = 10  # used only when steps = 0 (one crop per slice and pass)
    lr: float = 1e-4
    lr_schedule: str = LrSchedule.CONSTANT.value
    frozen_layers: int = 2
    bn: str = BatchNormMode.FROZEN.value  # TrainConfig.bn
    # Which weights train: "all" (past the frozen layers) or "batchnorm" (only BatchNorm scales
    # and shifts: a few thousand parameters, which adapts the features' calibration to a scan).
    trainable: str = Trainable.ALL.value
    batch_size: int = 4
    crop: int = 256
    loss: str = Loss.CE_REGIONDICE.value
    replay_fraction: float = 0.5  # share of crops drawn from the model's replay slices
    # What replay crops train: "distill" = the starting model's own predictions (learning without
    # forgetting), "labels" = their annotations.
    replay_loss: str = ReplayLoss.DISTILL.value
    # Where a correction leaves the lesion type open (known=infection), also keep the starting
    # model's GGO/consolidation split there (lab bench: experiments/README.md). Off by default.
    keep_open_type: bool = False
    # Interpolate the fine-tuned weights with the starting ones and keep the largest share that
    # passes the gate (1.0 only: no interpolation).
    alphas: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.25)
    foreground_fraction: float = 0.5  # crops centred on corrected lesions
    holdout_every: int = 5  # one corrected slice in 5 is held out for the gate (fewer than 5: none)
    # Fine-tunes from the same start with seeds seed, seed + 1, ...; their weights are averaged
    # (1: one fine-tune). Each takes ``steps`` steps. Over seeds the average gains about what one
    # fine-tune of twice the steps gains, with a narrower spread (README).
    soup: int = 2
    tolerance: float = 0.02  # largest Dice drop on the reference set that still activates
    # Regions whose reference Dice the gate holds within ``tolerance`` (adaptation.GATED_REGIONS).
    # Consolidation too: without it, fine-tunes on MedSeg traded reference consolidation for GGO.
    gate_regions: tuple[str, ...] = (GGO_NAME, CONSOLIDATION_NAME, INFECTION_NAME, LUNG_NAME)
    seed: int = 0


SELFTRAIN_LOSSES = (Loss.CE.value, Loss.CE_DICE.value)  # SelfTrainConfig.loss


@dataclass(frozen=True)
class SelfTrainConfig:
    """Weakly supervised self-learning (thesis §4.4.2, §5.5; selftrain.py).

    Level 1 trains from scratch on the k-means pseudo-labels at ``level1_lr`` for
    ``level1_epochs`` (thesis: 9.8e-4, 20 epochs). Each later level starts from the
    previous one with its first ``frozen_layers`` layers frozen, at ``level2_lr``
    (thesis: 9.8e-6) for ``level2_epochs`` (the thesis gives no number; we reuse 20),
    on the labels the previous level predicts. ``steps_per_epoch=0`` makes an epoch
    one pass over the training slices (ceil(slices / batch_size) steps).
    """

    levels: int = 2  # trained levels ("rounds"): 1 from scratch, 2.. fine-tuned
    level1_lr: float = 9.8e-4
    level1_epochs: int = 20
    level2_lr: float = 9.8e-6
    level2_epochs: int = 20
    frozen_layers: int = 2
    steps_per_epoch: int = 0
    batch_size: int = 8
    crop: int = 128
    loss: str = Loss.CE.value  # SELFTRAIN_LOSSES: ce or ce+dice
    seed: int = 0
    base_filters: int = 16
    lr_schedule: str = LrSchedule.CONSTANT.value  # every level: constant (thesis) or cosine (decays to 2% of its rate)
    # Lung threshold for 8-bit COVID-19-CT-Seg slices mapped to approx. HU (EightBitConfig):
    # they are min-max normalised and CLAHE-enhanced, which puts soft tissue near -500
    # approx. HU, so the thesis's -170 HU finds no lung (see Testing/test_lungs.py).
    # Used only with LungConfig.threshold_method "thesis"; "auto" (default) gives 8-bit
    # slices Otsu's level per slice (weak.lung_config_for, docs/weak_supervision.md).
    eight_bit_lung_threshold_hu: float = -600.0


PIXEL_MM_RANGE = (0.2, 5.0)  # working or assumed pixel sizes accepted from users (CLI, Slicer), mm
# A data set's pixel size in mm when it says nothing (data.dataset_pixel_mm): COVID-19-CT-Seg's
# .npz slices are 512-px scans of 0.7-0.8 mm halved to 256 px (MODEL_CARD.md, docs/hu_lungs.md);
# MedSeg's slices are crops on grids of their own, of no known pixel size (None).
ZENODO_PIXEL_MM = 1.5
MEDSEG_PIXEL_MM: Optional[float] = None


def check_pixel_mm(value: Optional[float], option: str = "--pixel-mm") -> None:
    """InputError unless ``value`` is 0 (the slices' own grid) or within PIXEL_MM_RANGE; None
    (an option left out: the model's or the data set's value) passes."""
    import math

    from .errors import InputError

    if value is None:
        return
    if not (math.isfinite(value) and (value == 0 or PIXEL_MM_RANGE[0] <= value <= PIXEL_MM_RANGE[1])):
        raise InputError(f"{option} must be a pixel size from {PIXEL_MM_RANGE[0]:g} to {PIXEL_MM_RANGE[1]:g} mm, "
                         f"or 0 for the own grid; got {value}")


class Decision(Choice):
    """InferenceConfig.decision: probabilities to labels."""

    ARGMAX = "argmax"
    THRESHOLD = "threshold"  # thesis §4.5


# Working pixel size in mm for CT with a known geometry (segment, Slicer): slices are resampled
# to it for the network and the probabilities back to the CT's own grid before the decision.
# On the CT's own 0.6-0.8 mm grid the bundled model takes dark normal lung for outside air on
# real HU CT: lung Dice against the thesis's lung extraction on clean slices 0.787 native,
# 0.933 at 1.2 mm (flat from 1.0 to 1.6 mm); 1.2 mm is where COVID-19-CT-Seg validation
# infection Dice peaks (docs/hu_lungs.md). What a model without its own (ModelInference) has.
WORKING_PIXEL_MM = 1.2


@dataclass(frozen=True)
class ModelInference:
    """How a model is applied, saved in its checkpoint (``ModelConfig.inference``): the working
    pixel it was trained at and the decision rule and body restriction it was selected with.

    ``InferenceConfig.for_model`` starts from these; ``segment``/``evaluate`` options
    (``--pixel-mm``, ``--decision``) override them. Checkpoints written before this existed
    load with these defaults, the rule every model had until then.
    """

    pixel_mm: float = WORKING_PIXEL_MM  # 0: the slices' own grid (InferenceConfig.pixel_mm None)
    decision: str = Decision.ARGMAX.value  # Decision
    threshold: float = 0.5  # decision "threshold" only (thesis §4.5)
    # Labels outside the patient's body (largest region at or above this HU, holes filled)
    # are background: outside air is never lung. 8-bit slices in approximate HU use each
    # slice's Otsu level instead (inference.restrict_to_body, eight_bit).
    restrict_to_body: bool = True
    body_threshold_hu: float = -500.0

    def __post_init__(self) -> None:
        import math

        if self.decision not in Decision.values():
            raise ValueError(f"decision must be {' or '.join(map(repr, Decision.values()))}, not {self.decision!r}")
        if not (math.isfinite(self.pixel_mm)
                and (self.pixel_mm == 0 or PIXEL_MM_RANGE[0] <= self.pixel_mm <= PIXEL_MM_RANGE[1])):
            raise ValueError(f"the working pixel must be 0 (own grid) or from {PIXEL_MM_RANGE[0]:g} to "
                             f"{PIXEL_MM_RANGE[1]:g} mm, not {self.pixel_mm}")
        if not 0.0 <= self.threshold <= 1.0:  # NaN fails too
            raise ValueError(f"the decision threshold must lie in [0, 1], not {self.threshold}")


@dataclass(frozen=True)
class InferenceConfig:
    """Everything that applies a model to CT: what the model carries (``ModelInference``:
    working pixel, decision, body restriction; :meth:`for_model`) and how this run computes
    (batch, flip, precision). The defaults are those of a model without its own."""

    batch_size: int = 4
    decision: str = ModelInference.decision
    threshold: float = ModelInference.threshold
    restrict_to_body: bool = ModelInference.restrict_to_body
    body_threshold_hu: float = ModelInference.body_threshold_hu
    # Average the class probabilities of the slice and its left-right mirror (2x time).
    flip_tta: bool = False
    # bfloat16 autocast on CPU: "auto" uses it where the CPU has native bf16 arithmetic
    # (x86 avx512_bf16 or AMX, read from /proc/cpuinfo on Linux; elsewhere "auto" is float32;
    # 2.1x faster end to end here, docs/bench_cpu_bf16_2026-11-27.md), "on", or "off".
    cpu_bf16: str = Bf16.AUTO.value
    # bfloat16 autocast on CUDA: "auto" where the GPU computes bf16 (torch.cuda.is_bf16_supported),
    # "on", or "off". Training's validation passes its TrainConfig.bf16 here and in cpu_bf16.
    cuda_bf16: str = Bf16.AUTO.value
    # Working pixel size in mm for CT with a known geometry (WORKING_PIXEL_MM); None: native grid.
    # Slices with no geometry (8-bit .npz / JPEG) run on their own grid unless they are given a
    # pixel size (`evaluate` takes the data set's, data.Sample.pixel_mm, or --slice-pixel-mm).
    pixel_mm: Optional[float] = WORKING_PIXEL_MM

    @classmethod
    def for_model(cls, model: "ModelConfig", **overrides: Any) -> "InferenceConfig":
        """The model's own rule (``model.inference``), with ``overrides`` (InferenceConfig fields;
        ``pixel_mm=None`` is the own grid) on top."""
        m = model.inference
        own = {"pixel_mm": m.pixel_mm or None, "decision": m.decision, "threshold": m.threshold,
               "restrict_to_body": m.restrict_to_body, "body_threshold_hu": m.body_threshold_hu}
        return cls(**{**own, **overrides})


@dataclass(frozen=True)
class ModelConfig:
    """Everything a checkpoint needs to rebuild and apply its network."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    eight_bit: EightBitConfig = field(default_factory=EightBitConfig)
    # Working pixel, decision rule and body restriction; absent from checkpoints written before
    # it existed (the bundled model of 2026-11-27 among them), which load with the defaults, the
    # rule they were made for.
    inference: ModelInference = field(default_factory=ModelInference)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(
            network=NetworkConfig(**d["network"]),
            preprocess=PreprocessConfig(**d["preprocess"]),
            eight_bit=EightBitConfig(**d.get("eight_bit", {})),
            inference=ModelInference(**d.get("inference", {})),
        )

    def with_pixel_mm(self, pixel_mm: Optional[float]) -> "ModelConfig":
        """This config with the working pixel ``pixel_mm`` (None or 0: the slices' own grid)."""
        return replace(self, inference=replace(self.inference, pixel_mm=float(pixel_mm or 0.0)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain types (what checkpoints store: they load with ``weights_only``), its
    enum members as their values."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: v.value if isinstance(v, Enum) else v
                                                               for k, v in items})
