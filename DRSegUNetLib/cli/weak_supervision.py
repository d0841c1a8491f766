"""Learning without annotations (thesis §4.4): ``lungs`` (lung extraction), ``pseudolabel``
(k-means pseudo-labels) and ``selftrain`` (pseudo-labels, level 1, level 2, ...).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from ..config import SELFTRAIN_LOSSES, ClusterDomain, LrSchedule, PseudoLabelConfig, SelfTrainConfig, ThresholdMethod
from ..errors import InputError
from ..vocabulary import BACKGROUND, GGO, LUNG
from .common import ProgressPrinter, add_common_options, add_json_progress, add_verbose, log
from .files import (check_nifti_signature, check_outputs, check_written_nifti, expand_inputs, read_ct_checked,
                    writing)


def add_parsers(sub) -> None:
    st = SelfTrainConfig()
    _add_lungs(sub, st)
    _add_pseudolabel(sub, st)
    _add_selftrain(sub, st)


def _add_input_output(p) -> None:
    """INPUT and OUTPUT of lungs and pseudolabel."""
    p.add_argument("input", help="CT volume in HU, DICOM series folder, or .npz with ct_uint8")
    p.add_argument("output", help="label map (volume format, or .npz)")


def _add_lungs(sub, st: SelfTrainConfig) -> None:
    p = sub.add_parser("lungs", help="lung mask of a CT volume (thesis §4.4.1 steps 1-3)",
                       description=f"Extract the lungs of a CT volume in HU (NIfTI, NRRD, MHA, DICOM) and write a label map with the input's geometry (lung = --value, default {LUNG}, the vocabulary's lung label). "
                                   "INPUT may also be an .npz of 8-bit slices (ct_uint8, like zenodo20_dev.npz), mapped to approximate HU; OUTPUT is then an .npz with 'labels' (N, H, W) for evaluate --predictions.")
    _add_input_output(p)
    _add_lung_threshold(p, st)
    p.add_argument("--value", type=int, default=LUNG, help=f"label value of lung pixels (default {LUNG} = lung; 1 for a 0/1 mask)")
    add_verbose(p)


def _add_pseudolabel(sub, st: SelfTrainConfig) -> None:
    p = sub.add_parser("pseudolabel", help="k-means pseudo-labels of a CT volume (thesis §4.4.1)",
                       description=f"Lung extraction, k-means (K=3) on the lung-extracted image (--cluster-domain) and morphological clean-up: a label map {BACKGROUND} background, {GGO} GGO, {LUNG} lung with the input's geometry. "
                                   "INPUT may also be an .npz of 8-bit slices (ct_uint8); OUTPUT is then an .npz with 'labels' (N, H, W) for evaluate --predictions.")
    _add_input_output(p)
    p.add_argument("--lung-mask", default=None, help="use this lung mask (nonzero = lung) of a volume instead of extracting one")
    _add_lung_threshold(p, st)
    _add_cluster_domain(p)
    add_verbose(p)


def _add_selftrain(sub, st: SelfTrainConfig) -> None:
    p = sub.add_parser("selftrain", help="weakly supervised self-learning: pseudo-labels, level 1, level 2 (thesis §4.4)",
                       description="Recursive learning without annotations (thesis §4.4.2, §5.5): k-means pseudo-labels (OUT/level0); level 1 trained from scratch on them, then predicting labels for the inputs and --extra slices (OUT/level1); "
                                   "level 2 fine-tuned from level 1 with its first layers frozen at a lower learning rate on those labels (OUT/level2); and so on for --levels. "
                                   "Each level keeps best.pt, labels.npz and metrics.json; OUT/state.json lets a rerun skip finished levels (an interrupted level starts again).")
    p.add_argument("inputs", nargs="+", help="CT volumes in HU (files, folders, DICOM series folders) and/or .npz files of 8-bit slices (ct_uint8)")
    p.add_argument("--out", required=True, help="output folder (level0, level1, ..., state.json)")
    p.add_argument("--extra", nargs="*", default=[],
                   help="more unlabelled inputs, labelled first by level 1's predictions (default: none)")
    p.add_argument("--levels", "--rounds", dest="levels", type=int, default=st.levels,
                   help=f"trained levels: 1 from scratch, 2.. fine-tuned (default {st.levels})")
    p.add_argument("--level1-lr", type=float, default=st.level1_lr, help=f"default {st.level1_lr:g} (thesis §5.5)")
    p.add_argument("--level1-epochs", type=int, default=st.level1_epochs, help=f"default {st.level1_epochs} (thesis §5.5)")
    p.add_argument("--level2-lr", type=float, default=st.level2_lr, help=f"levels >= 2; default {st.level2_lr:g} (thesis §5.5)")
    p.add_argument("--level2-epochs", type=int, default=st.level2_epochs, help=f"levels >= 2; default {st.level2_epochs}")
    p.add_argument("--frozen-layers", type=int, default=st.frozen_layers, help=f"levels >= 2; default {st.frozen_layers} (stem conv1, bn1)")
    p.add_argument("--steps-per-epoch", type=int, default=st.steps_per_epoch,
                   help=f"optimiser steps per epoch (default {st.steps_per_epoch}: one pass over the training slices)")
    p.add_argument("--batch-size", type=int, default=st.batch_size, help=f"crops per step (default {st.batch_size})")
    p.add_argument("--crop", type=int, default=st.crop, help=f"square training crop in pixels (default {st.crop})")
    p.add_argument("--loss", choices=SELFTRAIN_LOSSES, default=st.loss,
                   help=f"ce: marginal cross-entropy, ce+dice adds a soft Dice term (default {st.loss})")
    p.add_argument("--lr-schedule", choices=LrSchedule.values(), default=st.lr_schedule,
                   help="every level: constant (default, thesis) or cosine decay to 2%% of the level's rate")
    p.add_argument("--base-filters", type=int, default=st.base_filters,
                   help=f"network width (default {st.base_filters}; 16 = the thesis's network)")
    p.add_argument("--seed", type=int, default=st.seed, help=f"seed of k-means and of every level (default {st.seed})")
    p.add_argument("--threshold", choices=ThresholdMethod.values(), default=ThresholdMethod.AUTO.value,
                   help="lung threshold rule: auto (default) = Otsu per slice for 8-bit .npz slices, the thesis's fixed -170 HU for CT in HU; "
                        "thesis = fixed levels (--threshold-hu, --eight-bit-threshold-hu); otsu = Otsu per slice for every input")
    p.add_argument("--eight-bit-threshold-hu", type=float, default=st.eight_bit_lung_threshold_hu,
                   help=f"with --threshold thesis: lung threshold for 8-bit .npz slices in approx. HU (default {st.eight_bit_lung_threshold_hu:g})")
    p.add_argument("--threshold-hu", type=float, default=None, help="lung threshold for CT in HU (default -170, thesis; not with --threshold otsu)")
    _add_cluster_domain(p)
    add_json_progress(p)
    add_common_options(p)


def _add_cluster_domain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-domain", choices=ClusterDomain.values(), default=PseudoLabelConfig.cluster_domain,
                   help="what k-means (K=3) clusters: image (default, thesis step 5) = the lung-extracted image with "
                        "air outside the lung; lung = the lung pixels only (the brightest third: mostly vessels)")


def _add_lung_threshold(p: argparse.ArgumentParser, st: SelfTrainConfig) -> None:
    p.add_argument("--threshold", choices=ThresholdMethod.values(), default=ThresholdMethod.AUTO.value,
                   help="air/tissue threshold rule (lungs.py): auto (default) = otsu for 8-bit .npz slices, thesis for CT in HU; "
                        f"thesis = a fixed level, -170 HU for CT in HU as in the thesis ({st.eight_bit_lung_threshold_hu:g} approx. HU for 8-bit slices), or --threshold-hu; "
                        "otsu = Otsu's level of each slice after Gaussian smoothing (for intensities that are not calibrated HU)")
    p.add_argument("--threshold-hu", type=float, default=None,
                   help="a fixed air/tissue level in (approx.) HU for every input; implies --threshold thesis")


def _read_for_labels(path: str, threshold_hu: Optional[float], method: str = ThresholdMethod.AUTO.value,
                     output: Optional[str] = None, other_inputs: Sequence[Optional[str]] = ()):
    """(SliceInput, LungConfig) of a CT volume in HU or an .npz of 8-bit slices, after checking
    that ``output`` is a label-map path _write_labels can write for it (without overwriting an input)."""
    from ..imageio import check_volume_output
    from ..slices import read_slices
    from ..weak import lung_config_for

    if output is not None:
        check_volume_output(output, npz=True)
        check_outputs([path, *other_inputs], [output])
        if Path(path).suffix.lower() == ".npz" and not output.lower().endswith(".npz"):
            raise InputError(f"{path} holds 8-bit slices without CT geometry: write an .npz, not {Path(output).name}")
        if Path(path).suffix.lower() != ".npz" and output.lower().endswith(".npz"):
            raise InputError(f"{path} is a CT volume: write a volume (.nii.gz, .nrrd, .mha), which keeps its "
                             f"geometry, not {Path(output).name}")
    check_nifti_signature(path)
    inp = read_slices(path)
    return inp, lung_config_for(inp, threshold_hu=threshold_hu, method=method)


def _threshold_text(cfg) -> str:
    if cfg.threshold_method == ThresholdMethod.OTSU:
        return f"Otsu per slice, sigma {cfg.otsu_sigma_px:g} px"
    return f"{cfg.threshold_hu:g} HU"


def _write_labels(inp, labels, output: str) -> None:
    """Write (n, H, W) labels in the axial display frame: .npz, or a volume with the input's geometry."""
    import numpy as np
    import SimpleITK as sitk

    from ..imageio import output_set, write_image
    from ..orientation import axial_view
    from ..labelmaps import save_label_maps

    if output.lower().endswith(".npz"):
        save_label_maps(output, [inp.path], [labels])
        return
    _, inverse = axial_view(sitk.GetArrayViewFromImage(inp.image), inp.image.GetDirection())
    image = sitk.GetImageFromArray(np.ascontiguousarray(inverse(labels.astype(np.uint8))))
    image.CopyInformation(inp.image)
    with output_set() as stage, writing(output, stage(output)) as tmp:
        write_image(image, tmp)
        if output.lower().endswith((".nii", ".nii.gz")):
            check_written_nifti(output, tmp)


