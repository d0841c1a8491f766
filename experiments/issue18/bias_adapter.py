"""Issue 18: how much of a fine-tune's gain is a shift of the lesion extent? Fit two decision
offsets on the K corrected slices instead of training any weight, and score the rest.

For each volume of the adaptation benchmark (bench/adaptation.py: the COVID-19-CT-Seg groups
at 1.5 mm, and MedSeg), the bundled model's probabilities are computed once. The decision
becomes argmax_c (log P(c) + b_c) with b_GGO = b_consolidation = b_lesion, b_lung, b_background
= 0; (b_lesion, b_lung) is the grid point with the best mean Dice of the corrected slices'
known regions (infection and lung, or GGO, consolidation and infection for MedSeg). Then:
the same volume's other slices (infection Dice, the benchmark's "gain") and the gate's
reference slices and the MedSeg audit slices under the same offsets.

    .venv/bin/python experiments/issue18/bias_adapter.py ../shared/data --k 5 [--volumes 0,1,...,medseg]

Probabilities are cached in runs/issue18_bias/ (not committed). Lab bench: nothing in the
product imports this.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
torch.set_num_threads(1)

from adaptation import AUDIT_MEDSEG, evenly, volumes  # noqa: E402  (bench/adaptation.py)

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.adaptation import adaptation_data_path, load_adaptation_data  # noqa: E402
from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.data import read_medseg_folder  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.metrics import counts, region_mask  # noqa: E402

CACHE = ROOT / "runs" / "issue18_bias"
LESION = np.arange(-2.0, 2.01, 0.25)
LUNG = np.arange(-1.0, 1.01, 0.5)


def bundled_predictor():
    """(the bundled model's Predictor on the CPU, its shipped adaptation data)."""
    bundled = default_model_path()
    ckpt = load_checkpoint(bundled)
    data = load_adaptation_data(adaptation_data_path(bundled), ckpt.config.eight_bit)
    return Predictor(ckpt.build_model(), ckpt.config, "cpu"), data


def probs(pred, samples, spacing_of, tag):
    path = CACHE / f"{tag}.npz"
    if path.exists():
        d = np.load(path)
        return [d[f"p{i}"] for i in range(len(samples))]
    out = []
    for i, s in enumerate(samples):
        sp = spacing_of(s)
        out.append(pred.probabilities(s.hu[None], sp)[0].float().numpy().astype(np.float16))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"p{i}": p for i, p in enumerate(out)})
    return out


def dice_rows(pred, samples, prob, regions, b_lesion, b_lung):
    w = np.array([0.0, b_lesion, b_lesion, b_lung], np.float32)[:, None, None]
    rows = []
    for s, p in zip(samples, prob):
        logp = np.log(np.maximum(p.astype(np.float32), 1e-8)) + w
        labels = pred.decide_labels(torch.from_numpy(np.exp(logp - logp.max(0)))[None], s.hu[None],
                                    eight_bit=s.eight_bit)[0]
        row = {}
        for r in regions:
            t = s.region_truth(r)
            if t is not None:
                sc = counts(region_mask(labels, r), t).scores()
                if sc is not None:
                    row[r] = sc["dice"]
        rows.append(row)
    return rows


def mean(rows, region):
    v = [r[region] for r in rows if region in r]
    return float(np.mean(v)) if v else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--volumes", default="0,1,2,3,4,5,6,7,8,medseg")
    args = ap.parse_args()
    pred, data = bundled_predictor()
    audit = [s for s in read_medseg_folder(args.shared_data / "medseg" / "train50") if s.name in AUDIT_MEDSEG]
    ref = list(data.reference)
    ref_p = probs(pred, ref, lambda s: data.spacing.get(s.name), "reference")
    audit_p = probs(pred, audit, lambda s: None, "audit")
    ref_regions = ("ggo", "infection", "lung")
    ref0 = dice_rows(pred, ref, ref_p, ref_regions, 0.0, 0.0)
    audit0 = dice_rows(pred, audit, audit_p, ("ggo", "infection"), 0.0, 0.0)
    print(f"K = {args.k} evenly spaced corrected slices; offsets fitted on them")
    print("| volume | b_lesion | b_lung | corrected slices infection | rest infection (K=0 -> offsets) | gain | "
          "reference GGO | reference infection | audit GGO |")
    print("|---|---|---|---|---|---|---|---|---|")
    gains = []
    for name, pool, spacing, _, known, regions, _ in volumes(args.shared_data, data, args.volumes.split(",")):
        p = probs(pred, pool, lambda s: spacing, f"volume_{name}")
        picked = evenly(len(pool), args.k)
        rest = [i for i in range(len(pool)) if i not in set(picked)]
        fit_regions = [r for r in regions]
        best = None
        for bl, bu in itertools.product(LESION, LUNG):
            rows = dice_rows(pred, [pool[i] for i in picked], [p[i] for i in picked], fit_regions, bl, bu)
            score = np.nanmean([mean(rows, r) for r in fit_regions])
            if best is None or score > best[0] + 1e-9:
                best = (score, bl, bu, mean(rows, "infection"))
        _, bl, bu, fit_inf = best
        rest_s, rest_p = [pool[i] for i in rest], [p[i] for i in rest]
        before = mean(dice_rows(pred, rest_s, rest_p, ("infection",), 0.0, 0.0), "infection")
        after = mean(dice_rows(pred, rest_s, rest_p, ("infection",), bl, bu), "infection")
        ref1 = dice_rows(pred, ref, ref_p, ref_regions, bl, bu)
        audit1 = dice_rows(pred, audit, audit_p, ("ggo",), bl, bu)
        gains.append(after - before)
        print(f"| {name} | {bl:+.2f} | {bu:+.2f} | {fit_inf:.3f} | {before:.3f} -> {after:.3f} | {after - before:+.3f} | "
              f"{mean(ref0, 'ggo'):.3f} -> {mean(ref1, 'ggo'):.3f} | {mean(ref0, 'infection'):.3f} -> "
              f"{mean(ref1, 'infection'):.3f} | {mean(audit0, 'ggo'):.3f} -> {mean(audit1, 'ggo'):.3f} |", flush=True)
    print(f"mean gain {np.mean(gains):+.3f}, worst {min(gains):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
