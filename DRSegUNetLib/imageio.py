"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM file or series) and writing outputs atomically."""
from __future__ import annotations

import gzip
import logging
import math
import os
import re
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
# Formats a label map is written in: one file each, 3D (.hdr/.mhd/.nhdr would leave a
# second data file beside it; pictures hold one slice).
VOLUME_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


# Metadata key of images read by read_ct: the file's name, for later messages (inference.validate_ct_image).
SOURCE_KEY = "DRSegUNetLib.source"


def check_volume_output(path: str | os.PathLike, npz: bool = False) -> Path:
    """``path`` as a Path if it names a label-map file to write; InputError otherwise.

    Args:
        npz: also accept ``.npz`` (label maps of 8-bit slices, labelmaps.save_label_maps).
    """
    path = Path(path)
    suffixes = VOLUME_OUTPUT_SUFFIXES + ((".npz",) if npz else ())
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name ending in {', '.join(suffixes)}")
    if not path.name.lower().endswith(suffixes):
        raise InputError(f"output {path.name} is not a single-file 3D format; end its name in {', '.join(suffixes)}")
    return path


def _one_line(text: str) -> str:
    """An ITK message on one line, without its C++ source file and line or object address."""
    lines = [ln for ln in str(text).splitlines() if ln.strip() and not re.match(r"^\s*\w+: In .*, line \d+\s*$", ln)]
    return re.sub(r"\s*\(0x[0-9a-fA-F]+\)", "", " ".join(" ".join(lines).split()))


def _itk_error(error: Exception) -> str:
    """The reason in a SimpleITK exception's text, without the C++ source paths before it."""
    text = _one_line(str(error))
    for mark in ("sitk::ERROR:", "Description:", "ERROR:"):
        if mark in text:
            text = text.rsplit(mark, 1)[1]
            break
    return text.strip()[:300]


if hasattr(sitk, "LoggerBase"):  # SimpleITK >= 2.3: ITK's output window can be replaced from Python
    class _ITKCollector(sitk.LoggerBase):
        """Takes what ITK would print on stderr (warnings with C++ source paths) as one-line messages."""

        def __init__(self, messages: list[str]) -> None:
            super().__init__()
            self.messages = messages

        def DisplayText(self, text: str) -> None:
            self.messages.append(_one_line(text))

        def DisplayErrorText(self, text: str) -> None:
            self.messages.append(_one_line(text))

        def DisplayWarningText(self, text: str) -> None:
            self.messages.append(_one_line(text))

        def DisplayGenericOutputText(self, text: str) -> None:
            self.messages.append(_one_line(text))

        def DisplayDebugText(self, text: str) -> None:
            log.debug("ITK: %s", _one_line(text))


@contextmanager
def itk_messages() -> Iterator[list[str]]:
    """``with itk_messages() as messages:`` the block's ITK warnings go into ``messages`` (one line
    each, no C++ paths) instead of stderr; the caller turns the ones that matter into its own
    messages (read_ct, write_image). The previous ITK output window is restored after the block.
    With a SimpleITK without ``LoggerBase``, warnings are switched off for the block instead."""
    messages: list[str] = []
    if hasattr(sitk, "LoggerBase"):
        collector = _ITKCollector(messages)
        previous = collector.SetAsGlobalITKLogger()
        try:
            yield messages
        finally:
            previous.SetAsGlobalITKLogger()
    else:
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        try:
            yield messages
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _log_itk_messages(messages: Sequence[str], name: str, image: Optional[sitk.Image] = None) -> None:
    """ITK's messages about reading or writing ``name`` as our own log lines (one line, the file named)."""
    for m in dict.fromkeys(messages):  # each once (ITK repeats some, e.g. once per header read)
        if "Non uniform sampling or missing slices" in m:
            # The slice positions are checked by _check_slice_positions, which refuses real gaps;
            # what is left is rounding in the headers (0.00066 mm for CIP's series).
            log.debug("%s: %s (within tolerance)", name, m)
        elif "unexpected scales in sform" in m:
            spacing = " x ".join(f"{v:g}" for v in image.GetSpacing()) if image is not None else "its pixdim"
            log.warning("%s: its NIfTI header gives two voxel sizes (pixdim and sform disagree); %s mm (pixdim) "
                        "is used: check it against the scanner's before trusting volumes", name, spacing)
        elif "Non-orthogonal direction matrix coerced" in m:
            log.warning("%s: its direction matrix is not orthogonal and was made orthogonal; the file may not "
                        "overlay the CT exactly", name)
        else:
            log.warning("%s: %s", name, m)


