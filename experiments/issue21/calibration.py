"""Issue 21, point 2 ("the GGO/consolidation balance"): does a per-class offset on the
network's log-probabilities, chosen on the validation slices, raise the bundled model's Dice?

The decision becomes argmax_c (log P(c) + b_c), with b_background = b_lung = 0 and a grid of
offsets b_GGO, b_consolidation; the body restriction is applied as ``evaluate`` applies it.
Scored as ``evaluate`` scores (mean Dice over slices): MedSeg on its own grid, COVID-19-CT-Seg
at its 1.5 mm pixel (the data sets' own pixel sizes). Selection criterion: the mean of the five
target Dice of issue 21 (MedSeg GGO, consolidation, infection; COVID-19-CT-Seg infection,
lung) on *validation*; ``--test`` then scores the chosen offsets once on the test part.

    .venv/bin/python experiments/issue21/calibration.py ../shared/data [--flip-tta] [--test B_GGO,B_CONS]

Probabilities are cached in runs/issue21_calibration/ (not committed). Nothing in
DRSegUNetLib imports this.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.data import apply_split, load_split, read_dataset  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.metrics import MetricAccumulator  # noqa: E402

TARGETS = (("medseg", "ggo"), ("medseg", "consolidation"), ("medseg", "infection"),
           ("zenodo", "infection"), ("zenodo", "lung"))
GGO, CONS = 1, 2


def probabilities(pred, samples, cache: Path):
    if cache.exists():
        d = np.load(cache)
        return [d[f"p{i}"] for i in range(len(samples))]
    out = []
    for i, s in enumerate(samples):
        mm = s.pixel_mm
        prob = pred.probabilities(s.hu[None], (mm, mm) if mm else None)
        out.append(prob[0].float().cpu().numpy().astype(np.float16))
        print(f"\r{i + 1}/{len(samples)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{f"p{i}": p for i, p in enumerate(out)})
    return out


def score(pred, samples, probs, b_ggo: float, b_cons: float) -> dict:
    acc = {src: MetricAccumulator(("ggo", "consolidation", "infection", "lung")) for src in ("medseg", "zenodo")}
    w = np.zeros(probs[0].shape[0], np.float32)
    w[GGO], w[CONS] = b_ggo, b_cons
    for s, p in zip(samples, probs):
        logp = np.log(np.maximum(p.astype(np.float32), 1e-8)) + w[:, None, None]
        shifted = torch.from_numpy(np.exp(logp - logp.max(0, keepdims=True)))[None]
        labels = pred.decide_labels(shifted, s.hu[None], eight_bit=s.eight_bit)[0]
        acc[s.source].add(s.name, labels, {r: s.region_truth(r) for r in acc[s.source].regions})
    out = {}
    for src, a in acc.items():
        for r, m in a.summary().items():
            out[f"{src}_{r}"] = m["mean"]["dice"]
    out["target_mean"] = float(np.mean([out[f"{s}_{r}"] for s, r in TARGETS]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("--flip-tta", action="store_true")
    ap.add_argument("--test", default=None, help="B_GGO,B_CONS: score these offsets (and 0,0) on the test part")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    pred = Predictor.from_checkpoint(default_model_path(), device="cpu", flip_tta=args.flip_tta)
    split = load_split(ROOT / "DRSegUNetLib" / "splits" / "default.json")
    part = "test" if args.test else "val"
    samples = []
    for path in (args.shared_data / "medseg" / "train50", args.shared_data / "zenodo20" / "zenodo20_dev.npz"):
        _, val, test = apply_split(read_dataset(path, pred.config.eight_bit), split)
        samples += test if args.test else val
    tag = f"{part}{'_flip' if args.flip_tta else ''}"
    probs = probabilities(pred, samples, ROOT / "runs" / "issue21_calibration" / f"{tag}.npz")
    rows = []
    if args.test:
        grid = [(0.0, 0.0), tuple(float(x) for x in args.test.split(","))]
    else:
        grid = list(itertools.product(np.arange(-0.5, 1.51, 0.25), np.arange(-0.5, 2.01, 0.25)))
    for bg, bc in grid:
        r = score(pred, samples, probs, float(bg), float(bc))
        rows.append({"b_ggo": float(bg), "b_cons": float(bc), **r})
    rows.sort(key=lambda r: -r["target_mean"])
    keys = ["medseg_ggo", "medseg_consolidation", "medseg_infection", "zenodo_infection", "zenodo_lung", "target_mean"]
    print(f"{part} ({len(samples)} slices){' flip TTA' if args.flip_tta else ''}")
    print("b_ggo b_cons | " + " | ".join(keys))
    base = [r for r in rows if r["b_ggo"] == 0 and r["b_cons"] == 0]
    for r in base + rows[:12]:
        print(f"{r['b_ggo']:+.2f} {r['b_cons']:+.2f} | " + " | ".join(f"{r[k]:.3f}" for k in keys))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
