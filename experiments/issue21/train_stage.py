"""Lab bench (issue 21): one training stage with options the `train` command did not yet
have when this ran -- weight averaging (TrainConfig.ema_decay) and the augmentation of
experiments/issue21/HILAR.md (hard-negative crops on dense lung pixels, more and stronger
blur, coarser scales). Everything else is `python -m DRSegUNetLib train ARGS...`.

    .venv/bin/python experiments/issue21/train_stage.py --ema 0.998 --hard-negatives 0.25 \
        --blur 0.5,2.0 --scale 0.6,1.25 -- ../shared/data/medseg/train50 ... --out runs/s7 ...
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import DRSegUNetLib.training as training  # noqa: E402
from DRSegUNetLib.cli import main as cli_main  # noqa: E402


def run() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--hard-negatives", type=float, default=0.0)
    ap.add_argument("--blur", default="0.2,1.0", help="probability,max sigma")
    ap.add_argument("--scale", default="0.8,1.25")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    bp, bs = (float(v) for v in a.blur.split(","))
    lo, hi = (float(v) for v in a.scale.split(","))
    augment = training.AugmentConfig(hard_negative_fraction=a.hard_negatives, blur_probability=bp, blur_sigma=bs,
                                     scale=(lo, hi))
    plain = training.train

    def patched(tr, val, out, cfg, mcfg=None, **kw):
        kw["augment"] = augment
        return plain(tr, val, out, replace(cfg, ema_decay=a.ema), mcfg, **kw)

    training.train = patched
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    return cli_main(["train", *rest])


if __name__ == "__main__":
    sys.exit(run())
