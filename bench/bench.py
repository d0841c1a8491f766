"""Benchmarks for DRSegUNet (issue #6): inference, the MONAI baseline, level-2 fine-tuning, FLOP/s.

    python bench/bench.py --out DIR [--device cpu|cuda] [--sizes 64,300] [--quick]

Prints markdown tables and writes ``DIR/bench.json`` (and ``DIR/bench.md``). Every
configuration runs in a child process of its own, so its peak resident memory is its
own; the parent alternates our network and MONAI's round by round, so a noisy machine
slows both alike. Timings are medians over repeats. See bench/README.md.

The input is real CT: the bundled slice ``DRSegUNetLib/data/ny_sbu_A002304_135.dcm``
(COVID-19-NY-SBU, HU) repeated N times with small per-slice shifts, as an int16
SimpleITK image, as a DICOM series reader would give it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CT_SLICE = REPO / "DRSegUNetLib" / "data" / "ny_sbu_A002304_135.dcm"
BUNDLED_MODEL = REPO / "DRSegUNetLib" / "models" / "drsegunet_level1.pt"
MAX_SHIFT = 4  # px; per-slice shifts so that slices are not byte-identical

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
GPU_BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L4", 121.0), ("RTX 4090", 165.0), ("A10", 125.0),
]

TARGETS = {
    "cpu": {"s_per_slice": 0.6, "peak_rss_mb": 2048, "finetune10_s_per_epoch": 20.0},
    "cuda": {"slices_per_s": 1000.0, "finetune10_s_per_epoch": 1.0},
}


# ============================================================== shared helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_slice_hu(shape: int = 512):
    """(hu, (row, col) spacing in mm): the real CT slice, int16; ``shape`` < 512 subsamples it (smoke runs)."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.ReadImage(str(CT_SLICE))
    hu = sitk.GetArrayFromImage(img)[0].astype(np.int16)
    step = max(1, hu.shape[0] // shape)
    if step > 1:
        hu = np.ascontiguousarray(hu[::step, ::step][:shape, :shape])
    sx, sy = img.GetSpacing()[:2]
    return hu, (sy * step, sx * step)


def shifts(n: int, seed: int = 0) -> list[tuple[int, int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)) for _ in range(n)]


def build_volume(n: int, shape: int = 512):
    """A (shape, shape, n) int16 SimpleITK image in HU from the real slice, shifted per slice."""
    import numpy as np
    import SimpleITK as sitk

    hu, spacing = base_slice_hu(shape)
    vol = np.empty((n,) + hu.shape, np.int16)
    for k, (dy, dx) in enumerate(shifts(n)):
        vol[k] = np.roll(hu, (dy, dx), axis=(0, 1))
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((spacing[1], spacing[0], 1.25))
    return img


def monai_features(base: int) -> tuple[int, ...]:
    return (base, base, 2 * base, 4 * base, 8 * base, base)


def build_model(which: str, monai_base: int = 44):
    """(model, ModelConfig, description) for ``which`` in {'ours', 'monai'}."""
    import torch

    from DRSegUNetLib.config import ModelConfig
    from DRSegUNetLib.network import DRSegUNet

    if which == "ours":
        if BUNDLED_MODEL.exists():
            from DRSegUNetLib.checkpoint import load_checkpoint

            ckpt = load_checkpoint(BUNDLED_MODEL)
            return ckpt.build_model(), ckpt.config, f"DRSegUNet ({BUNDLED_MODEL.name})"
        torch.manual_seed(0)
        return DRSegUNet().eval(), ModelConfig(), "DRSegUNet (random init; bundled model absent)"
    if which == "monai":
        from monai.networks.nets import BasicUNet

        torch.manual_seed(0)
        cfg = ModelConfig()
        model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=cfg.network.num_classes,
                          features=monai_features(monai_base))
        return model.eval(), cfg, f"MONAI BasicUNet features={monai_features(monai_base)} (random init)"
    raise ValueError(which)


@functools.lru_cache(maxsize=None)  # reads the CT file; the same answer for every N
def network_side(shape: int, variant: str) -> int:
    """Side of the square the network sees for the bench volume (``shape`` px slices of the
    real CT's spacing) in ``variant``: the working pixel grid unless ``native``."""
    from DRSegUNetLib.config import InferenceConfig
    from DRSegUNetLib.preprocessing import working_size

    if parse_variant(variant)["native"]:
        return shape
    size = working_size((shape, shape), base_slice_hu(shape)[1], InferenceConfig.pixel_mm)
    return shape if size is None else size[0]


