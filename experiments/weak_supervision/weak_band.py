"""Level 2 of the self-training without reinforcing level 1's unsure pixels (an experiment).

``selftrain`` trains level 2 on level 1's argmax labels, every pixel decided. This script
tries the usual remedy for noisy self-labels: where level 1's top softmax probability is
below ``--unsure-below``, a pixel it labels GGO or lung is left open between the two
(the marginal loss of ``training.train``), so level 2 is taught only where level 1 is
confident. ``--flip-tta`` averages level 1's probabilities with those of the mirrored
slice first. Level 2 is trained as ``selftrain`` trains it (same ``training.train``, first
two layers frozen), then labels every slice; score the labels with ``evaluate``.
``--infection-above CUT`` first relabels level 1's output: GGO or consolidation (the more
probable of the two) wherever their summed probability exceeds CUT, and lung or
background (the more probable) where level 1's argmax said infection below it; this is a
fixed cut of ``weak_ceiling.py``, used as level 2's labels. ``--ensemble CKPT...``
takes level 2's labels from the mean probabilities of LEVEL1 and other level-1 models
(other seeds; ``gpu_selftrain.sh``):

    python experiments/weak_supervision/weak_band.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        runs/weak6/st/level1/best.pt \\
        --out runs/weak6_band --unsure-below 0.7 --flip-tta
    python -m DRSegUNetLib evaluate ../shared/data/zenodo20/zenodo20_dev.npz \\
        --predictions runs/weak6_band/labels.npz --by-group --json runs/weak6_band/eval.json

The defaults are the sixth run's level-2 settings (JOURNAL.md of this folder, "Sixth
run"). Expert masks in DATA are never read here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.config import ModelConfig, TrainConfig  # noqa: E402
from DRSegUNetLib.data import Sample, bit  # noqa: E402
from DRSegUNetLib.inference import Predictor, restrict_to_body  # noqa: E402
from DRSegUNetLib.labelmaps import save_label_maps  # noqa: E402
from DRSegUNetLib.selftrain import predict_labels  # noqa: E402
from DRSegUNetLib.slices import SliceInput, read_slices  # noqa: E402
from DRSegUNetLib.training import train  # noqa: E402
from DRSegUNetLib.vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG  # noqa: E402


def level1_labels(predictor: Predictor | Sequence[Predictor], hu: np.ndarray, chunk: int = 32,
                  infection_above: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Level 1's labels (N, H, W) uint8 and top softmax probability (N, H, W) float32.

    Given several predictors (level 1 trained with different seeds), their softmax
    probabilities are averaged and the labels decided from the mean, as one predictor
    decides them (``inference.decide``, then the body restriction).

    With ``infection_above``, the labels are cut at that summed GGO + consolidation
    probability instead of the argmax (:func:`cut_infection`), then cleared outside the
    body as the argmax labels are (``InferenceConfig.restrict_to_body``); the top
    probability is then that of the pixel's new label.
    """
    labels = np.zeros(hu.shape, np.uint8)
    top = np.zeros(hu.shape, np.float32)
    predictors = [predictor] if isinstance(predictor, Predictor) else list(predictor)
    predictor = predictors[0]
    for s in range(0, len(hu), chunk):
        part = hu[s:s + chunk]
        mean = torch.stack([p.probabilities(part).float() for p in predictors]).mean(0)  # one model: itself
        lab = predictor.decide_labels(mean, part, eight_bit=True)
        prob = mean.cpu().numpy()
        if infection_above is None:
            conf = prob.max(1)
        else:
            lab = cut_infection(lab, prob, infection_above)
            if predictor.inference.restrict_to_body:
                lab = restrict_to_body(lab, part, predictor.inference.body_threshold_hu, eight_bit=True)
            conf = np.take_along_axis(prob, lab[:, None].astype(np.int64), 1)[:, 0]
        labels[s:s + chunk] = lab
        top[s:s + chunk] = conf
    return labels, top


def cut_infection(labels: np.ndarray, prob: np.ndarray, cut: float) -> np.ndarray:
    """Labels with infection wherever P(GGO) + P(consolidation) > ``cut`` (the more probable
    of the two) and, where the argmax said infection at or below it, lung or background."""
    p_inf = prob[:, GGO] + prob[:, CONSOLIDATION]
    out = labels.copy()
    is_inf = p_inf > cut
    out[is_inf] = np.where(prob[:, CONSOLIDATION] > prob[:, GGO], CONSOLIDATION, GGO)[is_inf]
    was_inf = ~is_inf & np.isin(labels, (GGO, CONSOLIDATION))
    out[was_inf] = np.where(prob[:, LUNG] >= prob[:, BACKGROUND], LUNG, BACKGROUND)[was_inf]
    return out


