"""Adaptation benchmark (issue 18): does correcting K slices and fine-tuning make the rest
of the volume better, and the reference no worse?

For each COVID-19-CT-Seg volume of ``zenodo20_dev.npz`` (its ``group``) and for MedSeg:
K slices (evenly spaced; the most uncertain ones by ``inference.slice_uncertainty``; or
those the panel's *Next slice to check* visits, ``report.slices_to_check``) are accepted as corrections with the experts' masks (COVID-19-CT-Seg: lung and the lesion
outline, type left open -- ``known=lung,infection``; MedSeg: ``known=ggo,consolidation``);
``python -m DRSegUNetLib finetune`` runs as a user runs it (its own process, defaults,
gate, saving; the wall time includes all of it), and the volume's other slices are scored
as ``segment`` gives them to the user: the new version if the gate made it active, else the
one before, guided by the K accepted slices (``guidance.py``; COVID-19-CT-Seg volumes only,
MedSeg's slices being of different patients). The fine-tune alone and the guidance alone
are reported beside it. The raw fine-tuned version's scores are reported too, and so is the shipped
reference set (never trained on; slices of the volume being adapted are taken out of the
replay and reference sets first, as they would be for a new patient).

    .venv/bin/python bench/adaptation.py ../shared/data --json runs/adaptation.json

COVID-19-CT-Seg slices are 8-bit (mapped to approximate HU by the model's rule) at about
1.5 mm pixels (512 halved to 256); MedSeg crops have no known pixel size and are given the
working pixel size (no resampling), as the model was trained on them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.adaptation import adaptation_data_for, adaptation_data_path, load_adaptation_data, score_samples, write_adaptation_data  # noqa: E402
from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.config import ModelInference  # noqa: E402
from DRSegUNetLib.data import labels_to_allowed, read_medseg_folder, read_zenodo_npz  # noqa: E402
from DRSegUNetLib.guidance import CorrectionGuide  # noqa: E402
from DRSegUNetLib.inference import Predictor, slice_uncertainty  # noqa: E402
from DRSegUNetLib.metrics import counts, region_mask  # noqa: E402
from DRSegUNetLib.report import slices_to_check  # noqa: E402
from DRSegUNetLib.store import CorrectionsStore  # noqa: E402

ZENODO_MM = 1.5
# Audit set: MedSeg slices that neither a fine-tune nor its gate sees (the development split's test ids;
# the all-data bundled model of 2026-12-06 trained on them, the one before it did not).
AUDIT_MEDSEG = ("1", "2", "26", "30", "41", "42", "46", "47", "49", "57")
WORKING_MM = ModelInference().pixel_mm  # the bundled model's working pixel


def slice_scores(predictor: Predictor, samples, spacing, regions, guide=None, index=None):
    """Per slice: {region: Dice or None (empty in both)} and the slice's uncertainty. With a
    ``guide`` (guidance.CorrectionGuide, by pool index; ``index``: each sample's), also the rows
    of the guided labels, as ``segment`` makes them for the volume: (rows, unc, guided rows)."""
    out, unc, guided = [], [], []

    def row_of(labels, s):
        row = {}
        for r in regions:
            t = s.region_truth(r)
            if t is not None:
                sc = counts(region_mask(labels, r), t).scores()
                row[r] = None if sc is None else sc["dice"]
        return row

    for n, s in enumerate(samples):
        labels, prob = predictor.labels(s.hu[None], spacing, eight_bit=s.eight_bit)
        unc.append(float(slice_uncertainty(prob, labels)[0]))
        out.append(row_of(labels[0], s))
        if guide is not None:
            g = predictor.decide_labels(guide.apply(prob, index[n]), s.hu[None], eight_bit=s.eight_bit)
            guided.append(row_of(g[0], s))
    return (out, unc, guided) if guide is not None else (out, unc)


def mean_over(rows, idx, region):
    vals = [rows[i][region] for i in idx if region in rows[i] and rows[i][region] is not None]
    return float(np.mean(vals)) if vals else None


def evenly(n: int, k: int) -> list[int]:
    return sorted({int(round((i + 0.5) * n / k - 0.5)) for i in range(k)})


def most_uncertain(unc: list[float], k: int) -> list[int]:
    """The k most uncertain slices, at least n/(2k) apart (neighbours teach the same thing)."""
    gap = max(1, len(unc) // (2 * k))
    picked: list[int] = []
    for i in sorted(range(len(unc)), key=lambda i: -unc[i]):
        if all(abs(i - j) >= gap for j in picked):
            picked.append(i)
        if len(picked) == k:
            break
    return sorted(picked)


PICKERS = ("even", "uncertain", "next")


def pick(picker: str, unc: list[float], k: int) -> list[int]:
    """even: evenly spaced; uncertain: the most uncertain, apart; next: what the panel's
    *Next slice to check* visits when each slice it shows is accepted (report.slices_to_check)."""
    if picker == "even":
        return evenly(len(unc), k)
    if picker == "uncertain":
        return most_uncertain(unc, k)
    return sorted(slices_to_check(unc, k))


def volumes(shared: Path, data, names):
    """(name, pool samples, spacing for scoring, correction spacing, known, regions, groups to drop)."""
    out = []
    zen = read_zenodo_npz(shared / "zenodo20" / "zenodo20_dev.npz")
    med = read_medseg_folder(shared / "medseg" / "train50")
    shipped = {s.name for s in data.replay + data.reference}
    for name in names:
        if name == "medseg":
            # MedSeg slices come from many patients: the "volume" is the slices that are neither
            # shipped with the model nor in the audit set; replay and reference stay whole.
            pool = [s for s in med if f"medseg{s.name}" not in shipped and s.name not in AUDIT_MEDSEG]
            out.append((name, pool, None, (WORKING_MM, WORKING_MM), ("ggo", "consolidation"),
                        ("ggo", "consolidation", "infection"), ()))
        else:
            g = f"zenodo{int(name)}"
            pool = [s for s in zen if s.group == g]
            out.append((name, pool, (ZENODO_MM, ZENODO_MM), (ZENODO_MM, ZENODO_MM), ("lung", "infection"),
                        ("infection", "lung"), (g,)))
    return out


def correction_labels(sample) -> np.ndarray:
    """Our label vocabulary from a sample's allowed sets (the experts' masks)."""
    a = sample.allowed
    labels = np.zeros(a.shape, np.uint8)
    labels[(a & 0b1000) != 0] = 3  # lung (COVID-19-CT-Seg)
    labels[(a & 0b0110) != 0] = 1  # infection / GGO
    labels[a == 0b0100] = 2  # consolidation (MedSeg)
    return labels


def run_finetune(model_dir: Path, pool, picked, corr_spacing, known, threads: int, extra: list[str],
                 reference_scores=None):
    """One ``finetune`` in its own process; ``reference_scores``: the starting model's, put in the
    store's cache first (a user's second fine-tune of a model), else the fine-tune computes them."""
    if reference_scores is not None:
        from DRSegUNetLib.adaptation import REFERENCE_CACHE, reference_key, remember_reference

        model = model_dir / "model.pt"
        (model_dir / "store").mkdir(exist_ok=True)
        remember_reference(model_dir / "store" / REFERENCE_CACHE,
                           reference_key(model, adaptation_data_path(model), WORKING_MM, "cpu"), reference_scores)
        extra = [*extra, "--pixel-mm", str(WORKING_MM)]
    corr = CorrectionsStore(model_dir / "corrections")
    for i in picked:
        corr.add(pool[i].hu, correction_labels(pool[i]), corr_spacing, f"bench {pool[i].group}", i, known=known)
    cmd = [sys.executable, "-m", "DRSegUNetLib", "finetune", "--model", str(model_dir / "model.pt"),
           "--corrections", str(corr.root), "--store", str(model_dir / "store"), "--json", str(model_dir / "out.json"),
           "--threads", str(threads), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"finetune failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((model_dir / "out.json").read_text()), seconds


def _gate_scores(base, sub) -> dict:
    """The starting model's reference scores as finetune's gate computes them."""
    return score_samples(base, sub.reference, {s.name: sub.spacing.get(s.name) for s in sub.reference})


def main() -> int:
    ap = argparse.ArgumentParser(description="adaptation benchmark (issue 18)")
    ap.add_argument("shared_data", type=Path, nargs="?", help="the shared data folder (medseg/, zenodo20/)")
    ap.add_argument("--table", type=Path, nargs="+", default=None,
                    help="print the table of earlier --json outputs (merged) instead of running")
    ap.add_argument("--model", type=Path, default=None,
                    help="the starting checkpoint (default: the bundled model); its replay and reference slices "
                         "are the ones beside it, else the bundled model's")
    ap.add_argument("--volumes", default="0,1,2,3,4,5,6,7,8,medseg")
    ap.add_argument("--k", default="2,5,10", help="corrected slices per volume (0 is always scored)")
    ap.add_argument("--pickers", default="even,uncertain", help=f"comma list of {', '.join(PICKERS)} (pick's doc)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--finetune-args", default="", help="extra finetune options, e.g. '--preset thesis'")
    ap.add_argument("--warm-cache", action="store_true",
                    help="time a model's later fine-tunes: its reference scores are already in the store's cache "
                         "(default: its first fine-tune, which scores the reference)")
    args = ap.parse_args()
    unknown = set(args.pickers.split(",")) - set(PICKERS)
    if unknown:
        ap.error(f"--pickers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PICKERS)}")
    if args.table:
        print(table(merge([json.loads(p.read_text()) for p in args.table])))
        return 0
    if args.shared_data is None:
        ap.error("give the shared data folder (or --table)")
    import torch

    torch.set_num_threads(args.threads)
    start = args.model or default_model_path()
    ckpt = load_checkpoint(start)
    if ckpt.config.inference.pixel_mm != WORKING_MM:
        ap.error(f"--model: its working pixel is {ckpt.config.inference.pixel_mm} mm; this benchmark assumes {WORKING_MM} mm")
    data = load_adaptation_data(adaptation_data_for(start), ckpt.config.eight_bit)
    base = Predictor(ckpt.build_model(), ckpt.config, "cpu")  # the model's own working pixel and decision
    audit = [s for s in read_medseg_folder(args.shared_data / "medseg" / "train50") if s.name in AUDIT_MEDSEG]
    audit_regions = ("ggo", "consolidation", "infection")
    audit_before = score_samples(base, audit, {}, audit_regions)
    ks = [int(k) for k in args.k.split(",") if k.strip() and int(k) > 0]
    results = {"model": str(start), "finetune_args": args.finetune_args, "warm_cache": args.warm_cache, "k": ks, "pickers": args.pickers.split(","), "volumes": {},
               "audit_before": audit_before}
    for name, pool, spacing, corr_spacing, known, regions, drop in volumes(args.shared_data, data, args.volumes.split(",")):
        sub = data.without_groups(drop)
        ref_regions = ("ggo", "consolidation", "infection", "lung")
        ref_spacing = {s.name: sub.spacing.get(s.name) for s in sub.reference}
        before_rows, unc = slice_scores(base, pool, spacing, regions)
        ref_before = score_samples(base, sub.reference, ref_spacing, ref_regions)
        vol = {"n": len(pool), "regions": regions, "k0": {r: mean_over(before_rows, range(len(pool)), r) for r in regions},
               "reference_before": ref_before, "runs": []}
        print(f"volume {name}: {len(pool)} slices, K=0 " + " ".join(f"{r} {v:.3f}" for r, v in vol["k0"].items() if v is not None),
              flush=True)
        for k in ks:
            for picker in results["pickers"]:
                picked = pick(picker, unc, k)
                rest = [i for i in range(len(pool)) if i not in set(picked)]
                # What segment does with the accepted slices of the volume it segments again
                # (guidance.py). MedSeg's slices are of different patients: nothing to guide.
                guide = None if name == "medseg" else CorrectionGuide(
                    {i: labels_to_allowed(correction_labels(pool[i]), known) for i in picked})
                if guide is not None:
                    _, _, base_guided = slice_scores(base, [pool[i] for i in rest], spacing, regions, guide, rest)
                with tempfile.TemporaryDirectory(prefix="drsegunet-adapt-") as tmp:
                    model_dir = Path(tmp)
                    shutil.copy(start, model_dir / "model.pt")
                    write_adaptation_data(adaptation_data_path(model_dir / "model.pt"), _as_slices(sub))
                    out, seconds = run_finetune(model_dir, pool, picked, corr_spacing, known, args.threads,
                                                args.finetune_args.split(),
                                                _gate_scores(base, sub) if args.warm_cache else None)
                    if args.warm_cache and not out.get("reference_cached"):
                        raise RuntimeError("--warm-cache: the fine-tune did not find the reference scores put in its cache")
                    new = Predictor.from_checkpoint(out["path"], device="cpu")
                    scored = slice_scores(new, [pool[i] for i in rest], spacing, regions, guide, rest)
                    after_rows, after_guided = scored[0], (scored[2] if guide is not None else None)
                    ref_after = score_samples(new, sub.reference, ref_spacing, ref_regions)
                    audit_after = score_samples(new, audit, {}, audit_regions)
                run = {"k": k, "picker": picker, "picked": picked, "activated": out["activated"], "seconds": round(seconds, 1),
                       "gate": out["gate"], "reference_after": ref_after, "audit_after": audit_after}
                for r in regions:
                    b = mean_over(before_rows, rest, r)
                    a = mean_over(after_rows, range(len(rest)), r)
                    # user: what segment gives after the fine-tune (guided where there is a guide);
                    # finetune_only: without the guidance; guide_only: the model before, guided.
                    finetuned = a if out["activated"] else b
                    if guide is None:
                        run[r] = {"before": b, "raw": a, "user": finetuned, "finetune_only": finetuned, "guide_only": b}
                    else:
                        ga = mean_over(after_guided, range(len(rest)), r)
                        gb = mean_over(base_guided, range(len(rest)), r)
                        run[r] = {"before": b, "raw": a, "user": ga if out["activated"] else gb,
                                  "finetune_only": finetuned, "guide_only": gb}
                vol["runs"].append(run)
                key = "infection"
                print(f"  K={k:2d} {picker:9s} {key} {run[key]['before']:.3f} -> raw {run[key]['raw']:.3f} "
                      f"user {run[key]['user']:.3f} ({run[key]['user'] - run[key]['before']:+.3f}; fine-tune only "
                      f"{run[key]['finetune_only'] - run[key]['before']:+.3f}, guidance only "
                      f"{run[key]['guide_only'] - run[key]['before']:+.3f}) "
                      f"{'active' if out['activated'] else 'gated'}  ref ggo "
                      f"{ref_before.get('ggo', float('nan')):.3f}->{ref_after.get('ggo', float('nan')):.3f} audit ggo "
                      f"{audit_before['ggo']:.3f}->{audit_after['ggo']:.3f} alpha {out['gate'].get('alpha')}  {seconds:.0f}s",
                      flush=True)
        results["volumes"][name] = vol
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    return 0


def _as_slices(sub):
    out = []
    for role, ss in (("replay", sub.replay), ("reference", sub.reference)):
        for s in ss:
            out.append({"hu": s.hu, "allowed": s.allowed, "name": s.name, "group": s.group, "role": role,
                        "spacing": sub.spacing.get(s.name)})
    return out


def merge(parts: list) -> dict:
    """One result from runs of different K or pickers on the same volumes."""
    out = {"k": [], "pickers": [], "volumes": {}, "audit_before": parts[0]["audit_before"]}
    for part in parts:
        out["k"] += [k for k in part["k"] if k not in out["k"]]
        out["pickers"] += [p for p in part["pickers"] if p not in out["pickers"]]
        for name, vol in part["volumes"].items():
            if name in out["volumes"]:
                out["volumes"][name]["runs"] += vol["runs"]
            else:
                out["volumes"][name] = json.loads(json.dumps(vol))
    out["k"].sort()
    return out


def table(results) -> str:
    """Markdown: per K and picker, mean and worst gain on the rest of the volume (infection Dice,
    the model the user gets), volumes activated, reference GGO drop, seconds."""
    lines = ["| K | picker | mean infection gain (user) | worst volume | fine-tune only | guidance only | "
             "mean gain of the saved version | activated | "
             "largest reference GGO drop (activated versions) | mean audit GGO change (user) | median s per fine-tune |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in results["k"]:
        for picker in results["pickers"]:
            runs = [(n, r) for n, v in results["volumes"].items() for r in v["runs"] if r["k"] == k and r["picker"] == picker]
            if not runs:
                continue
            gains = [r["infection"]["user"] - r["infection"]["before"] for _, r in runs]
            raw = [r["infection"]["raw"] - r["infection"]["before"] for _, r in runs]
            worst = min(zip(gains, (n for n, _ in runs)))
            drops = [results["volumes"][n]["reference_before"].get("ggo", 0) - r["reference_after"].get("ggo", 0)
                     for n, r in runs if "ggo" in r["reference_after"] and r["activated"]]
            audit = [(r["audit_after"]["ggo"] - results["audit_before"]["ggo"]) if r["activated"] else 0.0 for _, r in runs]
            # Runs from before segment's guidance (guidance.py) have neither: "—".
            only = {w: (f"{np.mean([r['infection'][w] - r['infection']['before'] for _, r in runs]):+.3f}"
                        if all(w in r["infection"] for _, r in runs) else "—") for w in ("finetune_only", "guide_only")}
            lines.append(f"| {k} | {picker} | {np.mean(gains):+.3f} | {worst[0]:+.3f} ({worst[1]}) | "
                         f"{only['finetune_only']} | {only['guide_only']} | {np.mean(raw):+.3f} | "
                         f"{sum(r['activated'] for _, r in runs)}/{len(runs)} | {max(drops) if drops else float('nan'):+.3f} | "
                         f"{np.mean(audit):+.3f} | {np.median([r['seconds'] for _, r in runs]):.0f} |")
    columns = [(k, p) for k in results["k"] for p in results["pickers"]
               if any(r["k"] == k and r["picker"] == p for v in results["volumes"].values() for r in v["runs"])]
    lines += ["", "| volume | slices | K=0 infection | " + " | ".join(f"K={k} {p}" for k, p in columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for n, v in results["volumes"].items():
        cells = []
        for k, p in columns:
            r = next((r for r in v["runs"] if r["k"] == k and r["picker"] == p), None)
            cells.append("" if r is None else f"{r['infection']['user'] - r['infection']['before']:+.3f}"
                         + ("" if r["activated"] else " (gated)"))
        lines.append(f"| {n} | {v['n']} | {v['k0']['infection']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
