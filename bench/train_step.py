"""Seconds per training step of the bundled network in each memory layout (contiguous and
channels_last), as ``finetune`` runs its steps: 4 crops of 256 px, bf16 autocast where the
CPU has it (``--bf16 auto``), first two layers frozen, BatchNorm statistics frozen, Adam,
cross-entropy + region Dice. What ``training.training_channels_last`` chose by.

    .venv/bin/python bench/train_step.py [--threads 1,2] [--steps 8] [--rounds 2]

Prints a markdown table: layout, threads, median s/step over the timed steps (the first two of
each round are warm-up), and the speed-up of channels_last. Run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.checkpoint import load_checkpoint  # noqa: E402
from DRSegUNetLib.config import Bf16  # noqa: E402
from DRSegUNetLib.training import compute_loss, freeze_first_layers, set_train_mode, training_autocast  # noqa: E402

WARMUP = 2


def step_times(layout: torch.memory_format, steps: int, bf16: str, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    ckpt = load_checkpoint(default_model_path())
    model = ckpt.build_model().to(memory_format=layout)
    frozen = freeze_first_layers(model, 2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(4, 1, 256, 256).contiguous(memory_format=layout)
    y = torch.randint(1, 16, (4, 256, 256), dtype=torch.uint8)
    times = []
    for _ in range(WARMUP + steps):
        t = time.perf_counter()
        set_train_mode(model, frozen, "frozen")
        with training_autocast(torch.device("cpu"), bf16):
            loss = compute_loss(model(x).float(), y, "ce+regiondice")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[WARMUP:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per layout")
    ap.add_argument("--bf16", choices=Bf16.values(), default=Bf16.AUTO.value)
    args = ap.parse_args()
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    print(f"torch {torch.__version__}, bf16 {args.bf16}, 4 crops of 256 px per step")
    print("| layout | threads | s/step (median) |\n|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        med = {}
        for name, layout in layouts.items():
            med[name] = []
        for _ in range(args.rounds):  # alternate, so that a busy moment hits both
            for name, layout in layouts.items():
                med[name] += step_times(layout, args.steps, args.bf16)
        for name in layouts:
            print(f"| {name} | {threads} | {statistics.median(med[name]):.3f} |", flush=True)
        print(f"| speed-up of channels_last | {threads} | "
              f"{statistics.median(med['contiguous']) / statistics.median(med['channels_last']):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
