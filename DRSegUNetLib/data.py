"""Readers for the annotated slice sets, with partial labels as "allowed class" sets.

Every reader yields :class:`Sample`: an image in HU (or approximate HU) and, per
pixel, a bitmask of the classes the annotation allows there (bit c set = class c
possible). This lets datasets that leave different classes undecided train one
model (marginal loss) and be scored only on what they decide:

- MedSeg (GGO / consolidation, no lung): 0 → {background, lung}, 1 → {GGO},
  2 → {consolidation}.
- COVID-19-CT-Seg (lung / infection): infection → {GGO, consolidation},
  lung and not infection → {lung}, elsewhere → {background}.
- A label map in our vocabulary (e.g. accepted corrections): value c → {c}.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .config import MEDSEG_PIXEL_MM, ZENODO_PIXEL_MM, EightBitConfig
from .errors import InputError
from .preprocessing import check_ct_hu, eight_bit_to_hu, working_size
from .vocabulary import (BACKGROUND, BACKGROUND_NAME, CHECKABLE, CLASS_NAMES, CONSOLIDATION, GGO, INFECTION_NAME, LUNG,
                         LUNG_NAME, NUM_CLASSES, REGIONS, check_class_names)

ALL_CLASSES = np.uint8((1 << NUM_CLASSES) - 1)


def bit(*classes: int) -> np.uint8:
    return np.uint8(sum(1 << c for c in classes))


@dataclass
class Sample:
    """One annotated axial slice. ``hu`` (H, W) float32; ``allowed`` (H, W) uint8 bitmask;
    ``eight_bit``: an 8-bit image mapped to approximate HU (MedSeg, COVID-19-CT-Seg), not CT
    in HU (inference.restrict_to_body treats the two differently). ``pixel_mm``: the slice's
    (square) pixel size in mm as its data set gives it (:func:`dataset_pixel_mm`); None: not
    known, the slice is scored on its own grid."""

    hu: np.ndarray
    allowed: np.ndarray
    name: str
    group: str
    eight_bit: bool = False
    pixel_mm: Optional[float] = None

    @property
    def source(self) -> str:
        """The data set: "medseg", "zenodo", "corrections", ... (the group without its case number)."""
        return self.group.rstrip("0123456789")

    def region_truth(self, region: str) -> np.ndarray | None:
        """Binary truth of a region (see vocabulary.REGIONS), or None if undecided somewhere."""
        rbits = bit(*REGIONS[region])
        inside = (self.allowed & ~rbits) == 0
        outside = (self.allowed & rbits) == 0
        if not np.all(inside | outside):
            return None
        return inside


def resample_sample(sample: Sample, spacing: Sequence[float], pixel_mm: Optional[float]) -> Sample:
    """``sample`` (pixel ``spacing`` (row, col) mm) on the working grid of ``pixel_mm``
    pixels that inference uses for CT with a geometry (``InferenceConfig.pixel_mm``): HU
    bilinear, allowed classes nearest. Unchanged where ``preprocessing.working_size`` keeps
    the grid, so fine-tuning sees corrections at the scale the model segments them."""
    import torch
    from scipy import ndimage

    from .resample import resample_bilinear

    size = working_size(sample.hu.shape, spacing, pixel_mm)
    if size is None:
        return sample
    # HU exactly as Predictor.probabilities resamples them, so the network trains on the
    # texture it is later shown.
    hu = resample_bilinear(torch.from_numpy(np.ascontiguousarray(sample.hu, np.float32))[None, None], size)[0, 0]
    zoom = [m / n for m, n in zip(size, sample.hu.shape)]
    allowed = ndimage.zoom(sample.allowed, zoom, order=0, grid_mode=True, mode="nearest")
    return Sample(hu.numpy().astype(np.float32), allowed.astype(np.uint8), sample.name, sample.group, sample.eight_bit,
                  pixel_mm)


def labels_to_allowed(labels: np.ndarray, known: Optional[Sequence[str]] = None) -> np.ndarray:
    """Exclusive label map in our vocabulary → allowed bitmask.

    ``known``: the segments that were checked, when only some were (None: every label is
    right). Names as in ``vocabulary.CLASS_NAMES``, meaning the *segments* a user sees:
    "lung" is the whole lung field (labels 1-3, the Lung segment), "ggo" and
    "consolidation" the lesions; "background" says the same as "lung" (everything
    outside the lung field is right). Each checked segment constrains every pixel: the
    lung field puts labels 1-3 in {GGO, consolidation, lung} and label 0 in {background};
    a lesion class c puts label c in {c} and every other pixel in "not c"; "infection"
    (the lesion outline, not its type) puts labels 1-2 in {GGO, consolidation} and every
    other pixel in "neither". The allowed set is the intersection, so an unchecked
    distinction stays open for the marginal loss. All three segments checked is the same as None.
    """
    lab = labels.astype(np.uint8)
    if known is None:
        return (np.uint8(1) << lab).astype(np.uint8)
    check_class_names(known, CHECKABLE)
    every = bit(*range(NUM_CLASSES))
    allowed = np.full(lab.shape, every, dtype=np.uint8)
    for name in set(known):
        if name in (LUNG_NAME, BACKGROUND_NAME):
            allowed &= np.where(lab != BACKGROUND, bit(GGO, CONSOLIDATION, LUNG), bit(BACKGROUND)).astype(np.uint8)
        elif name == INFECTION_NAME:
            lesion = (lab == GGO) | (lab == CONSOLIDATION)
            allowed &= np.where(lesion, bit(GGO, CONSOLIDATION), np.uint8(every & ~bit(GGO, CONSOLIDATION))).astype(np.uint8)
        else:
            c = CLASS_NAMES.index(name)
            allowed &= np.where(lab == c, bit(c), np.uint8(every & ~bit(c))).astype(np.uint8)
    return allowed


def medseg_allowed(mask: np.ndarray) -> np.ndarray:
    table = np.array([bit(BACKGROUND, LUNG), bit(GGO), bit(CONSOLIDATION)], dtype=np.uint8)
    if mask.max() > 2:
        raise InputError(f"MedSeg mask has value {mask.max()}; expected 0, 1, 2")
    return table[mask]


def zenodo_allowed(lung: np.ndarray, infection: np.ndarray) -> np.ndarray:
    out = np.full(lung.shape, bit(BACKGROUND), dtype=np.uint8)
    out[lung > 0] = bit(LUNG)
    out[infection > 0] = bit(GGO, CONSOLIDATION)
    return out


def _read_gray(path: Path, indexed: bool = False) -> np.ndarray:
    """8-bit grey image; ``indexed`` keeps palette indices (label PNGs) instead of colours."""
    from PIL import Image

    with Image.open(path) as im:
        if indexed and im.mode in ("P", "L", "I;16", "I"):
            return np.asarray(im).astype(np.uint8)
        return np.asarray(im.convert("L"))


# --------------------------------------------------------------------------- pixel sizes


def sidecar_path(path: str | Path) -> Path:
    """The JSON beside a data set that may give its pixel size: ``zenodo20_dev.npz`` →
    ``zenodo20_dev.json``, the folder ``train50`` → ``train50.json``."""
    p = Path(path)
    return p.parent / (p.name + ".json") if p.is_dir() else p.with_suffix(".json")


def _pixel_value(value, where: str) -> Optional[float]:
    """A pixel size in mm read from ``where``: 0 (the own grid) → None; InputError unless it is
    0 or within config.PIXEL_MM_RANGE."""
    from .config import check_pixel_mm

    try:
        mm = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: pixel_mm must be a number of mm, not {value!r}") from None
    check_pixel_mm(mm, f"{where}: pixel_mm")
    return mm or None


def dataset_pixel_mm(path: str | Path, n: int, arrays: Optional[dict[str, np.ndarray]] = None,
                     default: Optional[float] = None) -> list[Optional[float]]:
    """Each of a data set's ``n`` slices' pixel size in mm (None: its own grid, size unknown).

    In this order: a ``pixel_mm`` array of the ``.npz`` (``arrays``; a scalar, or one value
    per slice), else ``{"pixel_mm": MM}`` in the sidecar JSON beside the data
    (:func:`sidecar_path`), else ``default``, the format's (ZENODO_PIXEL_MM, MEDSEG_PIXEL_MM).
    0 means the slices' own grid.
    """
    import json

    if arrays is not None and "pixel_mm" in arrays:
        values = np.asarray(arrays["pixel_mm"], dtype=float).ravel()
        if values.size not in (1, n):
            raise InputError(f"{path}: 'pixel_mm' has {values.size} values for {n} slices; give one or {n}")
        return [_pixel_value(v, str(path)) for v in np.broadcast_to(values, (n,))]
    side = sidecar_path(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {side}, the pixel size of {Path(path).name} ({e})") from None
        if isinstance(meta, dict) and "pixel_mm" in meta:
            return [_pixel_value(meta["pixel_mm"], str(side))] * n
    return [default] * n


def read_medseg_folder(folder: str | Path, eight_bit: EightBitConfig = EightBitConfig(),
                       names: Iterable[str] | None = None) -> list[Sample]:
    """Read ``images/<id>.jpg`` + ``masks/<id>.png``; images are 8-bit, mapped to approx. HU.

    The slices are stored transposed relative to radiological convention; they are
    transposed back so that they look like axial slices of a CT volume. Their pixel size:
    ``train50.json`` beside the folder ``train50`` if it gives one, else none (own grid).
    """
    folder = Path(folder)
    img_dir, mask_dir = folder / "images", folder / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise InputError(f"{folder} is not a MedSeg-style folder (needs images/ and masks/)")
    wanted = set(names) if names is not None else None
    samples = []
    for img_path in sorted(img_dir.iterdir(), key=lambda p: (len(p.stem), p.stem)):
        if img_path.suffix.lower() not in (".jpg", ".jpeg", ".png") or (wanted is not None and img_path.stem not in wanted):
            continue
        mask_path = mask_dir / f"{img_path.stem}.png"
        if not mask_path.is_file():
            raise InputError(f"no mask {mask_path} for image {img_path}")
        img, mask = _read_gray(img_path), _read_gray(mask_path, indexed=True)
        if img.shape != mask.shape:
            raise InputError(f"{img_path.name}: image {img.shape} and mask {mask.shape} differ in size")
        samples.append(Sample(eight_bit_to_hu(img.T, eight_bit), medseg_allowed(mask.T), img_path.stem, "medseg", True))
    if not samples:
        raise InputError(f"no images found in {img_dir}")
    for s, mm in zip(samples, dataset_pixel_mm(folder, len(samples), default=MEDSEG_PIXEL_MM)):
        s.pixel_mm = mm
    return samples


def read_npz(path: str | Path, what: str = ".npz", only: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, read now: every one, or those of ``only`` that it has
    (the others are never decompressed). InputError with one line for a file that is
    missing, empty, truncated or not an .npz (``what`` names it in the message)."""
    import zipfile
    import zlib

    def unreadable(e: BaseException) -> InputError:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return InputError(f"cannot read {path} as {what} ({why}); give a complete .npz file")

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise unreadable(e) from None
    if head and head not in (b"PK\x03\x04", b"PK\x05\x06"):  # not a zip: numpy would talk of pickles
        raise InputError(f"{path} is not an .npz file (it is not a zip archive); give the {what}")
    try:
        with np.load(path, allow_pickle=False) as d:
            return {k: d[k] for k in d.files if only is None or k in only}
    except (OSError, EOFError, ValueError, KeyError, AttributeError, zipfile.BadZipFile, zlib.error) as e:
        raise unreadable(e) from None


