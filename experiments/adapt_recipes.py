"""Lab bench (issue 18): which fine-tuning recipe makes the *rest* of a volume better?

In-process and quick, to choose defaults; the product benchmark is bench/adaptation.py.
For each COVID-19-CT-Seg group and MedSeg: K evenly spaced slices become corrections
(expert masks), the bundled model is fine-tuned with a recipe, and infection Dice on the
volume's other slices and GGO Dice on a MedSeg reference set are compared with K = 0.

    .venv/bin/python experiments/adapt_recipes.py --recipe bnfrozen_lr1e-4 --out runs/adapt/r1.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.config import InferenceConfig, TrainConfig  # noqa: E402
from DRSegUNetLib.data import Sample, read_medseg_folder, read_zenodo_npz, resample_sample  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.metrics import MetricAccumulator  # noqa: E402
from DRSegUNetLib.training import AugmentConfig, train  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
Z_MM = 1.5
MEDSEG_REF = ["10", "23", "25", "43", "45", "56"]

RECIPES = {
    "thesis": dict(steps=None, epochs=10, lr=9.8e-6, frozen=2, bn="train", replay=0.0, crop=256, bs=4),
    "A_rd_lr1e-4_replay": dict(steps=40, lr=1e-4, frozen=2, bn="frozen", replay=0.3, crop=256, bs=4, loss="ce+regiondice"),
    "B_rd_lr3e-5_replay": dict(steps=40, lr=3e-5, frozen=2, bn="frozen", replay=0.3, crop=256, bs=4, loss="ce+regiondice"),
    "C_rd_lr1e-4": dict(steps=40, lr=1e-4, frozen=2, bn="frozen", replay=0.0, crop=256, bs=4, loss="ce+regiondice"),
    "D_rd_lr1e-4_replay_bntrain": dict(steps=40, lr=1e-4, frozen=2, bn="train", replay=0.3, crop=256, bs=4, loss="ce+regiondice"),
    "E_rd_lr2e-4_replay": dict(steps=40, lr=2e-4, frozen=2, bn="frozen", replay=0.3, crop=256, bs=4, loss="ce+regiondice"),
    "G_rd_lr1e-4_replay50": dict(steps=40, lr=1e-4, frozen=2, bn="frozen", replay=0.5, crop=256, bs=4, loss="ce+regiondice"),
    "H_rd_lr1e-4_replay_dec": dict(steps=40, lr=1e-4, frozen=35, bn="frozen", replay=0.3, crop=256, bs=4, loss="ce+regiondice"),
    "A_noaug": dict(steps=40, lr=1e-4, frozen=2, bn="frozen", replay=0.3, crop=256, bs=4, loss="ce+regiondice",
                    aug=dict(rotate_deg=0.0, scale=(1.0, 1.0), hu_gain=(1.0, 1.0), hu_shift=0.0, gamma=(1.0, 1.0),
                             noise_hu=0.0, blur_sigma=0.0)),
    "F_ce_lr1e-4_replay": dict(steps=40, lr=1e-4, frozen=2, bn="frozen", replay=0.3, crop=256, bs=4, loss="ce"),
}


def score(pred: Predictor, samples, spacing, regions=("infection", "lung", "ggo", "consolidation")):
    acc = MetricAccumulator(regions)
    for s in samples:
        lab = pred.predict_slices([s.hu], spacing=spacing, eight_bit=True)[0]
        acc.add(s.name, lab, {r: s.region_truth(r) for r in regions})
    return {r: v["mean"]["dice"] for r, v in acc.summary().items()}


def evenly(n: int, k: int) -> list[int]:
    return [int(round((i + 0.5) * n / k - 0.5)) for i in range(k)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--volumes", default="0,1,2,3,4,5,6,7,8,medseg")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = RECIPES[args.recipe]
    ckpt = load_checkpoint(default_model_path())
    zen = read_zenodo_npz(SHARED / "zenodo20" / "zenodo20_dev.npz")
    med = read_medseg_folder(SHARED / "medseg" / "train50")
    ref_med = [s for s in med if s.name in MEDSEG_REF]
    replay_med = [s for s in med if s.name in ("3", "8", "14", "19", "33", "51")]
    by_group = {}
    for s in zen:
        by_group.setdefault(s.group, []).append(s)
    replay_z = {g: [v[i] for i in evenly(len(v), 2)] for g, v in by_group.items()}
    base = Predictor(ckpt.build_model(), ckpt.config, "cpu", InferenceConfig(pixel_mm=1.2))
    cache_path = Path(args.out).parent / "baseline_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if "ref" not in cache:
        cache["ref"] = score(base, ref_med, None, ("ggo", "consolidation", "infection"))
    results = {"recipe": args.recipe, "params": r, "k": args.k, "ref_before": cache["ref"], "volumes": {}}
    for vol in args.volumes.split(","):
        if vol == "medseg":
            pool = [s for s in med if s.name not in MEDSEG_REF and s.name not in {m.name for m in replay_med}]
            spacing = None
        else:
            pool = by_group[f"zenodo{vol}"]
            spacing = (Z_MM, Z_MM)
        idx = evenly(len(pool), args.k)
        corr = [pool[i] for i in idx]
        rest = [s for i, s in enumerate(pool) if i not in set(idx)]
        key = f"{vol}:{args.k}"
        if key not in cache:
            cache[key] = score(base, rest, spacing)
            cache_path.write_text(json.dumps(cache, indent=1))
        before = cache[key]
        train_s = [replace(resample_sample(s, spacing, 1.2) if spacing else s, group="corrections") for s in corr]
        replay = [] if not r["replay"] else (
            [s for s in replay_med if vol != "medseg"]
            + [resample_sample(s, (Z_MM, Z_MM), 1.2) for g, v in replay_z.items() if g != f"zenodo{vol}" for s in v])
        weights = ()
        if replay:
            srcs = sorted({s.source for s in replay})
            weights = (("corrections", 1 - r["replay"]),) + tuple((src, r["replay"] / len(srcs)) for src in srcs)
        steps = r["steps"] or max(1, -(-len(train_s) // r["bs"])) * r["epochs"]
        cfg = TrainConfig(epochs=1, steps_per_epoch=steps, batch_size=r["bs"], crop=r["crop"], lr=r["lr"],
                          frozen_layers=r["frozen"], bn=r["bn"], source_weights=weights, loss=r.get("loss", "ce"))
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            res = train(train_s + replay, [], tmp, cfg, init=ckpt, device="cpu",
                        augment=AugmentConfig(**r.get("aug", {})))
        t_ft = time.time() - t0
        new = Predictor(res.model, ckpt.config, "cpu", InferenceConfig(pixel_mm=1.2))
        after = score(new, rest, spacing)
        ref_after = score(new, ref_med, None, ("ggo", "consolidation", "infection"))
        row = {"before": before, "after": after, "ref_after": ref_after, "seconds": round(t_ft, 1),
               "n_rest": len(rest), "gain_infection": after["infection"] - before["infection"]}
        results["volumes"][vol] = row
        print(f"{vol:7s} inf {before['infection']:.3f} -> {after['infection']:.3f} ({row['gain_infection']:+.3f}) "
              f"ref ggo {cache['ref']['ggo']:.3f} -> {ref_after['ggo']:.3f}  {t_ft:.0f}s", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    gains = [v["gain_infection"] for v in results["volumes"].values()]
    print(f"mean gain {np.mean(gains):+.3f} min {min(gains):+.3f}")
    cache_path.write_text(json.dumps(cache, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
