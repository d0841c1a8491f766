"""How far can level 2 beat the k-means pseudo-labels? Upper bounds from the expert masks.

Issue 4 asks that level 2 of the self-training (thesis §4.4.2) beat its k-means
pseudo-labels by 0.10 infection Dice against the experts. A network trained on labels
reproduces them; what it can add is a better *ranking* of pixels. This script measures,
against the expert infection masks of a COVID-19-CT-Seg ``.npz`` (zenodo20_dev.npz):

- ``pseudo-labels``: the level-0 labels as ``selftrain`` wrote them;
- ``oracle intensity threshold``: for every slice, the best Dice of any threshold on the
  8-bit grey value inside the pseudo-labels' lung field (every distinct value tried, the
  best one picked per slice *with the expert mask*). No intensity rule applied per slice,
  k-means included, can beat it;
- ``level K argmax``: the checkpoint's labels (as ``selftrain`` labels the slices);
- ``level K P(infection) > t``: the summed GGO + consolidation softmax cut at a fixed t
  (``--cuts``);
- ``level K top a x PL area`` / ``top a x argmax area``: per slice, the k pixels of highest
  P(infection), k = a times the slice's pseudo-label infection area, or a times the level's
  own argmax infection area (``--area-factors``). Like the fixed cuts these use no expert
  mask: they are candidate rules for turning a level's output into the next level's labels;
- ``oracle threshold of level K P(infection)``: per slice, the best of 101 cuts
  (0, 0.01, ..., 1), chosen with the expert mask. No relabelling of the slices that keeps
  the network's ranking of pixels, level 2's included, can beat it.

The oracles peek at the answers, so they are bounds, not methods.

    python experiments/weak_supervision/weak_ceiling.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        --pseudolabels runs/weak5/st/level0/labels.npz --model runs/weak5/st/level1/best.pt \\
        --json out/weak_ceiling.json

Groups 0-4 are those the pseudo-label rules were chosen on; 5-8 were held out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.labelmaps import labels_for_dataset  # noqa: E402
from DRSegUNetLib.slices import read_slices  # noqa: E402
from DRSegUNetLib.vocabulary import CONSOLIDATION, GGO  # noqa: E402

CUTS = "0.05,0.1,0.2,0.3,0.5,0.7,0.9"
AREA_FACTORS = "1,1.5,2"


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & truth).sum()) / s


def best_cut_dice(score: np.ndarray, inside: np.ndarray, truth: np.ndarray, levels: int) -> float:
    """Best Dice over every cut ``score >= v`` (v = 0..levels-1) of integer scores within ``inside``."""
    n_truth = int(truth.sum())
    s = score[inside]
    n_pred = np.cumsum(np.bincount(s, minlength=levels)[::-1])[::-1]  # pixels with score >= v
    n_tp = np.cumsum(np.bincount(s[truth[inside]], minlength=levels)[::-1])[::-1]
    denom = n_pred + n_truth  # expert infection outside ``inside`` counts as missed
    return float(np.where(denom > 0, 2.0 * n_tp / np.maximum(denom, 1), 1.0).max())


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest pixels of ``score`` (ties broken arbitrarily)."""
    out = np.zeros(score.size, dtype=bool)
    k = int(min(max(k, 0), score.size))
    if k:
        out[np.argpartition(-score.ravel(), k - 1)[:k]] = True
    return out.reshape(score.shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="COVID-19-CT-Seg .npz with ct_uint8, infection_mask, group")
    ap.add_argument("--pseudolabels", required=True, help="selftrain's level0/labels.npz (or pseudolabel's output)")
    ap.add_argument("--model", action="append", default=[], metavar="CKPT",
                    help="a level's checkpoint (repeatable), e.g. runs/weak5/st/level1/best.pt")
    ap.add_argument("--cuts", default=CUTS, help=f"fixed cuts of P(infection) (default {CUTS})")
    ap.add_argument("--area-factors", default=AREA_FACTORS,
                    help=f"top-k rules: k = factor x pseudo-label / argmax infection area (default {AREA_FACTORS})")
    ap.add_argument("--held-out-from", type=int, default=5, help="first held-out group (default 5)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the table as JSON here too")
    args = ap.parse_args(argv)

    cuts = [float(c) for c in args.cuts.split(",") if c]
    factors = [float(a) for a in args.area_factors.split(",") if a]
    with np.load(args.data) as d:
        ct, truth_all, group = d["ct_uint8"], d["infection_mask"] > 0, d["group"]
    pl = labels_for_dataset(args.pseudolabels, args.data, len(ct))
    parts = {f"groups <{args.held_out_from} (chosen on)": group < args.held_out_from,
             f"groups >={args.held_out_from} (held out)": group >= args.held_out_from,
             "all": np.ones(len(ct), bool)}
    rows: dict[str, np.ndarray] = {}
    t0 = time.time()
    pl_inf = np.isin(pl, (GGO, CONSOLIDATION))
    rows["pseudo-labels"] = np.array([dice(pl_inf[i], truth_all[i]) for i in range(len(ct))])
    rows["oracle intensity threshold in the lung field"] = np.array(
        [best_cut_dice(ct[i], pl[i] > 0, truth_all[i], 256) for i in range(len(ct))])
    if args.model:
        hu = read_slices(args.data).hu
    short = [Path(path).parent.name or path for path in args.model]
    names = short if len(set(short)) == len(short) else [str(Path(path).parent) for path in args.model]
    for path, name in zip(args.model, names):  # two runs' level1/best.pt: named by their folders
        predictor = Predictor.from_checkpoint(path, args.device, batch_size=args.batch_size)
        per: dict[str, list[float]] = {"argmax": [], **{f"P(infection) > {c:g}": [] for c in cuts},
                                       **{f"top {a:g} x {w} area": [] for w in ("PL", "argmax") for a in factors},
                                       "oracle": []}
        for start in range(0, len(ct), args.batch_size):
            labels, prob = predictor.labels(hu[start:start + args.batch_size], eight_bit=True)
            p_inf = (prob[:, GGO] + prob[:, CONSOLIDATION]).float().cpu().numpy()
            for j in range(len(labels)):
                t = truth_all[start + j]
                am = np.isin(labels[j], (GGO, CONSOLIDATION))
                per["argmax"].append(dice(am, t))
                for c in cuts:
                    per[f"P(infection) > {c:g}"].append(dice(p_inf[j] > c, t))
                for w, area in (("PL", int(pl_inf[start + j].sum())), ("argmax", int(am.sum()))):
                    for a in factors:
                        per[f"top {a:g} x {w} area"].append(dice(top_k(p_inf[j], round(a * area)), t))
                q = np.clip(np.floor(p_inf[j] * 100 + 1e-6), 0, 100).astype(np.int64)
                per["oracle"].append(best_cut_dice(q, np.ones_like(t), t, 101))
        for k, v in per.items():
            label = f"oracle threshold of {name} P(infection)" if k == "oracle" else f"{name} {k}"
            rows[label] = np.asarray(v)
    table = {r: {p: float(v[m].mean()) for p, m in parts.items()} for r, v in rows.items()}
    target = {p: table["pseudo-labels"][p] + 0.10 for p in parts}
    print(f"# infection Dice against the expert masks, mean over slices ({args.data}; {time.time() - t0:.0f} s)\n")
    print("| labels | " + " | ".join(f"{p} ({int(m.sum())} slices)" for p, m in parts.items()) + " |")
    print("|---|" + "---|" * len(parts))
    for r, v in table.items():
        print(f"| {r} | " + " | ".join(f"{v[p]:.3f}" for p in parts) + " |")
    print("| *issue 4's target: pseudo-labels + 0.10* | " + " | ".join(f"*{target[p]:.3f}*" for p in parts) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"data": args.data, "pseudolabels": args.pseudolabels,
                                               "models": args.model, "table": table, "target": target}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