# Slice positions of a DICOM series: a step between neighbours more than this fraction off the
# series' median step is a gap (missing slices) or an overlap, which stacking on one uniform
# spacing would get wrong. Rounding of positions in headers is far smaller (CIP: 0.00066 mm of 3.99).
SLICE_STEP_TOLERANCE = 0.1


def _floats(text: str) -> Optional[np.ndarray]:
    try:
        return np.array([float(v) for v in str(text).strip().split("\\")], dtype=float)
    except ValueError:
        return None


def _check_slice_positions(folder: Path, files: Sequence[str], positions: Sequence[Optional[str]],
                           orientations: Sequence[Optional[str]]) -> None:
    """InputError when the slices of a DICOM series (in the reader's order) do not lie on one
    uniform spacing along their normal: missing slices, duplicates, uneven steps, or slices of
    several orientations. Slices without ImagePositionPatient/ImageOrientationPatient are not checked."""
    names = [Path(f).name for f in files]
    pos = [_floats(p) if p else None for p in positions]
    iop = [_floats(o) if o else None for o in orientations]
    if len(files) < 3 or any(p is None or len(p) != 3 for p in pos) or iop[0] is None or len(iop[0]) != 6:
        return
    for k, o in enumerate(iop):
        if o is None or len(o) != 6 or np.abs(o - iop[0]).max() > 1e-3:
            raise InputError(f"{folder.name} mixes DICOM slices of different orientations ({names[0]}, {names[k]}); "
                             "point to a folder that holds one series")
    normal = np.cross(iop[0][:3], iop[0][3:])
    z = np.array([float(p @ normal) for p in pos])
    steps = np.diff(z)
    direction = np.sign(np.median(steps)) or 1.0
    signed = steps * direction
    step = float(np.median(np.abs(steps)))
    if step < 1e-3:
        raise InputError(f"{folder.name}: its {len(files)} DICOM slices are all at one position ({z[0]:.2f} mm): "
                         "not a stack of axial slices (several time points or copies?); point to a single CT series")
    tol = SLICE_STEP_TOLERANCE * step
    gaps = np.flatnonzero(signed >= 1.5 * step)  # room for at least one slice
    if gaps.size:
        k = int(gaps[0])
        missing = int(round(signed[k] / step)) - 1
        more = f", and {gaps.size - 1} more gap(s)" if gaps.size > 1 else ""
        raise InputError(f"{folder.name}: slices are missing from its DICOM series: {names[k]} and {names[k + 1]} are "
                         f"{signed[k]:.4g} mm apart where the others are {step:.4g} mm (about {missing} slice(s) "
                         f"missing{more}); volumes would be wrong: copy the complete series")
    off = np.flatnonzero(np.abs(signed - step) > tol)
    if off.size:
        k = int(off[0])
        if signed[k] <= -tol:
            raise InputError(f"{folder.name}: its DICOM slices are not in order of position ({names[k]} lies before "
                             f"{names[k + 1]}); point to a folder that holds one series")
        if signed[k] < tol:
            raise InputError(f"{folder.name}: {names[k]} and {names[k + 1]} are at the same slice position "
                             f"({z[k]:.2f} mm): duplicate slices or two series in one folder; keep one copy of each slice")
        raise InputError(f"{folder.name}: its DICOM slices are unevenly spaced ({names[k]} and {names[k + 1]} are "
                         f"{signed[k]:.4g} mm apart, the others {step:.4g} mm); they cannot be stacked on one spacing "
                         "and volumes would be wrong: export the series with even spacing")


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder} is a folder with no DICOM series")
    if len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} DICOM series; point to one series' folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's header, for its position
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{folder.name}: SimpleITK cannot read its DICOM series ({_itk_error(e)})") from None

    def tag(k: int, key: str) -> Optional[str]:
        return reader.GetMetaData(k, key) if reader.HasMetaDataKey(k, key) else None

    _check_dicom_pixel_spacing(folder.name, lambda key: reader.HasMetaDataKey(0, key), image.GetSpacing())
    _check_slice_positions(folder, files, [tag(k, "0020|0032") for k in range(len(files))],
                           [tag(k, "0020|0037") for k in range(len(files))])
    return _one_slice_spacing(image, tag(0, SPACING_BETWEEN_SLICES)) if len(files) == 1 else image


