"""Write the replay and reference slices shipped beside the bundled model
(``DRSegUNetLib/models/drsegunet_level1.adapt.npz``; see DRSegUNetLib/adaptation.py).

- reference (the fine-tuning gate; never trained on by a fine-tune): the bundled model's
  validation slices -- MedSeg ids 10, 23, 25, 43, 45, 56 and 8 evenly spaced slices of
  COVID-19-CT-Seg group 5;
- replay (mixed into every fine-tune so the model keeps what it knew): 6 MedSeg training
  slices and 2 evenly spaced slices of each COVID-19-CT-Seg training group (0, 1, 2, 4, 7, 8).

    .venv/bin/python scripts/make_adaptation_data.py ../shared/data
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DRSegUNetLib import default_model_path  # noqa: E402
from DRSegUNetLib.adaptation import REFERENCE, REPLAY, adaptation_data_path, write_adaptation_data  # noqa: E402
from DRSegUNetLib.data import _read_gray, medseg_allowed, read_npz, zenodo_allowed  # noqa: E402

MEDSEG_REFERENCE = ("10", "23", "25", "43", "45", "56")
MEDSEG_REPLAY = ("3", "12", "16", "19", "33", "51")
ZENODO_REFERENCE_GROUPS = {5: 8}
ZENODO_REPLAY_GROUPS = {0: 2, 1: 2, 2: 2, 4: 2, 7: 2, 8: 2}
ZENODO_MM = 1.5  # 512-pixel volumes halved to 256 (shared/data/README.md)


def evenly(n: int, k: int) -> list[int]:
    return [int(round((i + 0.5) * n / k - 0.5)) for i in range(k)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared_data", type=Path)
    ap.add_argument("--out", type=Path, default=adaptation_data_path(default_model_path()))
    args = ap.parse_args()
    slices = []
    med = args.shared_data / "medseg" / "train50"
    for role, ids in ((REFERENCE, MEDSEG_REFERENCE), (REPLAY, MEDSEG_REPLAY)):
        for i in ids:
            img, mask = _read_gray(med / "images" / f"{i}.jpg"), _read_gray(med / "masks" / f"{i}.png", indexed=True)
            slices.append({"ct_uint8": img.T, "allowed": medseg_allowed(mask.T), "name": f"medseg{i}",
                           "group": "medseg", "role": role, "spacing": None})
    d = read_npz(args.shared_data / "zenodo20" / "zenodo20_dev.npz")
    for role, groups in ((REFERENCE, ZENODO_REFERENCE_GROUPS), (REPLAY, ZENODO_REPLAY_GROUPS)):
        for g, k in groups.items():
            idx = np.flatnonzero(d["group"] == g)
            for j in (idx[i] for i in evenly(len(idx), k)):
                slices.append({"ct_uint8": d["ct_uint8"][j], "allowed": zenodo_allowed(d["lung_mask"][j], d["infection_mask"][j]),
                               "name": f"z{int(d['source_index'][j])}", "group": f"zenodo{g}", "role": role,
                               "spacing": (ZENODO_MM, ZENODO_MM)})
    write_adaptation_data(args.out, slices)
    print(f"wrote {len(slices)} slices to {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
