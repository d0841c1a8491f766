import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
def test_train_under_torchrun_gloo_keeps_ranks_in_step(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(REPO / "Testing" / "ddp_worker.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    # Parameters are updated with all-reduced gradients, so they agree exactly. BatchNorm
    # running statistics are broadcast from rank 0 before each forward and then updated on
    # each rank's own crops, so they differ after the last step; checkpoints take rank 0's.
    params = [k for k in a if "running_" not in k and "num_batches" not in k]
    assert len(params) > 50
    for k in params:
        assert torch.equal(a[k], b[k]), k
    fresh = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    assert torch.equal(fresh["head.weight"], a["head.weight"])
    assert (tmp_path / "run" / "best.pt").is_file()
