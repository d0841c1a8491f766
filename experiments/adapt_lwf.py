"""Lab bench (issue 18): the library's finetune() (distillation on replay crops, gate-chosen
weight interpolation) on one COVID-19-CT-Seg group or MedSeg, K = 5 evenly spaced corrections.
Scores the rest of the volume, the gate's reference, and MedSeg test ids as an audit set
that neither training nor the gate sees.

    .venv/bin/python experiments/adapt_lwf.py 3 --set replay_loss=distill
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.adaptation import (CorrectionSlice, adaptation_data_path, finetune, load_adaptation_data,  # noqa: E402
                                     preset, score_samples)
from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.config import InferenceConfig  # noqa: E402
from DRSegUNetLib.data import read_medseg_folder, read_zenodo_npz  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from adaptation import correction_labels, evenly  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
AUDIT = ["1", "2", "26", "30", "41", "42", "46", "47", "49", "57"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("volume")
    ap.add_argument("--set", action="append", default=[], help="FineTuneConfig field=value")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=3, help="score every N-th rest slice")
    ap.add_argument("--extra-medseg-replay", type=int, default=0,
                    help="add this many MedSeg training slices (not shipped, not audit) to the replay set")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = {}
    for kv in args.set:
        k, v = kv.split("=")
        over[k] = eval(v) if k in ("keep_open_type", "alphas", "lr", "steps", "replay_fraction", "frozen_layers", "batch_size", "crop", "tolerance", "holdout_every") else v
    cfg = preset("default", **over)
    ck = load_checkpoint(default_model_path())
    data = load_adaptation_data(adaptation_data_path(default_model_path()), ck.config.eight_bit)
    med = read_medseg_folder(SHARED / "medseg" / "train50")
    audit = [s for s in med if s.name in AUDIT]
    shipped = {s.name for s in data.replay + data.reference}
    if args.volume == "medseg":
        pool = [s for s in med if f"medseg{s.name}" not in shipped and s.name not in AUDIT]
        spacing, corr_sp, known, drop = None, (1.2, 1.2), ("ggo", "consolidation"), ["medseg"]
    else:
        g = int(args.volume)
        pool = read_zenodo_npz(SHARED / "zenodo20" / "zenodo20_dev.npz", groups=[g])
        spacing, corr_sp, known, drop = (1.5, 1.5), (1.5, 1.5), ("lung", "infection"), [f"zenodo{g}"]
    sub = data.without_groups(drop)
    if args.extra_medseg_replay and args.volume != "medseg":
        extra = [s for s in med if f"medseg{s.name}" not in shipped and s.name not in AUDIT][: args.extra_medseg_replay]
        sub.replay = sub.replay + extra
    idx = evenly(len(pool), 5)
    rest = [s for i, s in enumerate(pool) if i not in idx][:: args.every]
    corr = [CorrectionSlice(pool[i].hu, correction_labels(pool[i]), corr_sp, known, f"c{i}", "v", i) for i in idx]
    base = Predictor(ck.build_model(), ck.config, "cpu", InferenceConfig())
    sp = {s.name: spacing for s in rest}
    b_rest, b_audit = score_samples(base, rest, sp), score_samples(base, audit, {})
    out = finetune(ck, corr, cfg, sub, device="cpu")
    new = Predictor(out.checkpoint.build_model(), ck.config, "cpu", InferenceConfig())
    a_rest, a_audit = score_samples(new, rest, sp), score_samples(new, audit, {})
    g = out.gate
    print(f"{args.volume} {args.set} alpha {g.alpha} passed {g.passed} | rest infection {b_rest['infection']:.3f} -> "
          f"{a_rest['infection']:.3f} ({a_rest['infection'] - b_rest['infection']:+.3f}) | audit ggo "
          f"{a_audit['ggo'] - b_audit['ggo']:+.3f} inf {a_audit['infection'] - b_audit['infection']:+.3f} | {g.summary()}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
