"""Time per slice of ``Predictor.predict`` outside the network (stand-in network that costs nothing).

On the H200 the library segmented 97 slices/s, and the network's arithmetic was not what
limited it (docs/bench_gpu_h200_2026-11-27.md). This script measures the rest on a CPU,
where every stage runs on the CPU (on a GPU, resampling and the decision run there): the bundled real slice repeated N times (shifted
by up to ±4 px) as a 512x512xN int16 volume, the bundled model's preprocessing and
decision rule, and a network replaced by one that returns its input as the lung logit.
Prints the median total per slice over the repeats, then the cumulative time per slice of
the main stages from one profiled run.

    python bench/pipeline_overhead.py --slices 100 --repeats 5 --threads 2
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SimpleITK as sitk  # noqa: E402

from DRSegUNetLib.inference import Predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("restrict_to_body", "body_mask", "fill_holes", "probabilities", "resample_bilinear", "decide",
          "normalize")


class StandIn(torch.nn.Module):
    """Four "class logits" from the input: everything is lung; costs a copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(x)
        return torch.cat([zero, zero, zero, x], dim=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    one = sitk.ReadImage(str(REPO / "DRSegUNetLib" / "data" / "ny_sbu_A002304_135.dcm"))
    hu = sitk.GetArrayFromImage(one)[0]
    vol = np.stack([np.roll(hu, (i % 9) - 4, axis=1) for i in range(a.slices)]).astype(np.int16)
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing(one.GetSpacing()[:2] + (1.0,))
    predictor = Predictor.from_checkpoint(REPO / "DRSegUNetLib" / "models" / "drsegunet_level1.pt", device="cpu")
    predictor.model = StandIn()
    predictor.predict(image)  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        predictor.predict(image)
        times.append(time.perf_counter() - t)
    profile = cProfile.Profile()
    profile.runcall(predictor.predict, image)
    stats = pstats.Stats(profile).stats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.slices} slices of 512x512, "
          f"batch {predictor.inference.batch_size}, pixel {predictor.inference.pixel_mm} mm")
    print("| stage | ms per slice |\n|---|---|")
    print(f"| predict, all but the network (median of {a.repeats}) | {1e3 * statistics.median(times) / a.slices:.2f} |")
    for name in STAGES:
        cum = sum(v[3] for (_, _, fn), v in stats.items() if fn == name)
        if cum:
            print(f"| {name} (profiled run) | {1e3 * cum / a.slices:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
