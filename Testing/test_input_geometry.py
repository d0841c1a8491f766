"""Bad geometry and bad values in CT files: refused with one line (exit 2), never segmented
into labels that do not overlay the CT or into wrong volumes; ITK's raw warnings never reach
the user (issue "What a new user and bad input still hit", points 5-10).

Every bad file is made from real CT: CIP's ct-64.nrrd (Testing/data/cip_ct64), its DICOM
series (../shared/data/hu/cip_copdgene/ct-64Dicom) and the bundled NY-SBU DICOM slice. Only the
corruption itself (NaN, a sheared header, a spacing, a slab, a deleted file) is synthetic.
"""
from __future__ import annotations

import gzip
import logging
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DRSegUNetLib.cli import main
from DRSegUNetLib.errors import InputError
from DRSegUNetLib.imageio import read_ct
from DRSegUNetLib.preprocessing import CT_PIXEL_MM, CT_SLICE_MM, MIN_SLICE_PX

CT64 = Path(__file__).resolve().parent / "data" / "cip_ct64" / "ct-64.nrrd"
RAW_ITK = re.compile(r"WARNING: In|\.cxx|\.hxx|ERROR: In|0x[0-9a-f]{6,}")  # ITK's own output


@pytest.fixture(scope="module")
def ct64() -> sitk.Image:
    return sitk.ReadImage(str(CT64))


def _like(array: np.ndarray, ref: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ref)
    return image


def _segment(path: Path, tmp_path: Path, model: Path, capfd) -> tuple[int, list[str]]:
    """``segment path`` with a report; (exit code, stderr lines, ITK's C++ output included)."""
    out = tmp_path / "out"
    capfd.readouterr()  # what the test itself printed before (e.g. SimpleITK used directly)
    code = main(["segment", str(path), str(out / "labels.nii.gz"), "--report", str(out / "r.json"),
                 "--model", str(model), "--device", "cpu", "--pixel-mm", "0"])
    return code, capfd.readouterr().err.strip().splitlines()


def _refused(path: Path, tmp_path: Path, model: Path, capfd, *words: str) -> str:
    """Assert ``segment`` refuses ``path`` with one line naming the file and ``words``; return it."""
    code, err = _segment(path, tmp_path, model, capfd)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert path.name in err[0] and all(w in err[0] for w in words), err[0]
    assert not RAW_ITK.search(err[0])
    assert not (tmp_path / "out" / "labels.nii.gz").exists() and not (tmp_path / "out" / "r.json").exists()
    return err[0]


def _nrrd_with_header(src: Path, dst: Path, edit) -> Path:
    data = src.read_bytes()
    end = data.index(b"\n\n") + 2
    dst.write_bytes(edit(data[:end].decode()).encode() + data[end:])
    return dst


# --- 5. NaN or Inf -------------------------------------------------------------------------

def _with_nan(ct64: sitk.Image, every: bool = False) -> sitk.Image:
    a = sitk.GetArrayFromImage(ct64).astype(np.float32)
    if every:
        a[:] = np.nan
    else:
        a[40, 30:34, 20:24] = np.nan  # in the right lung
        a[41, 10, 10] = np.inf
    return _like(a, ct64)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nan_in_nifti_is_refused_though_the_reader_reads_zero(tmp_path, capfd, ct64, tiny_checkpoint, suffix):
    path = tmp_path / f"ct-nan{suffix}"
    sitk.WriteImage(_with_nan(ct64), str(path))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # ITK hides them
    message = _refused(path, tmp_path, tiny_checkpoint, capfd, "16 NaN", "1 infinite")
    assert "must be finite" in message


