"""Issue 21: is checkpoint B better than checkpoint A on the five targets, beyond slice noise?

Scores each checkpoint (and, with ``--ensemble``, the mean of their probabilities) as
``evaluate`` scores: mean Dice over slices, MedSeg on its own grid, COVID-19-CT-Seg at its
1.5 mm pixel resampled to the model's working pixel, argmax and the body restriction. Then,
for each model against the first, the paired difference per target with a bootstrap
interval: slices are resampled with replacement within each data set, both models keep the
same draw. The six MedSeg validation slices and ten test slices make these intervals wide;
the point of the script is to say how wide.

    .venv/bin/python experiments/issue21/compare.py ../shared/data A.pt B.pt [--part val|test] [--ensemble]

Probabilities are cached in runs/issue21_compare/ (not committed), one file per checkpoint
(by sha256) and part. One torch thread. Nothing in DRSegUNetLib imports this.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from DRSegUNetLib.data import apply_split, load_split, read_dataset  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.metrics import counts, region_mask  # noqa: E402

TARGETS = (("medseg", "ggo"), ("medseg", "consolidation"), ("medseg", "infection"),
           ("zenodo", "infection"), ("zenodo", "lung"))
GOALS = {"medseg_ggo": 0.62, "medseg_consolidation": 0.45, "medseg_infection": 0.75,
         "zenodo_infection": 0.62, "zenodo_lung": 0.97}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def cache_path(model: Path, tag: str) -> Path:
    """Where :func:`probabilities` keeps ``model``'s probabilities for a part (``tag``: val, test, val_flip ...)."""
    return ROOT / "runs" / "issue21_compare" / f"{_sha(model)}_{tag}.npz"


def load_samples(shared: Path, pred: Predictor, part: str):
    split = load_split(ROOT / "DRSegUNetLib" / "splits" / "default.json")
    out = []
    for path in (shared / "medseg" / "train50", shared / "zenodo20" / "zenodo20_dev.npz"):
        _, val, test = apply_split(read_dataset(path, pred.config.eight_bit), split)
        out += val if part == "val" else test
    return out


def probabilities(pred: Predictor, samples, cache: Path):
    if cache.exists():
        d = np.load(cache)
        return [d[f"p{i}"].astype(np.float32) for i in range(len(samples))]
    out = []
    for i, s in enumerate(samples):
        mm = s.pixel_mm
        out.append(pred.probabilities(s.hu[None], (mm, mm) if mm else None)[0].float().cpu().numpy())
    print(f"{cache.stem}: {len(samples)} slices scored", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{f"p{i}": p.astype(np.float16) for i, p in enumerate(out)})
    return out


def decided(pred: Predictor, samples, probs) -> list:
    """The label map of each slice: ``probs`` under the model's own decision rule."""
    return [pred.decide_labels(torch.from_numpy(p)[None], s.hu[None], eight_bit=s.eight_bit)[0]
            for s, p in zip(samples, probs)]


def per_slice(pred: Predictor, samples, probs) -> dict[str, dict[str, float]]:
    """{target: {slice name: Dice}}; slices where truth and prediction are both empty are left out."""
    return per_slice_labels(samples, decided(pred, samples, probs))


def per_slice_labels(samples, labels_list) -> dict[str, dict[str, float]]:
    """As :func:`per_slice`, of label maps given slice by slice."""
    out: dict[str, dict[str, float]] = {f"{s}_{r}": {} for s, r in TARGETS}
    for s, labels in zip(samples, labels_list):
        for src, region in TARGETS:
            truth = s.region_truth(region) if s.source == src else None
            if truth is None:
                continue
            sc = counts(region_mask(labels, region), truth).scores()
            if sc is not None:
                out[f"{src}_{region}"][s.name] = sc["dice"]
    return out


def bootstrap(a: dict, b: dict, n: int, rng: np.random.Generator) -> tuple[float, float, float]:
    names = sorted(set(a) & set(b))
    d = np.array([b[k] - a[k] for k in names])
    draws = rng.integers(0, len(d), size=(n, len(d)))
    means = d[draws].mean(1)
    return float(d.mean()), float(np.percentile(means, 5)), float(np.percentile(means, 95))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("models", nargs="+", type=Path, help="checkpoints; the first is the baseline")
    ap.add_argument("--part", choices=("val", "test"), default="val")
    ap.add_argument("--ensemble", action="store_true", help="also score the mean of the models' probabilities")
    ap.add_argument("--flip-tta", action="store_true")
    ap.add_argument("--boot", type=int, default=5000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    preds = [Predictor.from_checkpoint(m, device="cpu", cpu_bf16="off", flip_tta=args.flip_tta) for m in args.models]
    samples = load_samples(args.shared_data, preds[0], args.part)
    names = [m.parent.name + "/" + m.name for m in args.models]
    tag = f"{args.part}{'_flip' if args.flip_tta else ''}"
    probs = [probabilities(p, samples, cache_path(m, tag))
             for p, m in zip(preds, args.models)]
    scores = [per_slice(p, samples, pr) for p, pr in zip(preds, probs)]
    if args.ensemble and len(probs) > 1:
        mean = [np.mean([pr[i] for pr in probs], axis=0) for i in range(len(samples))]
        scores.append(per_slice(preds[0], samples, mean))
        names.append("ensemble of all")
    rng = np.random.default_rng(0)
    keys = [f"{s}_{r}" for s, r in TARGETS]
    print(f"{args.part}: {len(samples)} slices{', flip TTA' if args.flip_tta else ''}; mean Dice over slices "
          f"(difference to the first row, 90 % paired bootstrap interval over slices)")
    print("| model | " + " | ".join(keys) + " | mean of five |")
    print("|---|" + "---|" * (len(keys) + 1))
    rows = []
    for name, sc in zip(names, scores):
        means = {k: float(np.mean(list(sc[k].values()))) for k in keys}
        means["mean_of_five"] = float(np.mean([means[k] for k in keys]))
        cells = [f"{means[k]:.3f}" for k in keys] + [f"{means['mean_of_five']:.3f}"]
        diffs = {}
        if sc is not scores[0]:
            for j, k in enumerate(keys):
                d, lo, hi = bootstrap(scores[0][k], sc[k], args.boot, rng)
                diffs[k] = (d, lo, hi)
                cells[j] += f" ({d:+.3f}, {lo:+.3f} to {hi:+.3f})"
        rows.append({"model": name, "mean": means, "diff": diffs, "n": {k: len(sc[k]) for k in keys}})
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("targets: " + ", ".join(f"{k} >= {v}" for k, v in GOALS.items()))
    if args.json:
        args.json.write_text(json.dumps({"part": args.part, "flip_tta": args.flip_tta, "rows": rows,
                                         "per_slice": dict(zip(names, scores))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
