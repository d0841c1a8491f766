"""Issue 18: how much do the corrected slices tell about their neighbours directly, without
training? For each volume of the adaptation benchmark, K evenly spaced slices are corrected
(the experts' masks); every other slice j gets the lesion mask of its nearest corrected slice i
blended into the bundled model's probabilities with weight w0 * exp(-|i - j| / tau), and its
infection Dice is scored. Lab bench; probabilities cached by bias_adapter.py in runs/issue18_bias/.

    .venv/bin/python experiments/issue18/propagation.py ../shared/data --k 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "experiments" / "issue18"))
torch.set_num_threads(1)

from adaptation import correction_labels, evenly, volumes  # noqa: E402
from bias_adapter import bundled_predictor, probs  # noqa: E402

from DRSegUNetLib.metrics import counts, region_mask  # noqa: E402


def blended(p, labels, w):
    """Probabilities (C, H, W) with a corrected slice's label map pulled in with weight w: lesion
    pixels keep the model's GGO:consolidation ratio, lung and background go to their class."""
    p = p.astype(np.float32)
    q = np.zeros_like(p)
    les = (labels == 1) | (labels == 2)
    split = p[1:3] / np.maximum(p[1:3].sum(0), 1e-6)
    q[1:3] = np.where(les, split, 0)
    q[3] = labels == 3
    q[0] = (labels == 0)
    return (1 - w) * p + w * q


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--volumes", default="0,1,2,3,4,5,6,7,8")
    ap.add_argument("--settings", default="0.5:2,0.5:4,0.7:3,0.9:2,0.9:5")
    args = ap.parse_args()
    pred, data = bundled_predictor()
    settings = [tuple(float(v) for v in (s + ":1").split(":")[:3]) for s in args.settings.split(",")]
    print("| volume | K=0 | nearest mask copied | " + " | ".join(f"w0 {a} tau {b:g}{' both' if c == 2 else ''}" for a, b, c in settings) + " |")
    print("|---" * (3 + len(settings)) + "|")
    gains = {s: [] for s in settings}
    by_dist = {}
    for name, pool, spacing, _, known, regions, _ in volumes(args.shared_data, data, args.volumes.split(",")):
        p = probs(pred, pool, lambda s: spacing, f"volume_{name}")
        picked = evenly(len(pool), args.k)
        rest = [i for i in range(len(pool)) if i not in set(picked)]
        corr = {i: correction_labels(pool[i]) for i in picked}

        def dice(labels, s):
            return counts(region_mask(labels, "infection"), s.region_truth("infection")).scores()["dice"]

        def decide(pp, s):
            return pred.decide_labels(torch.from_numpy(pp)[None], s.hu[None], eight_bit=s.eight_bit)[0]

        base, copy, per = [], [], {s: [] for s in settings}
        for j in rest:
            s = pool[j]
            i = min(picked, key=lambda i: abs(i - j))
            dist = abs(i - j)
            lo = max([k for k in picked if k < j], default=None)
            hi = min([k for k in picked if k > j], default=None)
            b = dice(decide(p[j].astype(np.float32), s), s)
            base.append(b)
            c = dice(corr[i], s)
            copy.append(c)
            by_dist.setdefault(min(dist, 12), []).append((b, c))
            for w0, tau, sides in settings:
                if sides == 1:
                    pp = blended(p[j], corr[i], w0 * np.exp(-dist / tau))
                else:
                    pp = p[j].astype(np.float32)
                    ws = {k: w0 * np.exp(-abs(k - j) / tau) for k in (lo, hi) if k is not None}
                    tot = sum(ws.values())
                    mix = sum(w * blended(p[j], corr[k], 1.0) for k, w in ws.items()) / tot
                    a = min(tot, w0)
                    pp = (1 - a) * pp + a * mix
                per[(w0, tau, sides)].append(dice(decide(pp, s), s))
        row = [f"{np.mean(base):.3f}", f"{np.mean(copy):.3f}"]
        for st in settings:
            gains[st].append(np.mean(per[st]) - np.mean(base))
            row.append(f"{np.mean(per[st]) - np.mean(base):+.3f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
    print("mean gain: " + ", ".join(f"{st}: {np.mean(v):+.3f} (worst {min(v):+.3f})" for st, v in gains.items()))
    print("distance: model Dice / copied mask Dice (n)")
    for dist in sorted(by_dist):
        a = np.array(by_dist[dist])
        print(f"  {dist:>2}: {a[:, 0].mean():.3f} / {a[:, 1].mean():.3f} ({len(a)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
