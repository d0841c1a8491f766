"""Axial slices of an input, as self-training, ``lungs`` and ``pseudolabel`` read them.

An input is a CT volume in HU (any format ``imageio.read_ct`` reads), sliced axially in
radiological display orientation (``orientation.axial_view``), or an ``.npz`` of 8-bit
slices (``ct_uint8`` (N, H, W), like COVID-19-CT-Seg) mapped to approximate HU with
EightBitConfig. Slices are named and grouped (by case) as ``data.read_zenodo_npz`` names
them, so that scores line up.

Light at import (no numpy, no SimpleITK): the command line imports ``VOLUME_SUFFIXES`` and
``volume_name`` from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .config import EightBitConfig
from .errors import InputError

if TYPE_CHECKING:
    import numpy as np
    import SimpleITK as sitk

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


@dataclass
class SliceInput:
    """One input's axial slices in HU (or approximate HU for 8-bit slices).

    ``hu`` is (n, H, W) float32 in the axial display frame (``orientation.axial_view``);
    ``names``/``groups`` name each slice and the case it belongs to.
    """

    path: str
    hu: np.ndarray
    names: list[str]
    groups: list[str]
    eight_bit: bool
    spacing: Optional[tuple[float, float]] = None  # (row, col) mm; None: unknown
    image: Optional[sitk.Image] = None  # the CT volume (HU inputs), for 3D lung clean-up
    extra: bool = False

    def __len__(self) -> int:
        return int(self.hu.shape[0])


def read_slices(path: str | Path, eight_bit: EightBitConfig = EightBitConfig()) -> SliceInput:
    """Read a CT volume in HU, or an ``.npz`` with ``ct_uint8`` (N, H, W) 8-bit slices.

    The npz may also hold ``group`` (N,) (the case of each slice; default 0) and
    ``source_index`` (N,) (slice names). Raises InputError with one line otherwise.
    """
    import numpy as np

    from .data import check_slices_npz, read_npz
    from .imageio import read_ct
    from .inference import validate_ct_image
    from .orientation import axial_spacing, axial_view
    from .preprocessing import eight_bit_to_hu

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist")
    if p.suffix.lower() == ".npz":
        d = read_npz(p, only=("ct_uint8", "group", "source_index"))  # expert masks, if any, stay unread
        ct = check_slices_npz(p, d if "ct_uint8" in d else read_npz(p))  # the error names what the file has
        group = d["group"] if "group" in d else np.zeros(len(ct), dtype=int)
        src = d["source_index"] if "source_index" in d else np.arange(len(ct))
        hu = np.stack([eight_bit_to_hu(s, eight_bit) for s in ct]).astype(np.float32, copy=False)
        # Names and groups as data.read_zenodo_npz gives them, so that scores line up.
        return SliceInput(str(p), hu, [f"z{int(s)}" for s in src], [f"zenodo{int(g)}" for g in group], True)
    image = read_ct(p)
    array = validate_ct_image(image, p.name)
    view, _ = axial_view(array, image.GetDirection())
    name = volume_name(p)
    n = view.shape[0]
    return SliceInput(str(p), np.ascontiguousarray(view, dtype=np.float32), [f"{name}:{z}" for z in range(n)],
                      [name] * n, False, axial_spacing(image.GetSpacing(), image.GetDirection()), image)


def volume_name(p: Path) -> str:
    """The file name without its volume suffix (``ct.nii.gz`` → ``ct``)."""
    name = p.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
