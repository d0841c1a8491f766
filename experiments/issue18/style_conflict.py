"""Lab bench (issue 18): is the MedSeg GGO drift after fine-tuning on COVID-19-CT-Seg
corrections a change of *lesion extent* (two annotation styles pulling the lesion border
in different directions) rather than forgetting? Fine-tunes the bundled model at full
strength (no interpolation) on K = 5 evenly spaced corrections of one volume and prints,
before and after, on the rest of the volume and on MedSeg audit slices (test ids, never
trained on, not the gate's reference): Dice, precision, recall and predicted area of
infection and GGO.

    .venv/bin/python experiments/issue18/style_conflict.py 3 [--distill-weight W] [--gate]

``--distill-weight`` multiplies the replay distillation term (library default 1);
``--gate`` keeps the library's gate-chosen interpolation instead of full strength.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.adaptation import (CorrectionSlice, adaptation_data_path, finetune, load_adaptation_data,  # noqa: E402
                                     preset)
from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.config import InferenceConfig  # noqa: E402
from DRSegUNetLib.data import read_medseg_folder, read_zenodo_npz  # noqa: E402
from DRSegUNetLib.inference import Predictor  # noqa: E402
from DRSegUNetLib.metrics import MetricAccumulator  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from adaptation import correction_labels, evenly  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
AUDIT = ["1", "2", "26", "30", "41", "42", "46", "47", "49", "57"]


def scores(pred, samples, spacing):
    acc = MetricAccumulator(("ggo", "infection"))
    area = {"ggo": 0, "infection": 0, "truth_ggo": 0, "truth_infection": 0}
    for s in samples:
        lab = pred.predict_slices([s.hu], spacing=spacing, eight_bit=s.eight_bit)[0]
        truth = {r: s.region_truth(r) for r in ("ggo", "infection")}
        acc.add(s.name, lab, truth)
        area["ggo"] += int((lab == 1).sum())
        area["infection"] += int(((lab == 1) | (lab == 2)).sum())
        for r in ("ggo", "infection"):
            if truth[r] is not None:
                area["truth_" + r] += int(np.asarray(truth[r]).sum())
    out = {}
    for r, v in acc.summary().items():
        m = v["mean"]
        if m["dice"] is not None:
            out[r] = (m["dice"], m["precision"], m["recall"])
    return out, area


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("volume", type=int, nargs="?", default=3)
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--gate", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    vol = args.volume
    if args.distill_weight != 1.0:
        import DRSegUNetLib.adaptation as adaptation
        plain = adaptation.distillation_loss
        adaptation.distillation_loss = lambda new, old: args.distill_weight * plain(new, old)
    ck = load_checkpoint(default_model_path())
    data = load_adaptation_data(adaptation_data_path(default_model_path()), ck.config.eight_bit)
    med = read_medseg_folder(SHARED / "medseg" / "train50")
    audit = [s for s in med if s.name in AUDIT]
    pool = read_zenodo_npz(SHARED / "zenodo20" / "zenodo20_dev.npz", groups=[vol])
    idx = evenly(len(pool), 5)
    rest = [s for i, s in enumerate(pool) if i not in idx][::3]
    corr = [CorrectionSlice(pool[i].hu, correction_labels(pool[i]), (1.5, 1.5), ("lung", "infection"), f"c{i}", "v", i)
            for i in idx]
    cfg = preset("default") if args.gate else preset("default", alphas=(1.0,))
    base = Predictor(ck.build_model(), ck.config, "cpu", InferenceConfig())
    before = scores(base, rest, (1.5, 1.5)), scores(base, audit, None)
    out = finetune(ck, corr, cfg, data.without_groups([f"zenodo{vol}"]), device="cpu")
    new = Predictor(out.checkpoint.build_model(), ck.config, "cpu", InferenceConfig())
    after = scores(new, rest, (1.5, 1.5)), scores(new, audit, None)
    print(f"volume {vol}, distillation weight {args.distill_weight:g}, alpha {out.gate.alpha:g}, "
          f"gate passed {out.gate.passed}")
    for name, b, a in (("rest of volume", before[0], after[0]), ("MedSeg audit", before[1], after[1])):
        print(f"## {name}")
        for r in b[0]:
            (d0, p0, r0), (d1, p1, r1) = b[0][r], a[0][r]
            print(f"{r:10s} Dice {d0:.3f} -> {d1:.3f}  precision {p0:.3f} -> {p1:.3f}  recall {r0:.3f} -> {r1:.3f}")
        print(f"predicted area (px): GGO {b[1]['ggo']} -> {a[1]['ggo']}, infection {b[1]['infection']} -> "
              f"{a[1]['infection']}; truth GGO {b[1]['truth_ggo']}, infection {b[1]['truth_infection']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