@pytest.mark.parametrize("compress", [False, True])
def test_nan_patched_into_raw_nifti_bytes_is_refused(tmp_path, capfd, ct64, tiny_checkpoint, compress):
    """NaN put into the voxel bytes of a .nii by hand, not by a writer that might clean them."""
    plain = tmp_path / "ct-float.nii"
    sitk.WriteImage(sitk.Cast(ct64, sitk.sitkFloat32), str(plain), False)
    data = bytearray(plain.read_bytes())
    offset = int(struct.unpack("<f", data[108:112])[0])
    z_slice = offset + 4 * 64 * 64 * 40
    data[z_slice:z_slice + 4 * 250] = struct.pack("<f", float("nan")) * 250
    data[offset:offset + 4] = struct.pack("<f", float("-inf"))
    path = tmp_path / ("ct-patched.nii.gz" if compress else "ct-patched.nii")
    path.write_bytes(gzip.compress(bytes(data)) if compress else bytes(data))
    plain.unlink()
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()
    _refused(path, tmp_path, tiny_checkpoint, capfd, "250 NaN", "1 infinite")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nan_in_other_formats_is_refused_naming_the_file(tmp_path, capfd, ct64, tiny_checkpoint, suffix):
    path = tmp_path / f"ct-nan{suffix}"
    sitk.WriteImage(_with_nan(ct64), str(path))
    _refused(path, tmp_path, tiny_checkpoint, capfd, "16 NaN", "1 infinite")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_all_nan_says_nan_not_eight_bit(tmp_path, capfd, ct64, tiny_checkpoint, suffix):
    path = tmp_path / f"all-nan{suffix}"
    sitk.WriteImage(_with_nan(ct64, every=True), str(path))
    message = _refused(path, tmp_path, tiny_checkpoint, capfd, f"{64 * 64 * 79} NaN", "every voxel")
    assert "8-bit" not in message


def test_finite_float_nifti_still_reads(tmp_path, ct64):
    path = tmp_path / "ct-float.nii.gz"
    sitk.WriteImage(sitk.Cast(ct64, sitk.sitkFloat32), str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_ct(path)), sitk.GetArrayFromImage(ct64))


# --- 6. Sheared direction matrix -------------------------------------------------------------

def test_sheared_nrrd_is_refused_not_written_with_another_direction(tmp_path, capfd, tiny_checkpoint):
    def shear(header: str) -> str:  # the j axis leans 16.7 degrees towards i
        m = re.search(r"space directions: \((.*?)\) \((.*?)\) \((.*?)\)", header)
        j = [float(v) for v in m.group(2).split(",")]
        return header.replace(m.group(2), f"{0.3 * j[1]!r},{j[1]!r},{j[2]!r}")

    path = _nrrd_with_header(CT64, tmp_path / "ct-sheared.nrrd", shear)
    assert not np.allclose(sitk.ReadImage(str(path)).GetDirection(), np.eye(3).ravel())  # it does read
    _refused(path, tmp_path, tiny_checkpoint, capfd, "sheared", "73.3 degrees", "resample")


def test_rounding_in_an_oblique_direction_still_reads(tmp_path, ct64):
    """Direction cosines rounded as in DICOM headers (1e-6) are not a shear."""
    d = np.eye(3)
    d[0, 1] = 1e-6
    image = sitk.Image(ct64)
    image.SetDirection(d.ravel().tolist())
    path = tmp_path / "ct-rounded.nrrd"
    sitk.WriteImage(image, str(path))
    assert read_ct(path).GetSize() == ct64.GetSize()


# --- 7. Implausible or missing spacing -------------------------------------------------------

@pytest.mark.parametrize("spacing,words", [
    ((1000.0, 1000.0, 1000.0), ("1000 x 1000 mm pixels", f"{CT_PIXEL_MM[0]:g}-{CT_PIXEL_MM[1]:g} mm")),
    ((1e-6, 1e-6, 1e-6), ("1e-06 x 1e-06 mm pixels",)),
    ((4.171872, 4.171872, 100.0), ("100 mm apart", f"{CT_SLICE_MM[0]:g}-{CT_SLICE_MM[1]:g} mm")),
    ((0.0417, 0.0417, 0.0399), ("mm pixels", "not in mm")),  # a header in dm
])
def test_implausible_spacing_is_refused(tmp_path, capfd, ct64, tiny_checkpoint, spacing, words):
    image = sitk.Image(ct64)
    image.SetSpacing(spacing)
    path = tmp_path / "ct-spacing.nrrd"
    sitk.WriteImage(image, str(path))
    _refused(path, tmp_path, tiny_checkpoint, capfd, *words)


@pytest.mark.parametrize("keep_sform", [False, True])
def test_nifti_with_zero_pixdim_is_refused_not_read_as_1mm(tmp_path, capfd, ct64, tiny_checkpoint, keep_sform):
    path = tmp_path / "ct-zero-pixdim.nii"
    sitk.WriteImage(ct64, str(path), False)
    data = bytearray(path.read_bytes())
    data[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1:4]
    if not keep_sform:
        data[252:256] = struct.pack("<2h", 0, 0)  # qform_code, sform_code: pixdim is all there is
    path.write_bytes(bytes(data))
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)  # what ITK guesses
    message = _refused(path, tmp_path, tiny_checkpoint, capfd, "no voxel size", "pixdim is 0 x 0 x 0")
    assert "sform" not in message