def allowed_sets(labels: np.ndarray, top: np.ndarray, unsure_below: float) -> np.ndarray:
    """Allowed-class bitmasks: level 1's label, or {GGO, lung} where it is unsure between them."""
    allowed = (np.uint8(1) << labels).astype(np.uint8)
    allowed[(top < unsure_below) & np.isin(labels, (GGO, LUNG))] = bit(GGO, LUNG)
    return allowed


def experiment_parser(doc: str, level: str, level_help: str) -> argparse.ArgumentParser:
    """The arguments every weak-supervision experiment takes (this script, weak_openband.py):
    DATA, the level it starts from, and --out."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("data", help=".npz of 8-bit slices (ct_uint8), e.g. zenodo20_dev.npz")
    ap.add_argument(level, help=level_help)
    ap.add_argument("--out", required=True)
    return ap


def start(args: argparse.Namespace) -> tuple[Path, float, SliceInput]:
    """Make OUT; return it, the start time and DATA's slices."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, time.time(), read_slices(args.data)


def finish(out: Path, best: Path, inp: SliceInput, device: str, info: dict, json_name: str, t0: float) -> int:
    """Label every slice with the trained level (argmax, as ``selftrain``), save the labels
    as OUT/labels.npz and ``info`` as OUT/JSON_NAME with the seconds since ``t0``
    (prediction included), and print ``info``."""
    (labels,) = predict_labels(best, [inp], device)
    save_label_maps(out / "labels.npz", [inp.path], [labels])
    info = {**info, "seconds": round(time.time() - t0, 1)}
    (out / json_name).write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


def add_training_options(ap: argparse.ArgumentParser, lr: float, epochs: int, seed: int, seed_help: str) -> None:
    """The training options of the weak-supervision experiments (this script, weak_openband.py)."""
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--loss", default="ce+dice")
    ap.add_argument("--seed", type=int, default=seed, help=seed_help)
    ap.add_argument("--device", default="cpu")


def training_config(args: argparse.Namespace, **more) -> TrainConfig:
    """TrainConfig from the options of :func:`add_training_options` (and ``more``)."""
    return TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                       crop=args.crop, lr=args.lr, loss=args.loss, seed=args.seed, **more)


def main(argv=None) -> int:
    ap = experiment_parser(__doc__, "level1", "level 1's checkpoint (selftrain OUT/level1/best.pt)")
    ap.add_argument("--unsure-below", type=float, default=0.7, help="0: every pixel decided, as selftrain")
    ap.add_argument("--flip-tta", action="store_true")
    ap.add_argument("--infection-above", type=float, default=None,
                    help="relabel: infection where level 1's P(GGO) + P(consolidation) exceeds this")
    ap.add_argument("--ensemble", nargs="+", default=[], metavar="CKPT",
                    help="more level-1 checkpoints (other seeds): level 2's labels come from the mean of "
                         "their and LEVEL1's probabilities; level 2 still starts from LEVEL1")
    ap.add_argument("--frozen-layers", type=int, default=2)
    add_training_options(ap, lr=9.8e-5, epochs=10, seed=1, seed_help="selftrain's level 2 uses seed + 1 = 1")
    args = ap.parse_args(argv)

    out, t0, inp = start(args)
    predictors = [Predictor.from_checkpoint(c, args.device, batch_size=8, flip_tta=args.flip_tta)
                  for c in [args.level1, *args.ensemble]]
    labels, top = level1_labels(predictors, inp.hu, infection_above=args.infection_above)
    allowed = allowed_sets(labels, top, args.unsure_below)
    field = np.isin(labels, (GGO, LUNG))
    unsure = float(((allowed == bit(GGO, LUNG)) & field).sum() / max(1, field.sum()))
    save_label_maps(out / "level1_labels.npz", [inp.path], [labels])
    samples = [Sample(inp.hu[j], allowed[j], inp.names[j], inp.groups[j]) for j in range(len(inp)) if labels[j].any()]
    init = load_checkpoint(args.level1)
    cfg = training_config(args, frozen_layers=args.frozen_layers)
    res = train(samples, [], out, cfg, ModelConfig(network=init.config.network, eight_bit=init.config.eight_bit),
                init=init, device=args.device)
    info = {"level1": args.level1, "ensemble": args.ensemble, "unsure_below": args.unsure_below,
            "flip_tta": args.flip_tta,
            "infection_above": args.infection_above,
            "unsure_fraction_of_lung_field": round(unsure, 4), "n_train_slices": len(samples)}
    return finish(out, res.best_path, inp, args.device, info, "band.json", t0)


if __name__ == "__main__":
    sys.exit(main())