def check_slices_npz(path: str | Path, d: dict[str, np.ndarray], masks: Sequence[str] = (),
                     image: str = "ct_uint8") -> np.ndarray:
    """``d[image]`` after checking it is (N, H, W) -- uint8 for ``ct_uint8`` (8-bit slices), integer
    or floating HU for ``ct_hu`` --, that every array named in ``masks`` is shaped like it and that
    ``group``/``source_index`` (if any) have N entries."""
    eight = image == "ct_uint8"
    if image not in d:
        raise InputError(f"{path} has no '{image}' array (N, H, W) {'uint8 of 8-bit slices' if eight else 'of slices in HU'}; "
                         f"it has {sorted(d)}")
    ct = d[image]
    numeric = np.issubdtype(ct.dtype, np.integer) or np.issubdtype(ct.dtype, np.floating)
    if not (ct.dtype == np.uint8 if eight else numeric) or ct.ndim != 3 or 0 in ct.shape:
        raise InputError(f"{path}: '{image}' must be a non-empty (N, H, W) {'uint8' if eight else 'integer or floating'} "
                         f"array, not {ct.dtype} {ct.shape}")
    if not eight:
        check_ct_hu(ct, f"{path}: '{image}'")
    for name in masks:
        if d[name].shape != ct.shape:
            raise InputError(f"{path}: '{name}' is {d[name].shape}, but '{image}' is {ct.shape}; they must match")
    for name in ("group", "source_index"):
        if name in d and d[name].shape != (len(ct),):
            raise InputError(f"{path}: '{name}' has shape {d[name].shape} for {len(ct)} slices; need ({len(ct)},)")
    return ct


