"""5-fold cross-validation of several networks under one fixed protocol (docs/crossval.md).

Folds (``splits/folds.json``, made by :func:`make_folds`): the 50 MedSeg ``train50``
slices by a seeded permutation, 10 per fold (this copy has no patient identity, so
slices of one patient may fall into different folds); the COVID-19-CT-Seg volumes
(``group`` 0-8) whole, never split, assigned so the folds' slice counts are close.

For every model and fold the model is trained with :func:`training.train` on the
other folds, with no validation set: the last step's network is the model (the
budget is fixed and identical for every model; nothing is selected on the test
fold). It is then scored on the fold with the default decision rule (argmax, as
``evaluate``), and with the threshold-averaged Dice (metrics.threshold_averaged_dice)
of the softmax probabilities. Results: ``OUT/<model>/fold<k>/result.json`` (a rerun
skips folds whose result exists), ``OUT/<model>/fold<k>/last.pt``, and the tables
``OUT/summary.md`` and ``OUT/summary.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .config import Arch, InferenceConfig, ModelConfig, NetworkConfig, ThresholdMethod, TrainConfig, Upsampling, to_dict
from .data import Sample, fingerprint, read_medseg_folder, read_zenodo_npz
from .errors import InputError
from .metrics import MetricAccumulator, ThresholdAveragedAccumulator
from .progress import ProgressCallback
from .vocabulary import REGIONS

log = logging.getLogger(__name__)

FOLDS_PATH = Path(__file__).parent / "splits" / "folds.json"
FOLDS_SEED = 2020
N_FOLDS = 5

# The compared networks. MONAI's U-Net: channels 18..288 with 2 residual units per
# level has 2.06M parameters, about the thesis's plain U-Net (2.16M).
MODELS: dict[str, NetworkConfig] = {
    "drsegunet": NetworkConfig(),
    "drsegunet-upsample": NetworkConfig(upsampling=Upsampling.UPSAMPLE.value),
    "monai-unet": NetworkConfig(arch=Arch.MONAI_UNET.value, base_filters=18, res_units=2),
}
METRICS = ("dice", "iou", "f1")
SOURCE_LABELS = {"medseg": "MedSeg", "zenodo": "COVID-19-CT-Seg"}


def source_of(s: Sample) -> str:
    """"medseg" or "zenodo" (``Sample.source``)."""
    return s.source


# ---------------------------------------------------------------- folds
def _id_key(name: str) -> tuple[int, str]:
    return (len(name), name)  # numeric ids in numeric order


def make_folds(medseg_ids: Iterable[str], zenodo_groups: Sequence[int], n_folds: int = N_FOLDS,
               seed: int = FOLDS_SEED) -> dict[str, Any]:
    """Deterministic folds: MedSeg ids by a seeded permutation, COVID-19-CT-Seg by volume.

    ``zenodo_groups``: the ``group`` of every slice (one entry per slice). Groups
    are placed largest first, each into the fold with the fewest slices so far
    (ties: lower fold number; equal sizes: lower group number).
    """
    ids = sorted(set(medseg_ids), key=_id_key)
    perm = np.random.default_rng(seed).permutation(len(ids))
    medseg = [sorted((ids[i] for i in part), key=_id_key) for part in np.array_split(perm, n_folds)]
    groups, counts = np.unique(np.asarray(zenodo_groups, dtype=int), return_counts=True)
    totals = [0] * n_folds
    zgroups: list[list[int]] = [[] for _ in range(n_folds)]
    for g, c in sorted(zip(groups.tolist(), counts.tolist()), key=lambda gc: (-gc[1], gc[0])):
        k = min(range(n_folds), key=lambda j: (totals[j], j))
        zgroups[k].append(g)
        totals[k] += c
    return {
        "description": f"{n_folds} cross-validation folds (crossval.py, docs/crossval.md). Each fold is the test "
                       "set once; the other folds train. Regenerate with "
                       f"DRSegUNetLib.crossval.make_folds_from_data(seed={seed}, n_folds={n_folds}).",
        "note": "MedSeg train50: no patient identity exists in this copy (file ids only), so slices are assigned "
                "by a seeded permutation of the ids and slices of one patient may fall into different folds. "
                "COVID-19-CT-Seg (zenodo20_dev.npz): split by 'group' (CT volume; group 8 is a block of "
                "Radiopaedia volumes), never by slice; groups placed largest first into the fold with the "
                "fewest slices.",
        "seed": seed,
        "n_folds": n_folds,
        "folds": [{"medseg": medseg[k], "zenodo_groups": sorted(zgroups[k]),
                   "n_medseg": len(medseg[k]), "n_zenodo_slices": totals[k]} for k in range(n_folds)],
    }


def make_folds_from_data(medseg_dir: str | Path, zenodo_npz: str | Path, n_folds: int = N_FOLDS,
                         seed: int = FOLDS_SEED) -> dict[str, Any]:
    """:func:`make_folds` for a MedSeg folder (ids = image file stems) and a COVID-19-CT-Seg .npz."""
    ids = [p.stem for p in Path(medseg_dir, "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    with np.load(zenodo_npz) as d:
        groups = d["group"]
    return make_folds(ids, groups, n_folds, seed)


def write_folds(folds: dict[str, Any], path: str | Path = FOLDS_PATH) -> None:
    atomic_write_bytes(path, (json.dumps(folds, indent=1) + "\n").encode())


def load_folds(path: str | Path = FOLDS_PATH) -> list[dict[str, Any]]:
    try:
        d = json.loads(Path(path).read_text())
        folds = d["folds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a folds file ({type(e).__name__}: {e})") from None
    return folds


def fold_of(s: Sample, folds: Sequence[dict[str, Any]]) -> int:
    """The one fold holding ``s``; InputError if none or several do."""
    src = source_of(s)
    if src == "medseg":
        hits = [k for k, f in enumerate(folds) if s.name in f.get("medseg", ())]
    elif src == "zenodo":
        g = int(s.group[len("zenodo"):])
        hits = [k for k, f in enumerate(folds) if g in f.get("zenodo_groups", ())]
    else:
        hits = []
    if len(hits) != 1:
        raise InputError(f"slice {s.name} ({s.group}) is in {len(hits)} folds, not one: the folds file "
                         "is made for MedSeg train50 and zenodo20_dev.npz")
    return hits[0]


def split_fold(samples: Sequence[Sample], folds: Sequence[dict[str, Any]], k: int,
               limit_slices: Optional[int] = None) -> tuple[list[Sample], list[Sample]]:
    """(train, test) for fold ``k``; ``limit_slices`` keeps the first N of each source in each (tests)."""
    where = [fold_of(s, folds) for s in samples]
    train = [s for s, f in zip(samples, where) if f != k]
    test = [s for s, f in zip(samples, where) if f == k]
    if limit_slices:
        def cut(part: list[Sample]) -> list[Sample]:
            seen: dict[str, int] = {}
            out = []
            for s in part:
                seen[source_of(s)] = seen.get(source_of(s), 0) + 1
                if seen[source_of(s)] <= limit_slices:
                    out.append(s)
            return out

        train, test = cut(train), cut(test)
    return train, test


# ---------------------------------------------------------------- one fold
def evaluate_fold(predictor, samples: Sequence[Sample], n_thresholds: int = 256,
                  spacing: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    """Argmax metrics (per source, as ``evaluate``) and threshold-averaged Dice of the probabilities.

    ``spacing``: (row, col) pixel size in mm to assume for the slices (see
    ``Predictor.probabilities``); None runs the network on the slices' own grid.

    The threshold-averaged Dice of a region uses the summed softmax probability of
    its classes (infection: GGO + consolidation; lung: GGO + consolidation + lung),
    on every slice that decides the region (empty truth included; see
    metrics.threshold_averaged_dice). Probabilities are the network's, before the
    body restriction the labels get.
    """
    accs: dict[str, MetricAccumulator] = {}
    tad = ThresholdAveragedAccumulator(n_thresholds)
    for s in samples:
        src = source_of(s)
        acc = accs.setdefault(src, MetricAccumulator(tuple(REGIONS)))
        labels, prob = predictor.labels(s.hu[None], spacing, eight_bit=s.eight_bit)
        truths = {r: s.region_truth(r) for r in REGIONS}
        acc.add(s.name, labels[0], truths)
        tad.add(src, prob[0].float().cpu().numpy(), truths)
    return {
        "metrics": {src: acc.summary() for src, acc in accs.items()},
        "threshold_averaged_dice": tad.summary(),
        "test_slices": slice_names(samples),
    }


def slice_names(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """The slices' names per source, in order (a fold result's ``test_slices``)."""
    names: dict[str, list[str]] = {}
    for s in samples:
        names.setdefault(source_of(s), []).append(s.name)
    return names


def _decision() -> dict[str, Any]:
    """The decision rule folds are scored with, as their protocol records it: the defaults, on
    the slices' own grid (evaluate_fold gets no spacing, so no working pixel size applies), and
    the body of these 8-bit slices at each slice's Otsu level (``restrict_to_body``; a rule
    InferenceConfig does not hold)."""
    return {**to_dict(InferenceConfig(batch_size=1, pixel_mm=None)), "body_8bit": ThresholdMethod.OTSU.value}


def _protocol(tcfg: TrainConfig, ncfg: NetworkConfig, limit_slices: Optional[int], folds_sha: str,
              data_fp: dict[str, str]) -> dict[str, Any]:
    # JSON round trip so that tuples and lists compare equal after a reload.
    return json.loads(json.dumps({"train": to_dict(tcfg), "network": to_dict(ncfg), "limit_slices": limit_slices,
                                  "folds_sha256": folds_sha, "data_sha256": sorted(data_fp.values()),
                                  "decision": _decision()}))


def run_fold(name: str, ncfg: NetworkConfig, k: int, train_s: Sequence[Sample], test_s: Sequence[Sample],
             out: Path, tcfg: TrainConfig, protocol: dict[str, Any], device: str = "auto",
             data_fp: Optional[dict[str, str]] = None, progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """Train ``name`` on ``train_s``, score it on ``test_s``; write and return its result (or reuse
    the one stored under the same ``protocol``; one stored under another is refused)."""
    from .inference import Predictor, bf16_enabled
    from .network import keras_parameter_count, parameter_count
    from .training import train

    fold_dir = out / name / f"fold{k}"
    result_path = fold_dir / "result.json"
    if result_path.is_file():
        prev = json.loads(result_path.read_text())
        if prev.get("protocol") == protocol:
            log.info("%s fold %d: done already (%s)", name, k, result_path)
            return prev
        raise InputError(f"{result_path} was made with other settings (training, network, folds, data or "
                         "the decision rule); use another --out or delete it")
    log.info("%s fold %d: training on %d slices, testing on %d", name, k, len(train_s), len(test_s))
    t0 = time.time()
    res = train(train_s, [], fold_dir, tcfg, ModelConfig(network=ncfg), device=device,
                fingerprint={"data": data_fp or {}, "folds": protocol["folds_sha256"]}, progress=progress,
                extra={"crossval": {"model": name, "fold": k}})
    train_seconds = time.time() - t0
    # Without validation best.pt is last.pt: keep one copy.
    if res.best_path != res.last_path and res.best_path.exists():
        res.best_path.unlink()
    t0 = time.time()
    predictor = Predictor.from_checkpoint(res.last_path, device, batch_size=1, cpu_bf16=tcfg.bf16, cuda_bf16=tcfg.bf16)
    scores = evaluate_fold(predictor, test_s)
    model = predictor.model
    count = lambda part: {src: sum(source_of(s) == src for s in part) for src in sorted({source_of(s) for s in part})}  # noqa: E731
    result = {
        "model": name, "fold": k, "protocol": protocol, "checkpoint": str(res.last_path),
        "parameters": parameter_count(model), "parameters_keras": keras_parameter_count(model),
        "n_train": count(train_s), "n_test": count(test_s),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - t0, 1),
        "loss_history": [h["loss"] for h in res.history], **scores,
        # What "auto" became on this machine (the protocol records only the setting).
        "device": str(predictor.device), "bf16_train": bf16_enabled(predictor.device, tcfg.bf16),
        "bf16_eval": predictor.uses_bf16,
    }
    atomic_write_bytes(result_path, (json.dumps(result, indent=1) + "\n").encode())
    return result


# ---------------------------------------------------------------- the table
def _mean_std(vals: list[float]) -> dict[str, Any]:
    arr = np.asarray(vals, dtype=float)
    return {"mean": float(arr.mean()) if len(arr) else None,
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "n_folds": len(arr), "per_fold": [float(v) for v in arr]}


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per model, source and region: mean ± std over folds of the per-fold slice means."""
    out: dict[str, Any] = {}
    for name, folds in results.items():
        if not folds:
            continue
        table: dict[str, dict[str, dict[str, Any]]] = {}
        sources = sorted({src for r in folds for src in r["metrics"]}, key=lambda s: (s != "medseg", s))
        for src in sources:
            for region in REGIONS:
                vals: dict[str, list[float]] = {m: [] for m in (*METRICS, "ta_dice")}
                n_slices = 0
                for r in folds:
                    m = r["metrics"].get(src, {}).get(region)
                    if m is None:
                        continue
                    n_slices += m["n_slices"]
                    for metric in METRICS:
                        if m["mean"][metric] is not None:
                            vals[metric].append(m["mean"][metric])
                    t = r["threshold_averaged_dice"].get(src, {}).get(region)
                    if t is not None:
                        vals["ta_dice"].append(t["mean"])
                if n_slices:
                    table.setdefault(src, {})[region] = {"n_slices": n_slices,
                                                         **{m: _mean_std(v) for m, v in vals.items()}}
        secs = [r["train_seconds"] for r in folds]
        out[name] = {"folds": [r["fold"] for r in folds], "parameters": folds[0]["parameters"],
                     "parameters_keras": folds[0]["parameters_keras"], "network": folds[0]["protocol"]["network"],
                     "train_seconds": {**_mean_std(secs), "total": float(sum(secs))},
                     "eval_seconds_total": float(sum(r["eval_seconds"] for r in folds)), "results": table}
    return out


