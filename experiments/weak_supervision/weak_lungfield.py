"""How much of the pseudo-labels' error is the lung field? Bounds from the expert lung masks.

The k-means pseudo-labels (thesis §4.4.1) can only call GGO inside the extracted lung.
This script keeps the k-means and its clean-up as they are and changes only the lung
field they are computed in, on a COVID-19-CT-Seg ``.npz`` (zenodo20_dev.npz), scoring
every result against the expert masks:

- ``extracted``: ``lungs.py`` as ``selftrain`` runs it (the level-0 pseudo-labels);
- ``extracted ∩ expert``: the same without what the extraction wrongly calls lung
  (stomach and bowel gas, fat, filled mediastinum or liver dome);
- ``extracted ∪ expert``: the same plus the lung the extraction misses (mostly dense,
  dependent infection that the air threshold leaves out);
- ``expert``: the expert lung field alone;
- ``--closing-mm R``: the extraction with another closing radius (default 10 mm);
- ``--posterior-fill R``: the extraction, then per side of the body a closing with a disk
  of R mm whose added pixels are kept only where no lung lies behind them in the same
  column (an attempt at dependent consolidation; throwaway rule, not in the library).
  "Behind" is further down the image, except in the groups named by ``--upside-down-groups``
  (zenodo20_dev's group 8, Radiopaedia, is stored with the back at the top).
- ``--model CKPT``: the lung field a trained level (e.g. level 1 of ``selftrain``) predicts,
  every pixel it gives P(background) < 0.5 (its lung, GGO and consolidation together),
  alone and joined with the extraction. Such a level was trained on the extracted field,
  gaps included; this asks how much of them it closes.

Rows that use the expert lung peek at the answers: they are bounds, not methods.

    python experiments/weak_supervision/weak_lungfield.py ../shared/data/zenodo20/zenodo20_dev.npz \\
        --closing-mm 15,20,30 --posterior-fill 20,30,45 --upside-down-groups 8 --json out/weak_lungfield.json

Per-slice Dice (a slice empty in both counts 1; every slice of zenodo20_dev has expert lung
and infection), averaged over groups 0-4 (the lung rules were chosen on them), 5-8 (held
out) and all; "infection in field" is the share of expert infection pixels inside the lung
field; precision and recall of the pseudo-labels' GGO are over pooled pixels.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from DRSegUNetLib.labelmaps import save_label_maps  # noqa: E402
from DRSegUNetLib.lungs import assumed_spacing, disk_closing, fill_holes  # noqa: E402
from DRSegUNetLib.slices import read_slices  # noqa: E402
from DRSegUNetLib.vocabulary import BACKGROUND, GGO  # noqa: E402
from DRSegUNetLib.weak import lung_config_for, lung_masks, pseudo_labels  # noqa: E402


def dice_per_slice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    inter = (pred & truth).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def posterior_fill(mask: np.ndarray, radius_px: float, back_at_top: bool = False) -> np.ndarray:
    """Per half of the mask's column range: closing pixels with no mask pixel behind them
    (at a larger row; at a smaller row when ``back_at_top``)."""
    if back_at_top:
        return posterior_fill(mask[::-1], radius_px)[::-1]
    out = mask.copy()
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return out
    mid = int((cols[0] + cols[-1]) / 2)
    for half in (np.s_[:, :mid], np.s_[:, mid:]):
        side = np.zeros_like(mask)
        side[half] = mask[half]
        if not side.any():
            continue
        added = disk_closing(side, (radius_px, radius_px)) & ~side
        at_or_behind = np.flip(np.logical_or.accumulate(np.flip(side, 0), 0), 0)
        behind = np.zeros_like(side)
        behind[:-1] = at_or_behind[1:]
        out |= added & ~behind
    return fill_holes(out)


def network_field(hu: np.ndarray, checkpoint: str, device: str, batch_size: int) -> np.ndarray:
    """(n, H, W) bool: pixels the checkpoint gives P(background) < 0.5."""
    from DRSegUNetLib.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, device, batch_size=batch_size)
    out = np.zeros(hu.shape, dtype=bool)
    for start in range(0, len(hu), batch_size):
        prob = predictor.probabilities(hu[start:start + batch_size])
        out[start:start + batch_size] = (prob[:, BACKGROUND] < 0.5).cpu().numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", help="COVID-19-CT-Seg .npz with ct_uint8, lung_mask, infection_mask, group")
    p.add_argument("--closing-mm", default="", help="extra closing radii to try, comma-separated")
    p.add_argument("--posterior-fill", default="", help="posterior-fill radii (mm) to try, comma-separated")
    p.add_argument("--upside-down-groups", default="",
                   help="groups stored with the patient's back at the top of the image, comma-separated")
    p.add_argument("--model", help="a level's checkpoint whose predicted lung field is tried too")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (--model)")
    p.add_argument("--device", default="cpu", help="torch device for --model")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--expert-field-labels", metavar="PATH",
                   help="write the pseudo-labels made in the expert lung field here (save_label_maps layout), "
                        "for training a level on them: a bound, since the field is the experts'")
    a = p.parse_args(argv)

    inp = read_slices(a.npz)
    with np.load(a.npz) as z:
        lung_truth = z["lung_mask"] > 0
        inf_truth = z["infection_mask"] > 0
        group = z["group"]
    parts = {"groups 0-4": group <= 4, "groups 5-8": group >= 5, "all": np.ones(len(group), bool)}
    cfg = lung_config_for(inp)
    px = (inp.spacing or assumed_spacing(inp.hu.shape[1:], cfg))[1]

    t0 = time.time()
    extracted = lung_masks(inp, cfg)
    fields = {"extracted": extracted, "extracted ∩ expert": extracted & lung_truth,
              "extracted ∪ expert": extracted | lung_truth, "expert": lung_truth}
    for r in filter(None, a.closing_mm.split(",")):
        fields[f"extracted, closing {float(r):g} mm"] = lung_masks(
            inp, dataclasses.replace(cfg, closing_radius_mm=float(r)))
    upside_down = {int(k) for k in filter(None, a.upside_down_groups.split(","))}
    for r in filter(None, a.posterior_fill.split(",")):
        fields[f"extracted + posterior fill {float(r):g} mm"] = np.stack(
            [posterior_fill(m, float(r) / px, int(k) in upside_down) for m, k in zip(extracted, group)])
    if a.model:
        net = network_field(inp.hu, a.model, a.device, a.batch_size)
        fields["network (--model), P(background) < 0.5"] = net
        fields["network ∪ extracted"] = net | extracted

    rows = []
    print("| lung field | lung Dice 0-4 / 5-8 / all | infection in field | PL infection Dice 0-4 / 5-8 / all "
          "| PL precision / recall (pooled) |")
    print("|---|---|---|---|---|")
    for name, field in fields.items():
        labels = pseudo_labels(inp, field)
        if name == "expert" and a.expert_field_labels:
            save_label_maps(a.expert_field_labels, [inp.path], [labels])
        ggo = labels == GGO
        dl, di = dice_per_slice(field, lung_truth), dice_per_slice(ggo, inf_truth)
        tp = int((ggo & inf_truth).sum())
        row = {"field": name,
               "lung_dice": {k: float(dl[m].mean()) for k, m in parts.items()},
               "infection_in_field": float((field & inf_truth).sum() / inf_truth.sum()),
               "pl_infection_dice": {k: float(di[m].mean()) for k, m in parts.items()},
               "pl_precision": tp / max(int(ggo.sum()), 1), "pl_recall": tp / int(inf_truth.sum())}
        rows.append(row)
        print(f"| {name} | " + " / ".join(f"{v:.3f}" for v in row["lung_dice"].values())
              + f" | {row['infection_in_field']:.3f} | "
              + " / ".join(f"{v:.3f}" for v in row["pl_infection_dice"].values())
              + f" | {row['pl_precision']:.3f} / {row['pl_recall']:.3f} |", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"npz": a.npz, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