def read_ct(path: str | os.PathLike) -> sitk.Image:
    """Read a CT volume; a single 2D DICOM slice becomes a one-slice 3D volume.

    Raises InputError with one line for anything that is not a readable 3D scalar
    image with CT geometry: a truncated NIfTI file, NaN or infinite voxels (read from the
    file itself: the NIfTI reader turns them into 0), a NIfTI without voxel size, a DICOM
    series with missing or unevenly spaced slices, a sheared grid or an implausible
    spacing (preprocessing.check_ct_geometry). ITK's own warnings go to logging as one
    line each, not to stderr. Values are checked for HU, and axial slices for their size,
    by inference.validate_ct_image, not here; the image carries the file's name in its
    metadata (SOURCE_KEY) so that those messages name the file too.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    with itk_messages() as messages:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            if path.suffix.lower() in PICTURE_SUFFIXES:
                raise InputError(f"{path.name} is a 2D picture with no CT geometry (spacing, position, "
                                 "orientation); give a CT volume (NIfTI, NRRD, MHA or DICOM)")
            _check_nifti_complete(path)
            _check_voxel_size_given(path)
            try:
                image = sitk.ReadImage(str(path))
            except RuntimeError:
                raise InputError(f"{path} is not an image SimpleITK can read (NIfTI, NRRD, MHA or DICOM)") from None
    _log_itk_messages(messages, path.name, image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per pixel "
                         "(RGB or vector image); a CT has one")
    between = None
    if not path.is_dir() and (path.suffix.lower() == ".dcm" or _is_dicom(path)):
        _check_dicom_pixel_spacing(path.name, image.HasMetaDataKey, image.GetSpacing())
        if image.HasMetaDataKey(SPACING_BETWEEN_SLICES):
            between = image.GetMetaData(SPACING_BETWEEN_SLICES)
    if image.GetDimension() == 2:
        if path.suffix.lower() != ".dcm" and not _is_dicom(path):
            raise InputError(f"{path.name} is a 2D image with no slice geometry; give a 3D CT volume")
        image = sitk.JoinSeries(image)
    image = _one_slice_spacing(image, between)
    if image.GetDimension() == 4:
        raise InputError(f"{path.name} is 4D (size {image.GetSize()}); give a single 3D CT volume")
    if image.GetDimension() != 3:
        raise InputError(f"{path.name} is {image.GetDimension()}D; give a 3D CT volume")
    if 0 in image.GetSize():
        raise InputError(f"{path.name} is empty (size {image.GetSize()})")
    _check_finite(path, image)
    from .preprocessing import check_ct_geometry

    check_ct_geometry(image.GetSize(), image.GetSpacing(), image.GetDirection(), path.name, slices=False)
    image.SetMetaData(SOURCE_KEY, path.name)
    return image


def _nonfinite_error(name: str, nan: int, inf: int, total: int, note: str = "") -> InputError:
    counts = " and ".join(c for c in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if c)
    every = " (every voxel)" if nan + inf == total else ""
    return InputError(f"{name} has {counts} voxel value(s){every}{note}: CT in Hounsfield units must be finite; "
                      "export the CT again, or fill them (e.g. with -1000, air) and save it")


def _count_nonfinite(values: np.ndarray) -> tuple[int, int]:
    """(NaN, infinite) counts of a float array, a block at a time."""
    flat = values.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.size, 1 << 22):
        block = flat[start:start + (1 << 22)]
        if np.isfinite(block).all():
            continue
        n = int(np.isnan(block).sum())
        nan, inf = nan + n, inf + int((~np.isfinite(block)).sum()) - n
    return nan, inf


def _check_finite(path: Path, image: sitk.Image) -> None:
    """InputError naming ``path`` when its voxels hold NaN or infinity: in the file itself for
    NIfTI (whose reader reads them as 0), in the image SimpleITK read for other formats."""
    raw = _nifti_nonfinite(path)
    if raw is not None:
        if sum(raw[:2]):
            raise _nonfinite_error(path.name, *raw, " (a NIfTI reader reads them as 0)")
        return
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    nan, inf = _count_nonfinite(sitk.GetArrayViewFromImage(image))
    if nan or inf:
        raise _nonfinite_error(path.name, nan, inf, int(np.prod(image.GetSize())))


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _nifti_header(header: bytes) -> Optional[dict]:
    """The fields of a NIfTI-1 or NIfTI-2 header (from its first bytes) that the checks need; None
    if it is not one: endian ('<' or '>'), dim (its used entries), datatype, vox_offset, nbytes (of
    the voxel data), pixdim (of the dims)."""
    for end in "<>":
        if len(header) >= 348 and struct.unpack(end + "i", header[:4])[0] == 348:
            dim = struct.unpack(end + "8h", header[40:56])
            datatype, bitpix = struct.unpack(end + "2h", header[70:74])
            pixdim = struct.unpack(end + "8f", header[76:108])
            offset = struct.unpack(end + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(end + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(end + "2h", header[12:16])
            dim = struct.unpack(end + "8q", header[16:80])
            pixdim = struct.unpack(end + "8d", header[104:168])
            offset = struct.unpack(end + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dim[0] <= 7 or bitpix <= 0 or any(n < 0 for n in dim[1:dim[0] + 1]):
        return None
    voxels = 1
    for n in dim[1:dim[0] + 1]:
        voxels *= n
    return {"endian": end, "dim": tuple(dim[1:dim[0] + 1]), "datatype": int(datatype), "vox_offset": int(offset),
            "nbytes": voxels * bitpix // 8, "pixdim": tuple(float(v) for v in pixdim[1:dim[0] + 1])}


def _nifti_sizes(header: bytes) -> tuple[int, int] | None:
    """(vox_offset, voxel data bytes) from the start of a NIfTI-1 or NIfTI-2 header; None if it is not one."""
    h = _nifti_header(header)
    return None if h is None else (h["vox_offset"], h["nbytes"])


def _open_nifti(path: Path):
    """The open (decompressed) NIfTI file, or None for other files."""
    name = path.name.lower()
    if name.endswith(".nii"):
        return open(path, "rb")
    if name.endswith(".nii.gz"):
        return gzip.open(path, "rb")
    return None


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def _nifti_nonfinite(path: Path) -> Optional[tuple[int, int, int]]:
    """(NaN, infinite, voxels) in a float .nii/.nii.gz file's voxel data, read from the file (ITK's
    NIfTI reader turns NaN and infinity into 0, so the image it returns cannot show them);
    (0, 0, voxels) for a NIfTI of integers; None for other files."""
    try:
        f = _open_nifti(path)
        if f is None:
            return None
        with f:
            h = _nifti_header(f.read(540))
            if h is None:
                return None
            voxels = int(np.prod(h["dim"]))
            if h["datatype"] not in _NIFTI_FLOATS:
                return 0, 0, voxels
            dtype = np.dtype(h["endian"] + _NIFTI_FLOATS[h["datatype"]])
            f.seek(h["vox_offset"])
            nan = inf = 0
            left, block = h["nbytes"], (1 << 22) * dtype.itemsize
            while left > 0:
                data = f.read(min(block, left))
                if not data:
                    break
                left -= len(data)
                n = len(data) // dtype.itemsize * dtype.itemsize
                a, b = _count_nonfinite(np.frombuffer(data[:n], dtype=dtype))
                nan, inf = nan + a, inf + b
            return nan, inf, voxels
    except (OSError, EOFError, zlib.error, ValueError):
        return None  # unreadable: the reader has said so, or read it


_NO_VOXEL_SIZE = ("{name} has no voxel size ({why}): readers take 1 mm instead, and volumes would be wrong; "
                  "set the voxel size (in mm) in its header, or export the CT again")


def _check_voxel_size_given(path: Path) -> None:
    """InputError when the header of a NIfTI, NRRD or MetaImage file gives no voxel size (NIfTI
    pixdim 0 or not finite; no NRRD 'space directions' or 'spacings'; no MetaImage
    'ElementSpacing' or 'ElementSize'): ITK reads 1 mm without a word, and volumes would be
    computed from that guess. Other files, and headers that cannot be parsed, pass (DICOM:
    _check_dicom_pixel_spacing)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            f = _open_nifti(path)
            with f:
                h = _nifti_header(f.read(540))
            if h is None or all(np.isfinite(v) and v != 0 for v in h["pixdim"][:3]):
                return
            why = f"its NIfTI pixdim is {' x '.join(f'{v:g}' for v in h['pixdim'][:3])}"
        elif name.endswith((".nrrd", ".nhdr")):
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            if not head.startswith(b"NRRD000"):
                return
            fields = re.split(rb"\r?\n\r?\n", head, maxsplit=1)[0].decode("latin-1").lower()
            if re.search(r"^(space directions|spacings)\s*:", fields, re.M):
                return
            why = "its NRRD header has neither 'space directions' nor 'spacings'"
        elif name.endswith((".mha", ".mhd")):
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            fields = head.split(b"ElementDataFile", 1)[0].decode("latin-1").lower()
            if "ndims" not in fields or re.search(r"^\s*(elementspacing|elementsize)\s*=", fields, re.M):
                return
            why = "its MetaImage header has no ElementSpacing"
        else:
            return
    except (OSError, EOFError, zlib.error):
        return  # unreadable: the reader says so
    raise InputError(_NO_VOXEL_SIZE.format(name=path.name, why=why))


