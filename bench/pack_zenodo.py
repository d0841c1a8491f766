"""Write every K-th slice of a COVID-19-CT-Seg .npz, compressed, for a machine it must travel to.

The lent GPU machine receives the repository and at most 64 MiB with it; zenodo20_dev.npz
is 67 MB (its 8-bit CT does not compress), so bench/gpu_crossval.sh gets a subset:

    python bench/pack_zenodo.py ../shared/data/zenodo20/zenodo20_dev.npz .device-data/zenodo_every2.npz --every 2

Every volume (``group``) keeps every K-th of its slices, in order, with all arrays; the
cross-validation folds (by group) are unchanged. ``--max-bytes N`` raises K from ``--every``
until the file is at most N bytes (bench/device_pack.sh gives it what the 64 MiB leave).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz")
    p.add_argument("out")
    p.add_argument("--every", type=int, default=2, help="keep every K-th slice of each group (default 2)")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="raise K from --every until the file is at most this many bytes")
    a = p.parse_args(argv)
    if a.every < 1:
        p.error("--every must be >= 1")
    with np.load(a.npz) as z:
        arrays = {k: z[k] for k in z.files}
    group = arrays["group"]
    groups = [np.flatnonzero(group == g) for g in np.unique(group)]
    longest = max(len(g) for g in groups)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".npz")
    os.close(fd)
    try:
        for every in range(a.every, max(a.every, longest) + 1):
            keep = np.sort(np.concatenate([g[::every] for g in groups]))
            np.savez_compressed(tmp, **{k: v[keep] for k, v in arrays.items()})
            size = os.path.getsize(tmp)
            if a.max_bytes is None or size <= a.max_bytes:
                break
        else:  # one slice per volume is still too large
            print(f"error: even one slice of each volume ({size / 2**20:.1f} MiB) is over --max-bytes "
                  f"({a.max_bytes / 2**20:.1f} MiB)", file=sys.stderr)
            return 2
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"{out}: K = {every} (every K-th slice of each volume), {len(keep)} of {len(group)} slices, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
