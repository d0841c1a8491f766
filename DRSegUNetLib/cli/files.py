"""Paths in and out of the commands: which inputs a folder holds, a NIfTI file that is not one,
outputs that would overwrite an input, a folder that cannot be written, and writing an output
so that a full disk or a killed run leaves no half-written file under its name.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("DRSegUNetLib")


from ..slices import VOLUME_SUFFIXES, volume_name  # noqa: F401  (the one definition)


def check_writable_folder(out: Path) -> None:
    """OSError now, before any work, when ``out`` could not be written later: the nearest
    folder of its path that exists is a file or cannot be written to (writers make the
    missing folders below it)."""
    import errno
    import os

    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


# The first bytes of files that are sometimes renamed .nii or .nii.gz by mistake.
_SIGNATURES = ((b"\xff\xd8\xff", "a JPEG picture"), (b"\x89PNG\r\n\x1a\n", "a PNG picture"), (b"GIF8", "a GIF picture"),
               (b"II*\x00", "a TIFF picture"), (b"MM\x00*", "a TIFF picture"), (b"BM", "a BMP picture"),
               (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"NRRD", "an NRRD image"))


def check_nifti_signature(path: str | Path) -> None:
    """InputError when a file named .nii or .nii.gz is not NIfTI at all (neither gzip nor a NIfTI
    header), saying what it looks like: the reader would call it truncated."""
    import struct

    from ..errors import InputError

    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(132)
    if head[:2] == b"\x1f\x8b":
        return  # gzip: read_ct checks what it holds
    if len(head) >= 4 and {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]} & {348, 540}:
        if name.endswith(".gz"):
            raise InputError(f"{path.name} is an uncompressed NIfTI file named .nii.gz; rename it to .nii")
        return
    if not head:
        raise InputError(f"{path.name} is empty (0 bytes); give a CT volume (NIfTI, NRRD, MHA or DICOM)")
    kind = "a DICOM file" if head[128:132] == b"DICM" else next((k for m, k in _SIGNATURES if head.startswith(m)), None)
    raise InputError(f"{path.name} is not a NIfTI file{f' but {kind}' if kind else ''} (it has neither a NIfTI "
                     "header nor gzip compression); give a CT volume (NIfTI, NRRD, MHA or DICOM) with its own "
                     "file extension")


def read_ct_checked(path: str | Path):
    """imageio.read_ct, after check_nifti_signature."""
    from ..imageio import read_ct

    check_nifti_signature(path)
    return read_ct(path)


def check_outputs(inputs: Sequence[Any], outputs: Sequence[Any], writable: bool = True) -> None:
    """InputError when an output path is an input (by any path to the same file) or another output;
    with ``writable``, OSError when an output's folder could not be written (check_writable_folder)."""
    import os

    from ..errors import InputError

    ins = [Path(p) for p in inputs if p]
    outs = [Path(p) for p in outputs if p]
    for i, out in enumerate(outs):
        if out.is_dir():  # found now, not after the other outputs were replaced
            raise InputError(f"output {out} is a folder; give a file name")
        if writable:
            check_writable_folder(out)
        for inp in ins:
            if out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
                raise InputError(f"output {out} is the input {inp}; write the output to another path")
        if any(out.resolve() == other.resolve() for other in outs[:i]):
            raise InputError(f"output {out} is given twice; give each output its own path")
    _remove_stale_temporaries(outs)


def _remove_stale_temporaries(outputs: Sequence[Path]) -> None:
    """Temporary files of these outputs that a killed run left (atomic.remove_stale_temporaries)."""
    from ..atomic import remove_stale_temporaries

    for out in outputs:
        for stale in remove_stale_temporaries(out):
            log.info("removed %s, a temporary file of an interrupted run", stale)


@contextmanager
def writing(final: Path | str, staged: Path):
    """Errors of a writer writing ``staged`` (the temporary file of output ``final``) as OSErrors that
    name ``final``: an OSError without a file name (a full disk) or naming the temporary file, and
    SimpleITK's RuntimeError (e.g. "fwrite wrote only ..." of the NRRD writer)."""
    import errno
    import os

    try:
        yield staged
    except OSError as e:
        if e.errno is None or e.filename not in (None, str(staged), os.fspath(staged)):
            raise
        raise type(e)(e.errno, e.strerror, str(final)) from None
    except RuntimeError as e:
        if "SimpleITK" not in str(e) and "ITK ERROR" not in str(e):
            raise
        lines = [ln.strip().removeprefix("[nrrd]").strip() for ln in str(e).splitlines() if ln.strip()]
        raise OSError(errno.EIO, f"could not be written: {lines[-1] if lines else 'ITK error'}; is the disk full?",
                      str(final)) from None


def check_written_nifti(final: Path | str, staged: Path) -> None:
    """OSError naming ``final`` when the NIfTI file just written to ``staged`` is shorter than its
    header says: the NIfTI writer reports no error when the disk fills up."""
    import errno

    from ..errors import InputError
    from ..imageio import _check_nifti_complete

    try:
        _check_nifti_complete(staged)
    except InputError:
        raise OSError(errno.ENOSPC, "written incompletely (is the disk full?)", str(final)) from None


def _looks_like_dicom_series(folder: Path) -> bool:
    from ..imageio import _is_dicom

    files = sorted(f for f in folder.iterdir() if f.is_file())
    return any(f.suffix.lower() == ".dcm" or _is_dicom(f) for f in files[:5])


def expand_inputs(paths: Sequence[str], list_file: Optional[str]) -> list[Path]:
    """Files stay; a folder of DICOM files is one input; other folders give their volume files.

    What a folder holds besides its volume files (sub-folders, DICOM series among them, and
    files of other types) is not segmented: a warning lists it and says why."""
    items = [Path(p) for p in paths]
    if list_file:
        items += [Path(line.strip()) for line in Path(list_file).read_text().splitlines() if line.strip() and not line.startswith("#")]
    out: list[Path] = []
    for p in items:
        if p.is_dir():
            if _looks_like_dicom_series(p):
                out.append(p)
                continue
            skipped = []
            for f in sorted(p.iterdir()):
                if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES):
                    out.append(f)
                elif f.is_dir():
                    skipped.append(f"{f.name}/ (a DICOM series folder: give it as an input of its own)"
                                   if _looks_like_dicom_series(f) else f"{f.name}/ (a folder: folders are not searched)")
                else:
                    skipped.append(f"{f.name} (not a volume file: {', '.join(VOLUME_SUFFIXES)})")
            if skipped:
                shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
                log.warning("skipped %d item(s) of %s: %s", len(skipped), p, shown)
        else:
            out.append(p)
    return out


from ..atomic import file_sha256  # noqa: E402,F401  (re-exported for the commands)
