"""Thesis §3.7 metrics per region: Dice, IoU, precision, recall, F1.

Regions (vocabulary.REGIONS): ggo, consolidation, infection = GGO ∪ consolidation,
lung = the whole lung field (labels 1-3). For binary masks F1 equals Dice; both
are reported because the thesis lists both.

Empty cases are defined, not NaN-by-accident: when a region is absent from both
prediction and truth on a slice, that slice's scores for the region are ``None``
and the slice is left out of the per-slice mean (it is counted in
``n_empty_both``); pooled scores sum counts over all pixels of all slices. A ratio
whose denominator is zero otherwise (e.g. precision with no predicted pixel) is 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .vocabulary import REGIONS

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


def mean_dice(summary: dict[str, dict], regions: Iterable[str] = tuple(REGIONS)) -> float:
    """Mean over regions of the per-slice mean Dice (regions absent from the summary skipped)."""
    vals = [summary[r]["mean"]["dice"] for r in regions if r in summary and summary[r]["mean"]["dice"] is not None]
    return float(np.mean(vals)) if vals else 0.0
