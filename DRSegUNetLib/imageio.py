"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM file or series) and writing outputs atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import SimpleITK as sitk

from .errors import InputError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder} is a folder with no DICOM series")
    if len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} DICOM series; point to one series' folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    return reader.Execute()


def read_ct(path: str | os.PathLike) -> sitk.Image:
    """Read a CT volume; a single 2D DICOM slice becomes a one-slice 3D volume.

    Raises InputError with one line for anything that is not a readable 3D scalar
    image with CT geometry. Values are checked for HU by inference, not here.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        if path.suffix.lower() in PICTURE_SUFFIXES:
            raise InputError(f"{path.name} is a 2D picture with no CT geometry (spacing, position, "
                             "orientation); give a CT volume (NIfTI, NRRD, MHA or DICOM)")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InputError(f"{path} is not an image SimpleITK can read (NIfTI, NRRD, MHA or DICOM)") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} has {image.GetNumberOfComponentsPerPixel()} components per pixel "
                         "(RGB or vector image); a CT has one")
    if image.GetDimension() == 2:
        if path.suffix.lower() != ".dcm" and not _is_dicom(path):
            raise InputError(f"{path.name} is a 2D image with no slice geometry; give a 3D CT volume")
        image = sitk.JoinSeries(image)
    if image.GetDimension() == 4:
        raise InputError(f"{path.name} is 4D (size {image.GetSize()}); give a single 3D CT volume")
    if image.GetDimension() != 3:
        raise InputError(f"{path.name} is {image.GetDimension()}D; give a 3D CT volume")
    if 0 in image.GetSize():
        raise InputError(f"{path.name} is empty (size {image.GetSize()})")
    return image


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def atomic_output(path: str | os.PathLike) -> tuple[Path, Path]:
    """A temporary path beside ``path`` with the same suffixes (for writers that infer the format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    from .atomic import default_file_mode

    os.chmod(tmp, default_file_mode())
    return Path(tmp), path


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write with SimpleITK to a temporary file, then rename over ``path``."""
    tmp, path = atomic_output(path)
    try:
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