def _require_lung(inp, lungs, where: str) -> None:
    """InputError when an input has no lung at all (slices above or below the lungs may have none)."""
    if lungs.any():
        return
    h, w = inp.hu.shape[1:]
    hint = (f"its axial slices are {h}x{w} px: is it a coronal or sagittal image?" if min(h, w) < 16
            else "is it a chest CT in HU?")
    raise InputError(f"no lung found in {inp.path} ({len(inp)} axial slice(s), {where}); {hint}")


def cmd_lungs(args: argparse.Namespace) -> int:
    from ..weak import lung_masks

    if not 0 < args.value < 256:
        raise InputError(f"--value must be 1..255, not {args.value}")
    inp, cfg = _read_for_labels(args.input, args.threshold_hu, args.threshold, args.output)
    masks = lung_masks(inp, cfg, progress=ProgressPrinter())
    threshold = _threshold_text(cfg)
    _require_lung(inp, masks, f"threshold: {threshold}")
    _write_labels(inp, masks.astype("uint8") * args.value, args.output)
    log.info("lungs in %d of %d slices (threshold: %s): wrote %s", int(masks.any(axis=(1, 2)).sum()), len(inp),
             threshold, args.output)
    return 0


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    import numpy as np

    from ..weak import lung_masks, pseudo_labels

    printer = ProgressPrinter()
    inp, cfg = _read_for_labels(args.input, args.threshold_hu, args.threshold, args.output, [args.lung_mask])
    if args.lung_mask:
        from ..imageio import mask_on_grid
        from ..orientation import axial_view

        if inp.image is None:
            raise InputError("--lung-mask works with CT volumes, not with 8-bit .npz slices")
        mask = mask_on_grid(read_ct_checked(args.lung_mask), inp.image, f"lung mask {args.lung_mask}")
        view, _ = axial_view(mask, inp.image.GetDirection())
        lungs = np.ascontiguousarray(view) != 0
        _require_lung(inp, lungs, f"the lung mask {args.lung_mask} is empty")
    else:
        lungs = lung_masks(inp, cfg, progress=printer)
        _require_lung(inp, lungs, f"threshold: {_threshold_text(cfg)}")
    labels = pseudo_labels(inp, lungs, PseudoLabelConfig(cluster_domain=args.cluster_domain), progress=printer)
    _write_labels(inp, labels, args.output)
    log.info("pseudo-labels: %d GGO and %d lung pixels in %d slices: wrote %s", int((labels == GGO).sum()),
             int((labels == LUNG).sum()), len(inp), args.output)
    return 0