def read_zenodo_npz(path: str | Path, eight_bit: EightBitConfig = EightBitConfig(),
                    groups: Sequence[int] | None = None) -> list[Sample]:
    """Read a COVID-19-CT-Seg-style ``.npz``: slices (``ct_uint8``, 8-bit, mapped to approximate HU
    with ``eight_bit``; or ``ct_hu``, CT in HU), lung_mask, infection_mask, group; optional
    source_index, pixel_mm and ``source`` (a lower-case name, default "zenodo": the slices' data
    set, which ``train --source-weights`` names; their groups are SOURCE + group number). The
    slices' pixel size: :func:`dataset_pixel_mm`, by default ZENODO_PIXEL_MM (1.5 mm)."""
    d = read_npz(path)
    image = "ct_hu" if "ct_hu" in d else "ct_uint8"
    missing = {image, "lung_mask", "infection_mask"} - set(d)
    if missing:
        raise InputError(f"{path} lacks arrays {sorted(missing)}")
    source = str(d["source"]) if "source" in d else "zenodo"
    if not (source.isascii() and source.isalpha() and source.islower()) or source in ("medseg", "corrections"):
        raise InputError(f"{path}: 'source' must be a lower-case name of letters other than medseg and "
                         f"corrections, not {source!r}")
    ct = check_slices_npz(path, d, masks=("lung_mask", "infection_mask"), image=image)
    grp = d["group"] if "group" in d else np.zeros(len(ct), dtype=int)
    src = d["source_index"] if "source_index" in d else np.arange(len(grp))
    keep = np.arange(len(grp)) if groups is None else np.flatnonzero(np.isin(grp, list(groups)))
    lung, inf = d["lung_mask"], d["infection_mask"]
    mm = dataset_pixel_mm(path, len(ct), d, default=ZENODO_PIXEL_MM)
    prefix = "z" if source == "zenodo" else source
    hu = (lambda i: eight_bit_to_hu(ct[i], eight_bit)) if image == "ct_uint8" else (lambda i: ct[i].astype(np.float32))
    return [
        Sample(hu(i), zenodo_allowed(lung[i], inf[i]), f"{prefix}{int(src[i])}", f"{source}{int(grp[i])}",
               image == "ct_uint8", mm[i])
        for i in keep
    ]