def _fmt(ms: dict[str, Any]) -> str:
    if ms["mean"] is None:
        return "–"
    return f"{ms['mean']:.3f}" + (f" ± {ms['std']:.3f}" if ms["std"] is not None else "")


def summary_markdown(summary: dict[str, Any], protocol: dict[str, Any]) -> str:
    t = protocol["train"]
    lines = [
        "# Cross-validation results",
        "",
        f"Training per fold: {t['epochs']} x {t['steps_per_epoch']} steps of batch {t['batch_size']}, "
        f"crop {t['crop']}, loss {t['loss']}, lr {t['lr']:g} ({t['lr_schedule']}), seed {t['seed']}; "
        "no validation set, the last step's network is scored. Decision rule: argmax. "
        "Values: mean over a fold's slices, then mean ± sample std over folds (no std for one fold). "
        "TA-Dice: Dice averaged over 256 thresholds of the summed class probabilities.",
        "",
        "| model | data | region | Dice | IoU | F1 | TA-Dice | folds | slices |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        for src, regs in s["results"].items():
            for region, m in regs.items():
                lines.append(f"| {name} | {SOURCE_LABELS.get(src, src)} | {region} | {_fmt(m['dice'])} | "
                             f"{_fmt(m['iou'])} | {_fmt(m['f1'])} | {_fmt(m['ta_dice'])} | "
                             f"{m['dice']['n_folds']} | {m['n_slices']} |")
    lines += ["", "| model | network | parameters | parameters (Keras count) | train s per fold | train s total |",
              "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        n = s["network"]
        net = (f"{n['arch']} base {n['base_filters']}" + (f" {n['upsampling']}" if n["arch"] == Arch.DRSEGUNET
                                                          else f" res_units {n['res_units']}"))
        ts = s["train_seconds"]
        lines.append(f"| {name} | {net} | {s['parameters']:,} | {s['parameters_keras']:,} | "
                     f"{ts['mean']:.0f}" + (f" ± {ts['std']:.0f}" if ts["std"] is not None else "")
                     + f" | {ts['total']:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run
def run_crossval(medseg_dir: str | Path, zenodo_npz: str | Path, out: str | Path,
                 models: Sequence[str] = tuple(MODELS), folds: Sequence[int] = tuple(range(N_FOLDS)),
                 train_config: TrainConfig = TrainConfig(), device: str = "auto",
                 folds_path: str | Path = FOLDS_PATH, base_filters: Optional[int] = None,
                 limit_slices: Optional[int] = None, progress: Optional[ProgressCallback] = None) -> dict[str, Any]:
    """Run (or resume) every model on every fold; write and return the summary."""
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise InputError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    fold_defs = load_folds(folds_path)
    bad = [k for k in folds if not 0 <= k < len(fold_defs)]
    if bad or not folds:
        raise InputError(f"fold(s) {bad} not in 0..{len(fold_defs) - 1}")
    if train_config.frozen_layers:
        raise InputError("cross-validation trains from scratch: frozen_layers must be 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = read_medseg_folder(medseg_dir) + read_zenodo_npz(zenodo_npz)
    data_fp = fingerprint([medseg_dir, zenodo_npz])
    folds_sha = hashlib.sha256(json.dumps(fold_defs, sort_keys=True).encode()).hexdigest()
    models = list(dict.fromkeys(models))  # a repeated model or fold would count twice
    folds = list(dict.fromkeys(folds))
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in models}
    networks = {name: MODELS[name] if base_filters is None else replace(MODELS[name], base_filters=base_filters)
                for name in models}
    protocols = {name: _protocol(train_config, ncfg, limit_slices, folds_sha, data_fp)
                 for name, ncfg in networks.items()}
    for k in folds:
        train_s, test_s = split_fold(samples, fold_defs, k, limit_slices)
        for name in models:
            results[name][k] = run_fold(name, networks[name], k, train_s, test_s, out, train_config,
                                        protocols[name], device, data_fp, progress)
    # The table covers every fold finished under this protocol, also by another process
    # (e.g. one started with --folds 4 beside this one).
    for name in models:
        proto = protocols[name]
        for k in range(len(fold_defs)):
            path = out / name / f"fold{k}" / "result.json"
            if k not in results[name] and path.is_file():
                prev = json.loads(path.read_text())
                if prev.get("protocol") == proto:
                    results[name][k] = prev
    done_folds = sorted({k for r in results.values() for k in r})
    summary = summarise({m: [r[k] for k in sorted(r)] for m, r in results.items()})
    protocol = protocols[models[-1]]  # the parts the table states are the same for every model
    doc = {"protocol": {k: v for k, v in protocol.items() if k != "network"}, "folds": done_folds,
           "models": summary}
    md = summary_markdown(summary, protocol)
    atomic_write_bytes(out / "summary.json", (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write_bytes(out / "summary.md", md.encode())
    return {"summary": doc, "markdown": md}