def cmd_selftrain(args: argparse.Namespace) -> int:
    from ..config import LungConfig
    from ..selftrain import run_selftrain

    inputs = expand_inputs(args.inputs, None)
    extras = expand_inputs(args.extra, None) if args.extra else []
    if not inputs:
        raise InputError("no inputs found")
    cfg = SelfTrainConfig(levels=args.levels, level1_lr=args.level1_lr, level1_epochs=args.level1_epochs,
                          level2_lr=args.level2_lr, level2_epochs=args.level2_epochs, frozen_layers=args.frozen_layers,
                          steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, crop=args.crop,
                          loss=args.loss, seed=args.seed, base_filters=args.base_filters,
                          lr_schedule=args.lr_schedule, eight_bit_lung_threshold_hu=args.eight_bit_threshold_hu)
    if args.threshold == ThresholdMethod.OTSU and args.threshold_hu is not None:
        raise InputError("--threshold-hu is a fixed level: not with --threshold otsu")
    try:
        lung = LungConfig(threshold_method=args.threshold)
        if args.threshold_hu is not None:
            lung = LungConfig(threshold_method=args.threshold, threshold_hu=args.threshold_hu)
    except ValueError as e:  # e.g. a threshold outside [air, bone]
        raise InputError(str(e)) from None
    printer = ProgressPrinter(json_lines=args.json_progress)
    t0 = time.time()
    result = run_selftrain(inputs, args.out, cfg, extras=extras, lung=lung,
                           pseudo=PseudoLabelConfig(cluster_domain=args.cluster_domain), device=args.device,
                           progress=printer)
    printer("done", 1, 1, f"{len(result.checkpoints)} level(s) in {args.out} ({time.time() - t0:.0f} s; "
                          f"skipped as finished: {', '.join(result.skipped) or 'none'})",
            checkpoints=[str(p) for p in result.checkpoints])
    return 0


COMMANDS = {"lungs": cmd_lungs, "pseudolabel": cmd_pseudolabel, "selftrain": cmd_selftrain}
