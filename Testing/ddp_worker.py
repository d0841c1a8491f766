"""Run by Testing/test_distributed.py under torchrun: a few DDP steps, then each rank saves its weights."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DRSegUNetLib.config import ModelConfig, NetworkConfig, TrainConfig  # noqa: E402
from DRSegUNetLib.data import read_medseg_folder  # noqa: E402
from DRSegUNetLib.training import train  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
samples = read_medseg_folder(Path(__file__).resolve().parent / "data" / "medseg_mini")
res = train(samples, [], out / "run", TrainConfig(epochs=1, steps_per_epoch=3, batch_size=2, crop=48, seed=0),
            ModelConfig(network=NetworkConfig(base_filters=4)), device="cpu")
rank = torch.distributed.get_rank()
torch.save({k: v.cpu() for k, v in res.model.state_dict().items()}, out / f"rank{rank}.pt")
