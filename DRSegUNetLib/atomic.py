"""Atomic file writes (temporary file in the same folder, fsync, rename); no torch here."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); mkstemp gives 0o600."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir()`` would give a new folder (0o777 less the umask); mkdtemp gives 0o700."""
    return 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_beside(path: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``path``'s folder (made if missing): (fd, temporary path).
    An OSError names ``path``, the file the caller asked for, not the temporary one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as e:
        if e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, prefix: str | None = None) -> None:
    """Write ``data`` to ``path``: nothing half-written is ever visible at ``path``.

    ``prefix`` names the temporary file (default ``.<name>.``), so that a store can
    recognise and clean up leftovers of a writer that died. An OSError while writing
    (a full disk gives one without a file name) names ``path``.
    """
    path = Path(path)
    fd, tmp = temp_beside(path, prefix or f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno is None or e.filename not in (None, tmp):
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# Temporary files are older than this only when the writer that made them died (a write takes
# seconds): remove_stale_temporaries removes them.
STALE_AFTER_S = 3600.0
_MKSTEMP_RANDOM = "[a-z0-9_]{8}"  # what tempfile.mkstemp puts between prefix and suffix


def temporary_name_patterns(path: str | os.PathLike) -> list[re.Pattern]:
    """Names of the temporary files our writers put beside ``path`` while writing it (R: mkstemp's
    8 random characters): atomic_write_bytes's ``.NAME.R.tmp``; imageio.atomic_output's ``.STEM-R.SUFFIX``
    (STEM: the name up to its first dot; SUFFIX: the format's, e.g. ``.nii.gz``), which is also the
    staged file of imageio.output_set; and what a writer makes beside such a staged file: ``.-R.SUFFIX``
    (atomic_output of it) and ``..STEM-R.SUFFIX.R.tmp`` (atomic_write_bytes of it)."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix.lower() == ".gz" else path.suffix or ".tmp"
    rnd, stem, sfx = _MKSTEMP_RANDOM, re.escape(path.name.split(".")[0]), re.escape(suffix)
    return [re.compile(rf"\.{re.escape(path.name)}\.{rnd}\.tmp"),
            re.compile(rf"\.(?:{stem})?-{rnd}{sfx}"),
            re.compile(rf"\.\.{stem}-{rnd}{sfx}\.{rnd}\.tmp")]


def remove_stale_temporaries(path: str | os.PathLike, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files of ``path`` (temporary_name_patterns) older than ``max_age_s``,
    left by a writer that was killed before it renamed them; return what was removed. Younger
    ones may belong to a writer at work and stay; a folder that cannot be listed is left alone."""
    import time

    path = Path(path)
    patterns = temporary_name_patterns(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(".") or not any(p.fullmatch(entry.name) for p in patterns):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
