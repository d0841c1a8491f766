"""Write every K-th slice of a COVID-19-CT-Seg .npz, compressed, for a machine it must travel to.

The lent GPU machine receives the repository and at most 64 MiB with it; zenodo20_dev.npz
is 67 MB (its 8-bit CT does not compress), so bench/gpu_crossval.sh gets a subset:

    python bench/pack_zenodo.py ../shared/data/zenodo20/zenodo20_dev.npz .device-data/zenodo_every2.npz --every 2

Every volume (``group``) keeps every K-th of its slices, in order, with all arrays; the
cross-validation folds (by group) are unchanged.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz")
    p.add_argument("out")
    p.add_argument("--every", type=int, default=2, help="keep every K-th slice of each group (default 2)")
    a = p.parse_args(argv)
    if a.every < 1:
        p.error("--every must be >= 1")
    with np.load(a.npz) as z:
        arrays = {k: z[k] for k in z.files}
    group = arrays["group"]
    keep = np.concatenate([np.flatnonzero(group == g)[::a.every] for g in np.unique(group)])
    keep.sort()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, **{k: v[keep] for k, v in arrays.items()})
    os.replace(tmp, out)
    print(f"{out}: {len(keep)} of {len(group)} slices, {out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