def test_nrrd_and_metaimage_without_spacing_are_refused(tmp_path, capfd, ct64, tiny_checkpoint):
    def drop_geometry(header: str) -> str:
        return re.sub(r"(space directions|space origin|space): .*\n", "", header)

    nrrd = _nrrd_with_header(CT64, tmp_path / "ct-no-spacing.nrrd", drop_geometry)
    assert sitk.ReadImage(str(nrrd)).GetSpacing() == (1.0, 1.0, 1.0)
    _refused(nrrd, tmp_path, tiny_checkpoint, capfd, "no voxel size", "'space directions'")
    mha = tmp_path / "ct-no-spacing.mha"
    sitk.WriteImage(ct64, str(mha))
    data = mha.read_bytes()
    mha.write_bytes(re.sub(rb"ElementSpacing = [^\n]*\n", b"", data, count=1))
    assert sitk.ReadImage(str(mha)).GetSpacing() == (1.0, 1.0, 1.0)
    _refused(mha, tmp_path, tiny_checkpoint, capfd, "no voxel size", "ElementSpacing")


def test_dicom_without_pixel_spacing_is_refused(tmp_path, capfd, sample_ct_path, tiny_checkpoint):
    data = bytearray(Path(sample_ct_path).read_bytes())
    at = data.find(b"\x28\x00\x30\x00DS")  # (0028,0030) Pixel Spacing, explicit VR little endian
    assert at > 0 and data.find(b"\x18\x00\x64\x11") < 0  # and no Imager Pixel Spacing
    data[at + 2] = 0x31  # the element becomes (0028,0031) Zoom Factor
    path = tmp_path / "slice-no-spacing.dcm"
    path.write_bytes(bytes(data))
    assert sitk.ReadImage(str(path)).GetSpacing()[:2] == (1.0, 1.0)
    _refused(path, tmp_path, tiny_checkpoint, capfd, "no voxel size", "Pixel Spacing")


# --- 8. Images that are not a stack of axial slices -----------------------------------------

@pytest.mark.parametrize("cut,rows_cols", [
    ((slice(None), slice(30, 31), slice(None)), "1 x 64"),  # one coronal slice, 64 x 1 x 79
    ((slice(None), slice(None), slice(30, 31)), "64 x 1"),  # one sagittal slice, 1 x 64 x 79
    ((slice(40, 41), slice(30, 31), slice(None)), "1 x 64"),  # a single row
])
def test_slabs_one_voxel_thick_in_plane_are_refused(tmp_path, capfd, caplog, ct64, tiny_checkpoint, cut, rows_cols):
    a = sitk.GetArrayFromImage(ct64)[cut]
    image = sitk.GetImageFromArray(np.ascontiguousarray(a))
    for set_, get in ((image.SetSpacing, ct64.GetSpacing), (image.SetOrigin, ct64.GetOrigin),
                      (image.SetDirection, ct64.GetDirection)):
        set_(get())
    path = tmp_path / "ct-slab.nrrd"
    sitk.WriteImage(image, str(path))
    with caplog.at_level(logging.WARNING):
        _refused(path, tmp_path, tiny_checkpoint, capfd, f"axial slices of {rows_cols} pixels",
                 "not a stack of 2D axial", f"{MIN_SLICE_PX} x {MIN_SLICE_PX}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # not one warning per slice


def test_row_of_the_bundled_dicom_slice_is_refused(tmp_path, capfd, sample_ct_path, tiny_checkpoint):
    one = read_ct(sample_ct_path)  # 512 x 512 x 1
    row = _like(sitk.GetArrayFromImage(one)[:, 250:251, :].copy(), one[:, 250:251, :])
    path = tmp_path / "row.nrrd"
    sitk.WriteImage(row, str(path))
    _refused(path, tmp_path, tiny_checkpoint, capfd, "axial slices of 1 x 512 pixels")


def test_single_axial_slice_still_segments(tmp_path, capfd, ct64, tiny_checkpoint):
    path = tmp_path / "ct-one-slice.nrrd"
    sitk.WriteImage(ct64[:, :, 40:41], str(path))
    code, err = _segment(path, tmp_path, tiny_checkpoint, capfd)
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "out" / "labels.nii.gz")).GetSize() == (64, 64, 1)


# --- 9. DICOM series with missing slices ---------------------------------------------------

