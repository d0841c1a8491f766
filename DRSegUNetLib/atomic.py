"""Atomic file writes (temporary file in the same folder, fsync, rename); no torch here."""
from __future__ import annotations

import os
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
    recognise and clean up leftovers of a writer that died.
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