def count_flops(which: str, shape: int, monai_base: int = 44) -> int:
    """FLOPs (FlopCounterMode: 2 per multiply-add) of one forward on one (1, 1, shape, shape) slice."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        if which == "ours":
            from DRSegUNetLib.network import DRSegUNet

            model = DRSegUNet()
        else:
            from monai.networks.nets import BasicUNet

            model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=4, features=monai_features(monai_base))
        x = torch.empty(1, 1, shape, shape)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def pick_monai_base(shape: int) -> tuple[int, int, int]:
    """BasicUNet width (multiple of 4) whose FLOPs per slice are closest to ours: (base, ours, monai)."""
    ours = count_flops("ours", shape)
    best = None
    for base in range(16, 97, 4):
        f = count_flops("monai", shape, base)
        if best is None or abs(f - ours) < abs(best[2] - ours):
            best = (base, ours, f)
    return best


def count_train_flops(batch: int, crop: int, frozen: int) -> int:
    """FLOPs of one training step (forward + backward, frozen layers as in level 2) on meta tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from DRSegUNetLib.network import DRSegUNet
    from DRSegUNetLib.training import freeze_first_layers

    with torch.device("meta"):
        model = DRSegUNet()
        x = torch.empty(batch, 1, crop, crop)
    freeze_first_layers(model, frozen)
    model.train()
    with FlopCounterMode(display=False) as fc:
        model(x).float().mean().backward()
    return int(fc.get_total_flops())


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ============================================================== variants
def parse_variant(spec: str) -> dict[str, Any]:
    """'default' is the library as it is; other variants join tokens with '+'.

    bsN: batch size N; cl: channels_last weights (CUDA already has them); cb: cudnn.benchmark;
    bf16: bf16 autocast (CUDA already has it); fp32: no autocast; compile: torch.compile (CPU: with
    weight freezing); fast: :func:`fast_iter_slices`; ort: ONNX Runtime on CPU (:class:`OrtModel`);
    native: the network on the CT's own 512-px grid instead of the working pixel size
    (InferenceConfig.pixel_mm, the default since 2026-11-27).
    """
    opts: dict[str, Any] = {"batch": None, "cl": False, "cb": False, "compile": False, "bf16": False, "fp32": False,
                            "fast": False, "ort": False, "native": False}
    for tok in spec.split("+"):
        if tok in ("default", ""):
            continue
        if tok.startswith("bs") and tok[2:].isdigit():
            opts["batch"] = int(tok[2:])
        elif tok in opts:
            opts[tok] = True
        else:
            raise SystemExit(f"unknown variant token {tok!r} in {spec!r}; use bsN, cl, cb, compile, bf16, fp32, fast, ort, native")
    return opts


def fast_iter_slices(self, image, progress=None, cancel=None, with_probabilities=False):
    """Candidate for Predictor.iter_slices: raw HU to the device (pinned, async), normalised there,
    and the next batch launched before the previous one's labels are copied back.

    Same arithmetic as the library path (clip, z-score in float32, softmax, decide), so the
    labels are the same; only where the work happens changes.
    """
    import numpy as np
    import torch

    from DRSegUNetLib.inference import SliceResult, decide, resample_bilinear, restrict_to_body, validate_ct_image
    from DRSegUNetLib.orientation import axial_spacing, axial_view
    from DRSegUNetLib.progress import check_cancel, report

    array = validate_ct_image(image)
    view, _ = axial_view(array, image.GetDirection())
    size = self.working_size(view.shape[1:], axial_spacing(image.GetSpacing(), image.GetDirection()))
    n = view.shape[0]
    bs = max(1, self.inference.batch_size)
    cuda = self.device.type == "cuda"
    pp = self.config.preprocess
    direction = image.GetDirection()

    def launch(start: int):
        raw = torch.from_numpy(np.array(view[start:start + bs]))  # a writable copy, raw dtype (int16)
        if cuda:
            raw = raw.pin_memory()
        x = raw.to(self.device, non_blocking=True).unsqueeze(1).float()
        x = (x.clamp_(pp.hu_min, pp.hu_max) - pp.mean) / pp.std
        if size is not None:
            x = resample_bilinear(x, size)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            prob = torch.softmax(self.model(x).float(), dim=1)
            if size is not None:
                prob = resample_bilinear(prob, view.shape[1:], antialias=False)
            labels = decide(prob, self.inference)
        out = torch.empty(labels.shape, dtype=torch.uint8, pin_memory=cuda)
        out.copy_(labels, non_blocking=True)
        done = torch.cuda.Event() if cuda else None
        if done is not None:
            done.record()
        return start, out, done

    def finish(start: int, out, done):
        if done is not None:
            done.synchronize()
        labels = out.numpy()
        if self.inference.restrict_to_body:
            labels = restrict_to_body(labels, view[start:start + bs], self.inference.body_threshold_hu)
        for k in range(labels.shape[0]):
            yield SliceResult(start + k, n, labels[k], direction)
        report(progress, "segment", min(start + bs, n), n, f"slice {min(start + bs, n)}/{n}")

    # On CUDA one batch stays in flight while the caller takes the previous one; on CPU the
    # work is synchronous and a lag would only delay the first slice.
    lag = 1 if cuda else 0
    report(progress, "segment", 0, n, "segmenting")
    pending = []
    for start in range(0, n, bs):
        check_cancel(cancel)
        pending.append(launch(start))
        while len(pending) > lag:
            yield from finish(*pending.pop(0))
    while pending:
        yield from finish(*pending.pop(0))


