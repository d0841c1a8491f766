"""Thesis §3.7 metrics per region: Dice, IoU, precision, recall, F1.

Regions (vocabulary.REGIONS): ggo, consolidation, infection = GGO ∪ consolidation,
lung = the whole lung field (labels 1-3). For binary masks F1 equals Dice; both
are reported because the thesis lists both.

Empty cases are defined, not NaN-by-accident: when a region is absent from both
prediction and truth on a slice, that slice's scores for the region are ``None``
and the slice is left out of the per-slice mean (it is counted in
``n_empty_both``); pooled scores sum counts over all pixels of all slices. A ratio
whose denominator is zero otherwise (e.g. precision with no predicted pixel) is 0.

:func:`threshold_averaged_dice` scores a probability map instead of labels: Dice
averaged over 256 thresholds, as Inf-Net's evaluation does (crossval.py).
:class:`GroupedMetrics` keeps the scores per group (case) too; :func:`label_agreement`
scores label maps against other label maps (self-training's levels).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np

from .vocabulary import REGIONS

if TYPE_CHECKING:
    from .slices import SliceInput

METRIC_NAMES = ("dice", "iou", "precision", "recall", "f1")


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, o: "Counts") -> "Counts":
        self.tp += o.tp
        self.fp += o.fp
        self.fn += o.fn
        return self

    def scores(self) -> dict[str, float] | None:
        tp, fp, fn = self.tp, self.fp, self.fn
        if tp + fp + fn == 0:
            return None
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "dice": 2 * tp / (2 * tp + fp + fn),
            "iou": tp / (tp + fp + fn),
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }


def counts(pred: np.ndarray, truth: np.ndarray) -> Counts:
    pred, truth = pred.astype(bool), truth.astype(bool)
    tp = int(np.count_nonzero(pred & truth))
    return Counts(tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp)


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    return np.isin(labels, REGIONS[region])


def region_areas_cm2(labels: np.ndarray, pixel_mm: float,
                     regions: Iterable[str] = tuple(REGIONS)) -> dict[str, float]:
    """Area of each region of a label slice (or summed over a stack of slices) in cm², for
    square pixels of ``pixel_mm``."""
    cm2 = float(pixel_mm) ** 2 / 100.0
    return {r: float(np.count_nonzero(region_mask(labels, r))) * cm2 for r in regions}


class MetricAccumulator:
    """Collects per-slice and pooled scores per region over many slices."""

    def __init__(self, regions: Iterable[str] = tuple(REGIONS)) -> None:
        self.regions = tuple(regions)
        self.pooled = {r: Counts() for r in self.regions}
        self.per_slice: dict[str, list[dict[str, float] | None]] = {r: [] for r in self.regions}
        self.slice_names: dict[str, list[str]] = {r: [] for r in self.regions}

    def add(self, name: str, pred_labels: np.ndarray, truths: dict[str, np.ndarray | None]) -> None:
        """``truths[region]`` is the binary truth or None when the slice does not decide it."""
        for r in self.regions:
            t = truths.get(r)
            if t is None:
                continue
            c = counts(region_mask(pred_labels, r), t)
            self.pooled[r] += c
            self.per_slice[r].append(c.scores())
            self.slice_names[r].append(name)

    def summary(self) -> dict[str, dict]:
        out = {}
        for r in self.regions:
            scored = [s for s in self.per_slice[r] if s is not None]
            n = len(self.per_slice[r])
            if n == 0:
                continue
            out[r] = {
                "n_slices": n,
                "n_empty_both": n - len(scored),
                "mean": {m: (float(np.mean([s[m] for s in scored])) if scored else None) for m in METRIC_NAMES},
                "std": {m: (float(np.std([s[m] for s in scored])) if scored else None) for m in METRIC_NAMES},
                "pooled": self.pooled[r].scores(),
            }
        return out


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
    """Scores of label maps against other label maps (e.g. a self-training level vs its pseudo-labels)."""
    gm = GroupedMetrics(regions)
    for pred, ref, inp in zip(preds, refs, inputs):
        for j in range(len(inp)):
            gm.add(inp.groups[j], inp.names[j], pred[j], {r: region_mask(ref[j], r) for r in gm.regions})
    return {"all": gm.summary(), "by_group": gm.by_group()}


def mean_dice(summary: dict[str, dict], regions: Iterable[str] = tuple(REGIONS)) -> float:
    """Mean over regions of the per-slice mean Dice (regions absent from the summary skipped)."""
    vals = [summary[r]["mean"]["dice"] for r in regions if r in summary and summary[r]["mean"]["dice"] is not None]
    return float(np.mean(vals)) if vals else 0.0


def threshold_averaged_dice(prob: np.ndarray, truth: np.ndarray, n_thresholds: int = 256,
                            both_empty: float = 1.0) -> float:
    """Dice averaged over binarisation thresholds of a probability map (Inf-Net style).

    Thresholds ``t = linspace(0, 1, n_thresholds)`` (256: 0, 1/255, ..., 1, the values
    of Inf-Net's MATLAB ``Thresholds = 1:-1/255:0``); at each one the prediction is
    ``prob >= t`` and Dice = 2|P ∩ T| / (|P| + |T|). The result is the mean over the
    thresholds. Empty case: at a threshold where both the prediction and ``truth`` are
    empty, that threshold's Dice is ``both_empty`` (default 1: nothing to find, nothing
    found). Inf-Net's tool scores any threshold without a true positive as 0, both
    empty included: ``both_empty=0`` reproduces that. (t = 0 selects every pixel, so
    a slice with empty truth can never reach 1.)

    ``prob`` and ``truth`` have the same shape; ``prob`` is in [0, 1] (no per-map
    min-max rescaling is done).
    """
    prob = np.asarray(prob, dtype=np.float64).ravel()
    truth = np.asarray(truth).astype(bool).ravel()
    if prob.shape != truth.shape:
        raise ValueError(f"prob and truth differ in size: {prob.size} vs {truth.size}")
    if n_thresholds < 2:
        raise ValueError("n_thresholds must be at least 2")
    t = np.linspace(0.0, 1.0, n_thresholds)
    # Counts of prob >= t: all pixels minus those strictly below t (exact, no binning).
    all_sorted, true_sorted = np.sort(prob), np.sort(prob[truth])
    n_pred = prob.size - np.searchsorted(all_sorted, t, side="left")
    tp = true_sorted.size - np.searchsorted(true_sorted, t, side="left")
    denom = n_pred + true_sorted.size
    dice = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), both_empty)
    return float(dice.mean())


class ThresholdAveragedAccumulator:
    """Threshold-averaged Dice per source and region, slice by slice (see
    :func:`threshold_averaged_dice`). A region's probability is the sum of its classes'
    (infection: GGO + consolidation; lung: GGO + consolidation + lung); slices whose
    annotation does not decide the region (truth None) are left out, empty truth counts."""

    def __init__(self, n_thresholds: int = 256) -> None:
        self.n_thresholds = n_thresholds
        self.values: dict[str, dict[str, list[float]]] = {}
        self.empty: dict[str, dict[str, int]] = {}

    def add(self, source: str, prob: np.ndarray, truths: dict[str, np.ndarray | None]) -> None:
        """``prob``: (C, H, W) class probabilities of one slice; ``truths``: region -> mask or None."""
        for r, t in truths.items():
            if t is None:
                continue
            p = prob[list(REGIONS[r])].sum(axis=0)
            self.values.setdefault(source, {}).setdefault(r, []).append(threshold_averaged_dice(p, t, self.n_thresholds))
            empty = self.empty.setdefault(source, {})
            empty[r] = empty.get(r, 0) + int(not t.any())

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {src: {r: {"mean": float(np.mean(v)), "n_slices": len(v), "n_empty_truth": self.empty[src][r],
                          "per_slice": v} for r, v in regs.items()} for src, regs in self.values.items()}