SPACING_BETWEEN_SLICES = "0018|0088"


def _spacing_between_slices(text: Optional[str]) -> Optional[float]:
    """A DICOM Spacing Between Slices (0018,0088) value if positive and finite, else None."""
    try:
        value = float(str(text).strip().split("\\")[0]) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _one_slice_spacing(image: sitk.Image, between: Optional[str]) -> sitk.Image:
    """A one-slice DICOM volume with its Spacing Between Slices as z spacing, as SimpleITK 2.4+ reads it;
    2.3 and older (Slicer 5.6, 5.8) read 1 mm, which would change the volumes a report gives."""
    value = _spacing_between_slices(between)
    if value is not None and image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image.SetSpacing(tuple(image.GetSpacing()[:2]) + (value,))
    return image


def _check_dicom_pixel_spacing(name: str, has_key: Callable[[str], bool], spacing: Sequence[float]) -> None:
    """InputError when DICOM slices have no Pixel Spacing (0028,0030), Imager Pixel Spacing
    (0018,1164) or functional groups that hold one (multi-frame: 5200,9229 / 5200,9230), and GDCM
    read the 1 mm pixels it takes for none: a screen capture rather than a CT slice."""
    if any(has_key(k) for k in ("0028|0030", "0018|1164", "5200|9229", "5200|9230")):
        return
    if tuple(spacing[:2]) == (1.0, 1.0):
        raise InputError(_NO_VOXEL_SIZE.format(name=name, why="its DICOM header has no Pixel Spacing"))