@pytest.fixture
def series(shared_data, tmp_path) -> Path:
    folder = tmp_path / "ct-64Dicom"
    shutil.copytree(shared_data / "hu" / "cip_copdgene" / "ct-64Dicom", folder)
    return folder


@pytest.mark.realdata
def test_series_with_a_missing_slice_is_refused_naming_the_gap(series, tmp_path, capfd, tiny_checkpoint):
    (series / "IMG0040.dcm").unlink()
    message = _refused(series, tmp_path, tiny_checkpoint, capfd, "missing", "IMG0039.dcm and IMG0041.dcm",
                       "7.974 mm apart", "3.987 mm", "about 1 slice(s)")
    assert "nonuniformity" not in message


@pytest.mark.realdata
def test_series_with_several_gaps_names_the_first(series):
    for name in ("IMG0020.dcm", "IMG0050.dcm", "IMG0051.dcm"):
        (series / name).unlink()
    with pytest.raises(InputError, match=r"IMG0019.dcm and IMG0021.dcm .* and 1 more gap"):
        read_ct(series)


@pytest.mark.realdata
def test_complete_series_and_series_without_its_ends_still_read(series, shared_data):
    image = read_ct(series)
    assert image.GetSize() == (64, 64, 79) and abs(image.GetSpacing()[2] - 3.98734) < 1e-4
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_data / "hu" / "cip_copdgene" / "ct-64.nrrd"))))
    (series / "IMG0001.dcm").unlink()
    (series / "IMG0079.dcm").unlink()
    assert read_ct(series).GetSize() == (64, 64, 77)  # fewer slices, none missing between them


@pytest.mark.realdata
def test_series_with_a_slice_out_of_place_is_refused_as_uneven(series):
    """IMG0040's ImagePositionPatient z moved 1.6 mm (0.4 of a step) towards IMG0041, in its bytes."""
    path = series / "IMG0040.dcm"
    data = path.read_bytes()
    old = b"-128.414\\-264.414\\-204.75 "  # (0020,0032), implicit VR little endian, 26 bytes
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, b"-128.414\\-264.414\\-203.15 "))
    with pytest.raises(InputError, match=r"unevenly spaced \(IMG0039.dcm and IMG0040.dcm are 5.58\d mm apart"):
        read_ct(series)


@pytest.mark.realdata
def test_duplicate_slice_is_refused(series):
    shutil.copy(series / "IMG0040.dcm", series / "IMG0040-copy.dcm")
    with pytest.raises(InputError, match="same slice position.*keep one copy"):
        read_ct(series)


# --- 10. ITK's warnings ----------------------------------------------------------------------

@pytest.mark.realdata
def test_good_series_segments_without_raw_itk_output(shared_data, tmp_path, capfd, tiny_checkpoint):
    """CIP's series has 0.00066 mm of rounding in its slice positions: no alarm, no C++ paths."""
    code, err = _segment(shared_data / "hu" / "cip_copdgene" / "ct-64Dicom", tmp_path, tiny_checkpoint, capfd)
    assert code == 0, err
    assert not RAW_ITK.search("\n".join(err)) and "nonuniformity" not in "\n".join(err)


def _sform_disagreeing(ct64: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(ct64, str(path), False)
    data = bytearray(path.read_bytes())
    for offset in (280, 296, 312):  # srow_x, srow_y, srow_z: the i column 1.5 times pixdim[1]
        row = list(struct.unpack("<4f", data[offset:offset + 16]))
        row[0] *= 1.5
        data[offset:offset + 16] = struct.pack("<4f", *row)
    path.write_bytes(bytes(data))
    return path


def test_itk_warnings_become_one_log_line_naming_the_file(tmp_path, capfd, caplog, ct64):
    path = _sform_disagreeing(ct64, tmp_path / "ct-sform.nii")
    with caplog.at_level(logging.WARNING, logger="DRSegUNetLib"):
        image = read_ct(path)
    assert image.GetSpacing() == pytest.approx(ct64.GetSpacing(), rel=1e-6)
    assert not RAW_ITK.search(capfd.readouterr().err)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("ct-sform.nii: ") and "sform" in warnings[0]
    assert "\n" not in warnings[0] and not RAW_ITK.search(warnings[0])
    # ITK's own output window is back after the read: SimpleITK used directly still prints.
    sitk.ReadImage(str(path))
    assert "unexpected scales in sform" in capfd.readouterr().err
