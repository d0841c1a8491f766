"""Level 1 of the self-training with a band round the lung field left open (an experiment).

``selftrain`` trains level 1 with every pixel decided: outside the extracted lung field
everything is background. But a quarter of the expert infection lies outside that field
(``weak_lungfield.py``): dense infection at the chest wall that the air threshold
leaves out, which level 1 is then taught to call background. This script trains level 1
as ``selftrain`` does (same ``training.train``, from scratch, the level-0 pseudo-labels
inside the field) except that in a band of ``--open-mm`` round the field, inside the
body, a pixel may be background, GGO or lung (the marginal loss of ``training.train``):
level 1 is not taught to call it anything. Then it labels every slice (argmax); score the
labels with ``evaluate``:

    python experiments/weak_supervision/weak_openband.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        runs/weak6/st/level0/labels.npz \\
        --out runs/weak11_open15 --open-mm 15
    python -m DRSegUNetLib evaluate ../shared/data/zenodo20/zenodo20_dev.npz \\
        --predictions runs/weak11_open15/labels.npz --by-group --json runs/weak11_open15/eval.json

The defaults are the sixth run's level-1 settings (JOURNAL.md of this folder, "Sixth run").
Expert masks in DATA are never read here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from DRSegUNetLib.config import EightBitConfig, ModelConfig, NetworkConfig  # noqa: E402
from DRSegUNetLib.data import Sample, bit  # noqa: E402
from DRSegUNetLib.labelmaps import labels_for_dataset  # noqa: E402
from DRSegUNetLib.lungs import air_mask, assumed_spacing, body_mask  # noqa: E402
from DRSegUNetLib.training import train  # noqa: E402
from DRSegUNetLib.vocabulary import BACKGROUND, GGO, LUNG  # noqa: E402
from DRSegUNetLib.weak import lung_config_for  # noqa: E402
from weak_band import add_training_options, experiment_parser, finish, start, training_config  # noqa: E402


def open_band_allowed(labels: np.ndarray, body: np.ndarray, radius_px: float) -> np.ndarray:
    """Allowed-class bitmasks of one slice: the label itself, except {background, GGO, lung}
    on body pixels within ``radius_px`` of the labelled lung field (GGO or lung) but outside it."""
    allowed = (np.uint8(1) << labels).astype(np.uint8)
    field = np.isin(labels, (GGO, LUNG))
    if radius_px > 0 and field.any():
        band = (ndimage.distance_transform_edt(~field) <= radius_px) & ~field & body
        allowed[band] = bit(BACKGROUND, GGO, LUNG)
    return allowed


def main(argv=None) -> int:
    ap = experiment_parser(__doc__, "level0", "the level-0 pseudo-labels (selftrain OUT/level0/labels.npz)")
    ap.add_argument("--open-mm", type=float, default=15.0, help="band width round the lung field; 0: as selftrain")
    ap.add_argument("--base-filters", type=int, default=16)
    add_training_options(ap, lr=9.8e-4, epochs=60, seed=0, seed_help="selftrain's level 1 uses seed 0")
    args = ap.parse_args(argv)

    out, t0, inp = start(args)
    labels = labels_for_dataset(args.level0, args.data, len(inp))
    if labels.shape != inp.hu.shape:
        sys.exit(f"{args.level0} holds {labels.shape[0]} label maps of {labels.shape[1:]}; {args.data} has "
                 f"{len(inp)} slices of {inp.hu.shape[1:]}")
    cfg = lung_config_for(inp)
    px = (inp.spacing or assumed_spacing(inp.hu.shape[1:], cfg))[1]
    samples, band_px, field_px = [], 0, 0
    for j in range(len(inp)):
        if not labels[j].any():
            continue
        allowed = open_band_allowed(labels[j], body_mask(air_mask(inp.hu[j], cfg)), args.open_mm / px)
        band_px += int((allowed == bit(BACKGROUND, GGO, LUNG)).sum())
        field_px += int(np.isin(labels[j], (GGO, LUNG)).sum())
        samples.append(Sample(inp.hu[j], allowed, inp.names[j], inp.groups[j]))
    tcfg = training_config(args)
    mcfg = ModelConfig(network=NetworkConfig(base_filters=args.base_filters),
                       eight_bit=EightBitConfig())
    res = train(samples, [], out, tcfg, mcfg, device=args.device)
    info = {"level0": args.level0, "open_mm": args.open_mm, "pixel_mm": px, "n_train_slices": len(samples),
            "band_pixels_per_field_pixel": round(band_px / max(1, field_px), 4)}
    return finish(out, res.best_path, inp, args.device, info, "openband.json", t0)


if __name__ == "__main__":
    sys.exit(main())