def read_dataset(path: str | Path, eight_bit: EightBitConfig = EightBitConfig()) -> list[Sample]:
    """A MedSeg-style folder or a COVID-19-CT-Seg-style ``.npz`` (8-bit or HU slices), each slice with its data set's
    pixel size (``Sample.pixel_mm``, :func:`dataset_pixel_mm`)."""
    path = Path(path)
    if path.is_dir():
        return read_medseg_folder(path, eight_bit)
    if path.suffix == ".npz":
        return read_zenodo_npz(path, eight_bit)
    raise InputError(f"{path}: expected a folder with images/ and masks/, or an .npz file")


def fingerprint(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 of each data file (folders: of their sorted files' hashes)."""
    out = {}
    for p in map(Path, paths):
        h = hashlib.sha256()
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        out[str(p)] = h.hexdigest()
    return out


def load_split(path: str | Path) -> dict:
    """A split file: JSON with optional ``val``/``test`` parts (see apply_split); InputError if unreadable."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            split = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read split file {path} ({e.strerror or e})") from None
    except ValueError as e:
        raise InputError(f"split file {path} is not valid JSON ({e}); fix it or give another --split") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k, {}), dict) for k in ("val", "test")):
        raise InputError(f"split file {path} must be a JSON object with 'val' and 'test' objects")
    return split


def _in_part(s: Sample, part: dict) -> bool:
    if s.group == "medseg":
        return s.name in set(part.get("medseg", ()))
    if s.group.startswith("zenodo"):
        return int(s.group[len("zenodo"):]) in set(part.get("zenodo_groups", ()))
    return s.name in set(part.get("names", ()))


def apply_split(samples: Sequence[Sample], split: dict) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, val, test) by a split file's ``val``/``test`` parts; the rest trains."""
    val = [s for s in samples if _in_part(s, split.get("val", {}))]
    test = [s for s in samples if _in_part(s, split.get("test", {}))]
    held = {id(s) for s in val + test}
    return [s for s in samples if id(s) not in held], val, test
