"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM file or series) and writing outputs atomically."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import SimpleITK as sitk

from .errors import InputError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}
# Formats a label map is written in: one file each, 3D (.hdr/.mhd/.nhdr would leave a
# second data file beside it; pictures hold one slice).
VOLUME_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def check_volume_output(path: str | os.PathLike, npz: bool = False) -> Path:
    """``path`` as a Path if it names a label-map file to write; InputError otherwise.

    Args:
        npz: also accept ``.npz`` (label maps of 8-bit slices, selftrain.save_label_maps).
    """
    path = Path(path)
    suffixes = VOLUME_OUTPUT_SUFFIXES + ((".npz",) if npz else ())
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name ending in {', '.join(suffixes)}")
    if not path.name.lower().endswith(suffixes):
        raise InputError(f"output {path.name} is not a single-file 3D format; end its name in {', '.join(suffixes)}")
    return path


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
    image with CT geometry (a truncated NIfTI file included). Values are checked
    for HU by inference, not here.
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
        _check_nifti_complete(path)
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


def _nifti_sizes(header: bytes) -> tuple[int, int] | None:
    """(vox_offset, voxel data bytes) from the start of a NIfTI-1 or NIfTI-2 header; None if it is not one."""
    for end in "<>":
        if len(header) >= 348 and struct.unpack(end + "i", header[:4])[0] == 348:
            dim = struct.unpack(end + "8h", header[40:56])
            bitpix, offset = struct.unpack(end + "h", header[72:74])[0], struct.unpack(end + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(end + "i", header[:4])[0] == 540:
            dim = struct.unpack(end + "8q", header[16:80])
            bitpix, offset = struct.unpack(end + "h", header[14:16])[0], struct.unpack(end + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dim[0] <= 7 or bitpix <= 0 or any(n < 0 for n in dim[1:dim[0] + 1]):
        return None
    voxels = 1
    for n in dim[1:dim[0] + 1]:
        voxels *= n
    return int(offset), voxels * bitpix // 8


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
        sitk.WriteImage(image, str(tmp), compress)
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