class OrtModel:
    """Runs a torch network through ONNX Runtime (CPU): exported once per in-plane size, batch dynamic."""

    def __init__(self, model, threads: int) -> None:
        import onnxruntime  # noqa: F401  (fail here, not at the first slice, when it is absent)

        self.model, self.threads, self.sessions = model, threads, {}

    def _session(self, h: int, w: int):
        import warnings

        import onnxruntime as ort
        import torch

        if (h, w) not in self.sessions:
            with tempfile.TemporaryDirectory(prefix="drsegunet-onnx-") as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = os.path.join(tmp, "model.onnx")
                torch.onnx.export(self.model, (torch.zeros(1, 1, h, w),), path, dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
                so = ort.SessionOptions()
                so.intra_op_num_threads = self.threads
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                self.sessions[(h, w)] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return self.sessions[(h, w)]

    def __call__(self, x):
        import torch

        sess = self._session(*x.shape[-2:])
        return torch.from_numpy(sess.run(None, {"x": x.contiguous().numpy()})[0])


def make_predictor(which: str, device: str, spec: str, monai_base: int):
    import torch

    from DRSegUNetLib.config import InferenceConfig
    from DRSegUNetLib.inference import Predictor

    opts = parse_variant(spec)
    model, cfg, desc = build_model(which, monai_base)
    inf = InferenceConfig.for_model(cfg, **({} if opts["batch"] is None else {"batch_size": opts["batch"]}),
                                    **({"pixel_mm": None} if opts["native"] else {}))
    pred = Predictor(model, cfg, device, inf)
    if opts["cb"]:
        torch.backends.cudnn.benchmark = True
    if opts["cl"]:
        pred.model = pred.model.to(memory_format=torch.channels_last)
    if opts["bf16"]:
        pred._autocast = lambda: torch.autocast(pred.device.type, dtype=torch.bfloat16)
    if opts["fp32"]:
        pred._autocast = contextlib.nullcontext
    if opts["compile"]:
        if pred.device.type == "cpu":
            import torch._inductor.config as icfg

            icfg.freezing = True  # fold weights/BN into constants: inference only
        pred.model = torch.compile(pred.model, dynamic=False)
    if opts["ort"]:
        if pred.device.type != "cpu":
            raise SystemExit("the ort variant is CPU only")
        pred.model = OrtModel(pred.model, torch.get_num_threads())
    if opts["fast"]:
        pred.iter_slices = types.MethodType(fast_iter_slices, pred)
    return pred, desc, inf.batch_size


# ============================================================== children
def child_infer(a: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import SimpleITK as sitk
    import torch

    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    t_setup = time.perf_counter()
    image = build_volume(a["n"], a["shape"])
    pred, desc, bs = make_predictor(a["model"], a["device"], a["variant"], a["monai_base"])
    dev = pred.device
    rss_ready = rss_mb()
    # Warm-up: full batches and the last partial one (compile and cudnn.benchmark see every shape).
    warm_n = a["n"] if a["n"] <= bs else bs + a["n"] % bs
    t_warm = time.perf_counter()
    pred.predict(build_volume(warm_n, a["shape"]))
    sync(dev)
    warm_s = time.perf_counter() - t_warm
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    totals, firsts = [], []
    labels = None
    for _ in range(a["repeats"]):
        first: list[float] = []
        t0 = time.perf_counter()

        def progress(stage, step, total, message="", **info):
            if step > 0 and not first:
                first.append(time.perf_counter() - t0)

        out = pred.predict(image, progress=progress)
        totals.append(time.perf_counter() - t0)
        firsts.append(first[0] if first else float("nan"))
        labels = sitk.GetArrayViewFromImage(out)
        assert out.GetSize() == image.GetSize()
    keep = sorted({0, a["n"] // 2, a["n"] - 1})
    np.save(a["labels_path"], np.ascontiguousarray(labels[keep]))
    return {
        "desc": desc, "batch": bs, "totals_s": totals, "first_slice_s": firsts, "warmup_s": warm_s,
        "setup_s": t_warm - t_setup, "rss_ready_mb": rss_ready, "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "threads": torch.get_num_threads(), "label_counts": np.bincount(np.asarray(labels).ravel(), minlength=4).tolist(),
    }


def finetune_samples(n: int, shape: int):
    """``n`` accepted corrections: the real slice, shifted, with labels from lung extraction + HU bands."""
    import numpy as np

    from DRSegUNetLib.config import InferenceConfig
    from DRSegUNetLib.data import Sample, labels_to_allowed, resample_sample
    from DRSegUNetLib.lungs import extract_lungs_slice
    from DRSegUNetLib.vocabulary import BACKGROUND, CONSOLIDATION, GGO, LUNG

    hu, spacing = base_slice_hu(shape)
    hu = hu.astype(np.float32)
    lung = extract_lungs_slice(hu, spacing=spacing)
    lab = np.full(hu.shape, BACKGROUND, np.uint8)
    lab[lung] = LUNG
    lab[lung & (hu > -750) & (hu <= -300)] = GGO
    lab[lung & (hu > -300)] = CONSOLIDATION
    out = []
    for k, (dy, dx) in enumerate(shifts(n, seed=1)):
        h, l = np.roll(hu, (dy, dx), (0, 1)), np.roll(lab, (dy, dx), (0, 1))
        # As `DRSegUNetLib finetune` does: on the working pixel grid.
        out.append(resample_sample(Sample(h, labels_to_allowed(l), f"bench{k}", "corrections"), spacing,
                                   InferenceConfig.pixel_mm))
    return out


def child_finetune(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from DRSegUNetLib.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from DRSegUNetLib.config import FineTuneConfig, ModelConfig, TrainConfig
    from DRSegUNetLib.network import DRSegUNet
    from DRSegUNetLib.inference import bf16_enabled
    from DRSegUNetLib.training import train

    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    samples = finetune_samples(a["n"], a["shape"])
    if BUNDLED_MODEL.exists():
        init = load_checkpoint(BUNDLED_MODEL)
    else:
        torch.manual_seed(0)
        init = Checkpoint.from_model(DRSegUNet().eval(), ModelConfig())
    ft = FineTuneConfig()
    crop = min(ft.crop, a["shape"])
    # As `DRSegUNetLib finetune` builds it: one crop per accepted slice per epoch.
    cfg = TrainConfig(epochs=a["epochs"], steps_per_epoch=max(1, math.ceil(len(samples) / ft.batch_size)),
                      batch_size=ft.batch_size, crop=crop, lr=ft.lr, frozen_layers=ft.frozen_layers,
                      loss=ft.loss, seed=ft.seed)
    marks: list[float] = []

    def progress(stage, step, total, message="", **info):
        if stage == "epoch":
            if a["device"] == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="drsegunet-bench-ft-") as tmp:
        t0 = time.perf_counter()
        res = train(samples, [], tmp, cfg, init=init, device=a["device"], progress=progress)
        # train() writes last.pt and best.pt every epoch; how much of an epoch is that?
        ckpt = load_checkpoint(res.last_path)
        t1 = time.perf_counter()
        save_checkpoint(ckpt, Path(tmp) / "timing.pt")
        save_s = time.perf_counter() - t1
    epochs = [m - p for p, m in zip([t0] + marks[:-1], marks)]
    return {"epoch_s": epochs, "checkpoint_save_s": save_s, "steps_per_epoch": cfg.steps_per_epoch, "batch": cfg.batch_size, "crop": crop,
            "frozen_layers": cfg.frozen_layers, "peak_rss_mb": peak_rss_mb(),
            "bf16": bf16_enabled(torch.device(a["device"]), cfg.bf16),
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if a["device"] == "cuda" else None,
            "threads": torch.get_num_threads()}


def _median_rate(fn, flops: float, reps: int, device) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times)


def child_peak(a: dict[str, Any]) -> dict[str, Any]:
    """Measured large matmul / conv throughput on this machine (GFLOP/s)."""
    import torch
    import torch.nn.functional as F

    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    dev = torch.device(a["device"])
    out: dict[str, Any] = {}
    with torch.inference_mode():
        if dev.type == "cpu":
            n = 2048
            x, y = torch.randn(n, n), torch.randn(n, n)
            out["matmul_fp32_gflops"] = _median_rate(lambda: x @ y, 2 * n**3, a["reps"], dev) / 1e9
            xb, yb = x.bfloat16(), y.bfloat16()
            out["matmul_bf16_gflops"] = _median_rate(lambda: xb @ yb, 2 * n**3, a["reps"], dev) / 1e9
            c, hw, b = 64, 128, 4
            inp = torch.randn(b, c, hw, hw).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
            out["conv3x3_fp32_gflops"] = _median_rate(lambda: F.conv2d(inp, w, padding=1),
                                                      2 * b * c * c * 9 * hw * hw, a["reps"], dev) / 1e9
            inp_b, w_b = inp.bfloat16(), w.bfloat16()
            out["conv3x3_bf16_gflops"] = _median_rate(lambda: F.conv2d(inp_b, w_b, padding=1),
                                                      2 * b * c * c * 9 * hw * hw, a["reps"], dev) / 1e9
            # The library runs bf16 on CPUs with native bf16 (InferenceConfig.cpu_bf16), so
            # the peak is the best of both precisions: the % column never flatters.
            out["peak_gflops"] = max(out["matmul_fp32_gflops"], out["conv3x3_fp32_gflops"],
                                     out["matmul_bf16_gflops"], out["conv3x3_bf16_gflops"])
            out["peak_what"] = ("max of measured fp32 and bf16 2048^3 matmul and 64->64 3x3 conv "
                                "(same machine, same threads)")
        else:
            n = 8192
            x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
            y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
            out["matmul_bf16_gflops"] = _median_rate(lambda: x @ y, 2 * n**3, a["reps"], dev) / 1e9
            name = torch.cuda.get_device_name(dev)
            spec = next((v for k, v in GPU_BF16_PEAK_TFLOPS if k.lower() in name.lower()), None)
            out["spec_bf16_tflops"] = spec
            out["peak_gflops"] = spec * 1e3 if spec else out["matmul_bf16_gflops"]
            out["peak_what"] = (f"{name} data-sheet dense bf16 peak ({spec} TFLOP/s)" if spec
                                else f"{name}: measured bf16 8192^3 matmul (no data-sheet value known)")
    out["threads"] = torch.get_num_threads()
    return out


CHILDREN = {"infer": child_infer, "finetune": child_finetune, "peak": child_peak}


# ============================================================== parent
def machine_description(device: str) -> dict[str, Any]:
    import numpy as np
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    d: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "platform": platform.platform(), "device": device,
        "input": f"real CT: {CT_SLICE.name} (COVID-19-NY-SBU, TCIA; HU) repeated per slice with shifts up to "
                 f"±{MAX_SHIFT} px, int16 SimpleITK image",
        "weights": "bundled level-1 model" if BUNDLED_MODEL.exists() else "random init (bundled model absent; speed does not depend on weights)",
    }
    with contextlib.suppress(Exception):
        import SimpleITK as sitk

        d["SimpleITK"] = sitk.Version.VersionString()
    with contextlib.suppress(Exception):
        import monai

        d["monai"] = monai.__version__
    with contextlib.suppress(Exception):
        d["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True, timeout=10).stdout.strip()
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), gpu_sms=p.multi_processor_count)
    return d


class Runner:
    """Starts children with a per-child timeout inside an overall budget."""

    def __init__(self, scratch: Path, budget_s: Optional[float], child_timeout_s: float) -> None:
        self.scratch = scratch
        self.deadline = time.monotonic() + budget_s if budget_s else None
        self.child_timeout_s = child_timeout_s
        self.count = 0

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def run(self, kind: str, args: dict[str, Any]) -> dict[str, Any]:
        timeout = min(self.child_timeout_s, self.left())
        if timeout < 5:
            return {"error": "skipped: benchmark time budget used up"}
        self.count += 1
        res_path = self.scratch / f"child{self.count}.json"
        spec = json.dumps({"kind": kind, "result": str(res_path), **args})
        log(f"[bench] {kind} {json.dumps(args)}")
        t = time.monotonic()
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if p.returncode != 0 or not res_path.exists():
            tail = [l for l in p.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit {p.returncode}"]
            log(p.stderr[-3000:])
            return {"error": f"failed: {tail[0][:200]}"}
        r = json.loads(res_path.read_text())
        r["wall_s"] = time.monotonic() - t
        return r


def med(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def fmt(x, nd=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def summarise_infer(rec: dict[str, Any], flops: int, peak_gflops: Optional[float]) -> None:
    runs = rec["runs"]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        rec["error"] = runs[-1]["error"] if runs else "not run"
        return
    totals = [t for r in ok for t in r["totals_s"]]
    n = rec["n"]
    total = med(totals)
    rec.update(
        desc=ok[0]["desc"], batch=ok[0]["batch"], total_s=total, s_per_slice=total / n, slices_per_s=n / total,
        first_slice_s=med([t for r in ok for t in r["first_slice_s"]]), repeats=len(totals),
        peak_rss_mb=max(r["peak_rss_mb"] for r in ok), rss_ready_mb=med([r["rss_ready_mb"] for r in ok]),
        gpu_peak_mb=med([r["gpu_peak_mb"] for r in ok]), warmup_s=med([r["warmup_s"] for r in ok]),
        gflop_per_slice=flops / 1e9, achieved_gflops=flops * n / total / 1e9, threads=ok[0]["threads"],
        label_counts=ok[-1]["label_counts"],
    )
    rec["pct_of_peak"] = 100 * rec["achieved_gflops"] / peak_gflops if peak_gflops else None
    if len(ok) < len(runs):
        rec["partial_error"] = next(r["error"] for r in runs if "error" in r)


def labels_path(scratch: Path, model: str, variant: str, n: int) -> Path:
    return scratch / f"labels_{model}_{variant.replace('+', '_')}_{n}.npy"


def label_agreement(a: Path, b: Path) -> Optional[float]:
    import numpy as np

    if not (a.exists() and b.exists()):
        return None
    x, y = np.load(a), np.load(b)
    return float((x == y).mean()) if x.shape == y.shape else None


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# DRSegUNet benchmark ({m['device']}, {m['date']})", ""]
    lines.append(f"- CPU: {m['cpu']}, {m['usable_cpus']} usable cores, torch threads {m['torch_threads']}, "
                 f"load average at start {', '.join(f'{v:.2f}' for v in m['loadavg_at_start'])}")
    if m.get("gpu"):
        lines.append(f"- GPU: {m['gpu']} ({m['gpu_memory_gb']} GB), CUDA {m['cuda']}, cuDNN {m['cudnn']}")
    lines.append(f"- torch {m['torch']}, numpy {m['numpy']}, SimpleITK {m.get('SimpleITK', '?')}, "
                 f"MONAI {m.get('monai', 'absent')}, Python {m['python']}, commit {m.get('git_commit', '?')[:10]}")
    lines.append(f"- Input: {m['input']}; in-plane {result['shape']}x{result['shape']}")
    lines.append(f"- Weights: {m['weights']}")
    f = result["flops"]
    lines.append(f"- FLOPs per {result['shape']}x{result['shape']} slice (FlopCounterMode, 2 per multiply-add): "
                 f"DRSegUNet {f['ours'] / 1e9:.1f} GFLOP, MONAI BasicUNet features={f['monai_features']} "
                 f"{f['monai'] / 1e9:.1f} GFLOP ({100 * (f['monai'] / f['ours'] - 1):+.0f}%)"
                 if f.get("monai") else f"- FLOPs per slice: DRSegUNet {f['ours'] / 1e9:.1f} GFLOP (MONAI absent)")
    pk = result.get("peak", {})
    if pk and "error" not in pk:
        extra = ", ".join(f"{k} {v:,.0f}" for k, v in pk.items() if k.endswith("_gflops"))
        lines.append(f"- Hardware peak used for %: {pk['peak_gflops']:,.0f} GFLOP/s = {pk['peak_what']} ({extra})")
    elif pk:
        lines.append(f"- Hardware peak: {pk['error']}")
    lines.append("- The network runs at the working pixel size (InferenceConfig.pixel_mm) on a grid of "
                 "'net px' a side, and the labels come back on the CT's grid; variant `native` runs it on the "
                 "CT's grid. GFLOP/slice is on the network's grid.")
    lines += ["", "## Inference (SimpleITK image in → label map out)", "",
              "| network | variant | N | batch | net px | s/slice | slices/s | first slice s | total s | peak RSS MB | GPU peak MB | GFLOP/slice | GFLOP/s | % peak | labels = default |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["inference"]:
        name = "DRSegUNet" if r["model"] == "ours" else "MONAI BasicUNet"
        if "error" in r:
            lines.append(f"| {name} | {r['variant']} | {r['n']} | | | {r['error']} | | | | | | | | | |")
            continue
        agree = r.get("agreement_with_default")
        lines.append(
            f"| {name} | {r['variant']} | {r['n']} | {r['batch']} | {r.get('network_side', '')} | {fmt(r['s_per_slice'])} | {fmt(r['slices_per_s'])} | "
            f"{fmt(r['first_slice_s'])} | {fmt(r['total_s'])} | {fmt(r['peak_rss_mb'], 4)} | {fmt(r['gpu_peak_mb'], 4)} | "
            f"{r['gflop_per_slice']:.1f} | {fmt(r['achieved_gflops'])} | {fmt(r['pct_of_peak'], 2)} | "
            f"{'—' if agree is None else ('equal' if agree == 1.0 else f'{100 * agree:.3f}%')} |")
    if result.get("ratios"):
        lines += ["", "## DRSegUNet / MONAI (same run, alternating; < 1 means DRSegUNet is faster)", "",
                  "| variant | N | time per slice ratio | time per FLOP ratio |", "|---|---|---|---|"]
        for q in result["ratios"]:
            lines.append(f"| {q['variant']} | {q['n']} | {q['time_ratio']:.3f} | {q['time_per_flop_ratio']:.3f} |")
    if result.get("finetune"):
        lines += ["", "## Fine-tuning level 2 (library train(), FineTuneConfig defaults)", "",
                  "| accepted slices | steps x batch x crop | s/epoch (median, epochs 2+) | first epoch s | of which 2 checkpoint saves s | GFLOP/epoch | GFLOP/s | % peak | peak RSS MB | GPU peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["finetune"]:
            if "error" in r:
                lines.append(f"| {r['n']} | | {r['error']} | | | | | | | |")
                continue
            lines.append(f"| {r['n']} | {r['steps_per_epoch']} x {r['batch']} x {r['crop']}² | {fmt(r['s_per_epoch'])} | "
                         f"{fmt(r['first_epoch_s'])} | {fmt(2 * r['checkpoint_save_s'])} | {r['gflop_per_epoch']:.0f} | {fmt(r['achieved_gflops'])} | "
                         f"{fmt(r['pct_of_peak'], 2)} | {fmt(r['peak_rss_mb'], 4)} | {fmt(r['gpu_peak_mb'], 4)} |")
    if result.get("targets"):
        lines += ["", "## Targets (issue #6)", ""] + [f"- {t}" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def check_targets(result: dict[str, Any]) -> list[str]:
    dev, out = result["machine"]["device"], []
    t = TARGETS.get(dev, {})
    for r in result["inference"]:
        if r["model"] != "ours" or "error" in r:
            continue
        if dev == "cpu" and r["n"] >= 300:
            ok = r["s_per_slice"] <= t["s_per_slice"] and r["peak_rss_mb"] <= t["peak_rss_mb"]
            out.append(f"{'MET' if ok else 'MISSED'}: CPU {r['n']} slices, {r['variant']}: {r['s_per_slice']:.3f} s/slice "
                       f"(≤ {t['s_per_slice']}), {r['total_s']:.0f} s total, peak RSS {r['peak_rss_mb']:.0f} MB (≤ {t['peak_rss_mb']})")
        if dev == "cuda":
            ok = r["slices_per_s"] >= t["slices_per_s"]
            out.append(f"{'MET' if ok else 'MISSED'}: {r['n']} slices, {r['variant']}: {r['slices_per_s']:.0f} slices/s (≥ {t['slices_per_s']:.0f})")
    for q in result.get("ratios", []):
        ok = q["time_per_flop_ratio"] <= 1.0
        out.append(f"{'MET' if ok else 'MISSED'}: per FLOP at least as fast as MONAI ({q['variant']}, N={q['n']}): ratio {q['time_per_flop_ratio']:.3f} (≤ 1)")
    for r in result.get("finetune", []):
        if r["n"] == 10 and "error" not in r and r.get("s_per_epoch") is not None:
            lim = t["finetune10_s_per_epoch"]
            out.append(f"{'MET' if r['s_per_epoch'] <= lim else 'MISSED'}: fine-tune 10 slices {r['s_per_epoch']:.2f} s/epoch (≤ {lim})")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for bench.json and bench.md")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when torch sees one")
    p.add_argument("--sizes", default=None, help="slices per volume, comma-separated (default 64,300)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 slices, 2 fine-tune slices, one repeat")
    p.add_argument("--shape", type=int, default=512, help="in-plane size (512; smaller only for smoke runs)")
    p.add_argument("--variants", default=None,
                   help="inference variants of DRSegUNet, comma-separated; 'default' is the library as is; "
                        "tokens joined by '+': bsN cl cb compile bf16 fp32 fast native (see parse_variant; default cpu: "
                        "default,native,fp32; cuda: default,native,bs64+cb,bs64+cb+fast,bs64+cb+fast+compile)")
    p.add_argument("--monai-variants", default=None,
                   help="variants also run with MONAI for the ratio (default cuda: default,bs64+cb+fast; "
                        "otherwise the --variants without compile)")
    p.add_argument("--rounds", type=int, default=None,
                   help="children per configuration (cpu: 3, 1 above 100 slices; cuda: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs inside each child (cpu 1, cuda 3)")
    p.add_argument("--finetune", default=None, help="accepted-slice counts for fine-tuning (default 10,50; 'none')")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs per run (cpu 3, cuda 6)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in children (0: torch's default)")
    p.add_argument("--no-monai", action="store_true")
    p.add_argument("--no-peak", action="store_true")
    p.add_argument("--budget", type=float, default=None, help="overall seconds; later configurations are skipped")
    p.add_argument("--child-timeout", type=float, default=3600.0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        res = CHILDREN[spec["kind"]](spec)
        Path(spec["result"]).write_text(json.dumps(res))
        return 0
    if not args.out:
        p.error("--out is required")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    try:
        import monai  # noqa: F401

        have_monai = not args.no_monai
    except ImportError:
        have_monai = False
        log("[bench] MONAI is not installed: no baseline ratio (pip install monai)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Children's results and label samples go to a scratch folder: DIR keeps only the report.
    scratch = Path(tempfile.mkdtemp(prefix="drsegunet-bench-"))
    try:
        return run_all(args, out, scratch, device, have_monai)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_all(args: argparse.Namespace, out: Path, scratch: Path, device: str, have_monai: bool) -> int:
    cuda = device == "cuda"
    sizes = [int(s) for s in (args.sizes or ("4" if args.quick else "64,300")).split(",")]
    variants = (args.variants or ("default,native,bs64+cb,bs64+cb+fast,bs64+cb+fast+compile" if cuda else "default,native,fp32")).split(",")
    monai_variants = (args.monai_variants or ("default,bs64+cb+fast" if cuda and not args.variants else
                                              ",".join(v for v in variants if "compile" not in v))).split(",")
    ft_sizes = [] if args.finetune == "none" else [int(s) for s in (args.finetune or ("2" if args.quick else "10,50")).split(",")]

    def rounds_for(n: int) -> int:  # CPU: a 300-slice volume takes minutes; one child of it is enough
        return args.rounds or (1 if args.quick or cuda or n > 100 else 3)

    repeats = args.repeats or (3 if cuda and not args.quick else 1)
    epochs = args.epochs or (2 if args.quick else 6 if cuda else 3)
    runner = Runner(scratch, args.budget, args.child_timeout)
    common = {"device": device, "shape": args.shape, "threads": args.threads}
    flops: dict[str, Any] = {"ours": count_flops("ours", args.shape)}
    monai_base = 44
    if have_monai:
        monai_base, _, flops["monai"] = pick_monai_base(args.shape)
        flops["monai_features"] = list(monai_features(monai_base))
    result: dict[str, Any] = {"machine": machine_description(device), "shape": args.shape, "flops": flops,
                              "settings": {"sizes": sizes, "variants": variants, "monai_variants": monai_variants,
                                           "rounds": {n: rounds_for(n) for n in sizes}, "repeats_per_child": repeats, "finetune": ft_sizes,
                                           "epochs": epochs, "quick": args.quick},
                              "inference": [], "finetune": []}

    def save() -> None:
        result["targets"] = check_targets(result)
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "bench.md").write_text(render(result))

    peak_gflops = None
    if not args.no_peak:
        result["peak"] = runner.run("peak", {**common, "reps": 3 if args.quick else 7})
        peak_gflops = result["peak"].get("peak_gflops")
    save()

    def run_inference(variant_list: list[str], monai_list: list[str]) -> None:
        """For each N: rounds of children, alternating DRSegUNet and MONAI per variant."""
        for n in sizes:
            configs = [("ours", v) for v in variant_list] + [("monai", v) for v in monai_list]
            configs.sort(key=lambda c: ((variant_list + monai_list).index(c[1]), c[0] != "ours"))
            recs = {c: {"model": c[0], "variant": c[1], "n": n, "runs": []} for c in configs}
            for _ in range(rounds_for(n)):
                for c in configs:
                    recs[c]["runs"].append(runner.run("infer", {
                        **common, "model": c[0], "variant": c[1], "n": n, "repeats": repeats,
                        "monai_base": monai_base, "labels_path": str(labels_path(scratch, c[0], c[1], n))}))
            for c, rec in recs.items():
                side = network_side(args.shape, c[1])
                key = f"{c[0]}@{side}"
                if key not in flops:
                    flops[key] = count_flops("ours", side) if c[0] == "ours" else count_flops("monai", side, monai_base)
                rec["network_side"] = side
                summarise_infer(rec, flops[key], peak_gflops)
                rec["agreement_with_default"] = label_agreement(labels_path(scratch, c[0], "default", n),
                                                                labels_path(scratch, c[0], c[1], n))
                result["inference"].append(rec)
                ours = recs.get(("ours", c[1]))
                if c[0] == "monai" and "error" not in rec and ours and "error" not in ours:
                    tr = ours["s_per_slice"] / rec["s_per_slice"]
                    result.setdefault("ratios", []).append({
                        "variant": c[1], "n": n, "time_ratio": tr,
                        "time_per_flop_ratio": tr * flops[f"monai@{side}"] / flops[f"ours@{side}"]})
            save()

    def run_finetune() -> None:
        from DRSegUNetLib.config import FineTuneConfig

        ft = FineTuneConfig()
        step_flops = count_train_flops(ft.batch_size, min(ft.crop, args.shape), ft.frozen_layers)
        for n in ft_sizes:
            r = runner.run("finetune", {**common, "n": n, "epochs": epochs})
            rec: dict[str, Any] = {"n": n, **r}
            if "error" not in r:
                later = r["epoch_s"][1:] or r["epoch_s"]
                rec.update(s_per_epoch=med(later), first_epoch_s=r["epoch_s"][0],
                           gflop_per_epoch=step_flops * r["steps_per_epoch"] / 1e9)
                rec["achieved_gflops"] = rec["gflop_per_epoch"] / rec["s_per_epoch"]
                rec["pct_of_peak"] = 100 * rec["achieved_gflops"] / peak_gflops if peak_gflops else None
            result["finetune"].append(rec)
            save()

    # Compiled variants last: their compile time must not crowd out the rest of a budgeted run.
    plain = [v for v in variants if "compile" not in v]
    run_inference(plain, [v for v in monai_variants if "compile" not in v] if have_monai else [])
    if ft_sizes:
        run_finetune()
    compiled = [v for v in variants if "compile" in v]
    if compiled:
        run_inference(compiled, [v for v in monai_variants if "compile" in v] if have_monai else [])

    save()
    print(render(result))
    log(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