def _check_nifti_complete(path: Path) -> None:
    """InputError if a .nii/.nii.gz file ends before the voxel data its header announces
    (SimpleITK reads such a file without error, the missing voxels as 0)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    truncated = InputError(f"{path.name} is truncated (shorter than its NIfTI header says); copy or export it again")
    try:
        if name.endswith(".nii"):
            with open(path, "rb") as f:
                sizes = _nifti_sizes(f.read(540))
            if sizes is not None and path.stat().st_size < sum(sizes):
                raise truncated
            return
        with gzip.open(path, "rb") as f:
            sizes = _nifti_sizes(f.read(540))
        if sizes is None:
            return
        with open(path, "rb") as f:  # gzip's trailer: the data's length mod 2**32
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == sum(sizes) % 2**32:
                return
        # Not the length announced (or several gzip members): read the stream to its end.
        n = 0
        with gzip.open(path, "rb") as f:
            while block := f.read(1 << 22):
                n += len(block)
        if n < sum(sizes):
            raise truncated
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise truncated from None
    except OSError:
        return  # unreadable: SimpleITK says so


def atomic_output(path: str | os.PathLike) -> tuple[Path, Path]:
    """A temporary path beside ``path`` with the same format suffix (for writers that infer the format).

    The temporary name has no other dots: NIfTI writers take a ".nii", ".img" or ".hdr"
    anywhere in the name for the extension and would write elsewhere.
    """
    from .atomic import default_file_mode, temp_beside

    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix or ".tmp"
    fd, tmp = temp_beside(path, f".{path.name.split('.')[0]}-", suffix)
    os.close(fd)

    os.chmod(tmp, default_file_mode())
    return Path(tmp), path


@contextmanager
def output_set() -> Iterator[Callable[[str | os.PathLike], Path]]:
    """Several outputs written all-or-nothing: ``with output_set() as stage: write(x, stage(path))``.

    ``stage(path)`` gives a temporary name beside ``path`` (same format suffix) to write to.
    When the block ends normally, every staged file is renamed over its path, in the order
    staged; when it raises, the temporary files are removed and no path is touched.
    """
    from .atomic import fsync_dir

    staged: list[tuple[Path, Path]] = []

    def stage(path: str | os.PathLike) -> Path:
        tmp, final = atomic_output(path)
        staged.append((tmp, final))
        return tmp

    try:
        yield stage
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for folder in {final.parent for _, final in staged}:
        fsync_dir(folder)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write with SimpleITK to a temporary file, then rename over ``path`` (a name check_volume_output accepts)."""
    tmp, path = atomic_output(check_volume_output(path))
    try:
        with itk_messages() as messages:
            sitk.WriteImage(image, str(tmp), compress)
        _log_itk_messages(messages, path.name, image)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mask_on_grid(mask: sitk.Image, image: sitk.Image, what: str = "mask"):
    """``mask`` as a (z, y, x) array on ``image``'s voxel array.

    The two may store the same voxel grid differently (another axis order or flipped axes,
    e.g. a DICOM series and a NIfTI written by another tool): the mask is then brought onto
    the image's array by where its voxels lie, not by their order in the file. A mask whose
    voxels are not the image's voxels (another size, spacing or position) is refused.
    """
    import numpy as np

    if mask.GetDimension() != image.GetDimension():
        raise InputError(f"{what} is {mask.GetDimension()}D; the CT is {image.GetDimension()}D")
    dim = image.GetDimension()
    tol = 1e-3 * min(image.GetSpacing())  # mm: far below a voxel, above rounding in file headers

    def corners(img: sitk.Image) -> np.ndarray:  # physical points of the first and last voxel along each axis
        ids = np.array(np.meshgrid(*[[0, n - 1] for n in img.GetSize()], indexing="ij")).reshape(dim, -1).T
        return np.array([img.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in ids])

    di = np.asarray(image.GetDirection()).reshape(dim, dim)
    dm = np.asarray(mask.GetDirection()).reshape(dim, dim)
    pairing = dm.T @ di  # [a, b]: cosine between the mask's index axis a and the image's index axis b
    axis_of = np.abs(pairing).argmax(axis=0)  # the mask's axis along each of the image's
    fits = (sorted(axis_of) == list(range(dim))
            and np.all(np.abs(pairing[axis_of, range(dim)]) > 1 - 1e-4)
            and all(mask.GetSize()[a] == image.GetSize()[b] for b, a in enumerate(axis_of))
            and all(abs(mask.GetSpacing()[a] - image.GetSpacing()[b]) * (image.GetSize()[b] - 1) < tol
                    for b, a in enumerate(axis_of)))
    if fits:  # same axes and voxel sizes: the voxel centres coincide if the image's corners are the mask's
        ours, theirs = corners(image), corners(mask)
        fits = bool(np.all(np.linalg.norm(ours[:, None] - theirs[None], axis=2).min(axis=1) < tol))
    if not fits:
        raise InputError(f"{what} does not lie on the CT's voxels (size {mask.GetSize()} vs {image.GetSize()}; "
                         f"or its spacing, origin or direction differ); give a mask made on this CT")
    if np.allclose(dm, di, atol=1e-4):
        return sitk.GetArrayFromImage(mask)  # stored as the image is
    onto = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
    return sitk.GetArrayFromImage(onto)
