"""On-disk stores that survive a crash or a restart: model versions and accepted corrections.

Both stores only ever *add* files, each written under a temporary name and renamed
into place, so a crash loses at most the item being written and never leaves a
half-written one where a reader would look for it.

- :class:`ModelStore`: ``root/v0002/{model.pt, card.json}``, … plus ``root/active.json``
  naming the active version. Version 1 is the bundled model, read in place and never
  copied. Switching models is replacing the pointer; nothing is overwritten.
- :class:`CorrectionsStore`: ``root/<id>.npz``, one accepted slice each (CT in HU,
  label slice, spacing, where it came from), plus an append-only ``root/index.jsonl``.
  The ``.npz`` files are the truth; the index is a fast summary that may miss a line.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence, Union

import numpy as np

from .atomic import atomic_write_bytes, default_dir_mode, fsync_dir as _fsync_dir
from .errors import InputError
from .vocabulary import CHECKABLE, LABEL_LEGEND, NUM_CLASSES, check_class_names

log = logging.getLogger(__name__)

HOME_ENV = "DRSEGUNET_HOME"
BUNDLED_VERSION = 1
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_TMP_PREFIX = ".tmp-"


def platform_data_folder(roaming: bool = True) -> Path:
    """The platform's per-user application-data folder: Windows %APPDATA% (roaming) or
    %LOCALAPPDATA%, macOS Application Support, elsewhere $XDG_DATA_HOME or ~/.local/share."""
    if sys.platform.startswith("win"):
        if roaming:
            return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def default_home() -> Path:
    """Per-user data folder: ``$DRSEGUNET_HOME``, else the platform's application-data folder."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return platform_data_folder() / "DRSegUNet"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_file_atomic(path: Path, data: bytes) -> None:
    """Atomic write whose temporary name :meth:`ModelStore.clean_temporary` recognises."""
    atomic_write_bytes(path, data, prefix=_TMP_PREFIX + path.name + ".")



# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelVersion:
    """One model version: its checkpoint file and its model card."""

    version: int
    path: Path  # the checkpoint file
    card: dict[str, Any]
    bundled: bool = False

    @property
    def label(self) -> str:
        """Short text for a model picker, e.g. ``"v2 (level 2, from v1)"``."""
        if self.bundled:
            return f"v{self.version} (bundled level 1)"
        level = self.card.get("level")
        parent = self.card.get("parent")
        parts = [f"level {level}" if level else None, f"from v{parent}" if parent else None]
        extra = ", ".join(p for p in parts if p)
        return f"v{self.version} ({extra})" if extra else f"v{self.version}"


CheckpointSource = Union[str, os.PathLike, bytes]


class ModelStore:
    """Versioned models in a folder; see the module docstring for the layout.

    Args:
        root: the store folder (created on first write); default ``default_home()/"models"``.
        bundled: the bundled level-1 checkpoint, version 1, read in place (may be None).
    """

    CHECKPOINT = "model.pt"
    CARD = "card.json"
    ACTIVE = "active.json"

    def __init__(self, root: str | os.PathLike | None = None, bundled: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_home() / "models"
        self.bundled = Path(bundled) if bundled is not None else None

    # -- reading
    def _bundled_version(self) -> ModelVersion | None:
        if self.bundled is None:
            return None
        card = {"version": BUNDLED_VERSION, "parent": None, "level": 1, "note": "bundled model"}
        return ModelVersion(BUNDLED_VERSION, self.bundled, card, bundled=True)

    def _read_version_dir(self, d: Path) -> ModelVersion | None:
        m = _VERSION_DIR.match(d.name)
        if not m or not d.is_dir():
            return None
        ckpt = d / self.CHECKPOINT
        if not ckpt.is_file():
            return None
        try:
            card = json.loads((d / self.CARD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("model version %s has no readable card; listing it without one", d.name)
            card = {}
        return ModelVersion(int(m.group(1)), ckpt, card)

    def versions(self) -> list[ModelVersion]:
        """All versions, oldest first (the bundled one, if any, is version 1)."""
        out: list[ModelVersion] = []
        b = self._bundled_version()
        if b is not None:
            out.append(b)
        if self.root.is_dir():
            for d in self.root.iterdir():
                v = self._read_version_dir(d)
                if v is not None and v.version != BUNDLED_VERSION:
                    out.append(v)
        return sorted(out, key=lambda v: v.version)

    def get(self, version: int) -> ModelVersion:
        """The version numbered ``version``; KeyError if there is none."""
        if version == BUNDLED_VERSION and self.bundled is not None:
            return self._bundled_version()  # type: ignore[return-value]
        v = self._read_version_dir(self.root / f"v{int(version):04d}")
        if v is None:
            raise KeyError(f"no model version {version} in {self.root}")
        return v

    def path_of(self, version: int) -> Path:
        """The checkpoint file of ``version``."""
        return self.get(version).path

    def version_of(self, checkpoint: str | os.PathLike) -> ModelVersion | None:
        """The version whose checkpoint file is ``checkpoint`` (by any path to it), or None."""
        for v in self.versions():
            try:
                if v.path.samefile(checkpoint):
                    return v
            except OSError:
                continue
        return None

    def active(self) -> ModelVersion:
        """The active version: the pointer's, else the newest, else the bundled one.

        A missing or unreadable pointer, or one naming a version that is gone, falls back
        to the bundled model when there is one (the safe default), else the newest.
        """
        pointer = self.root / self.ACTIVE
        problem = None
        try:
            data = json.loads(pointer.read_text(encoding="utf-8"))
            return self.get(int(data["version"]))
        except FileNotFoundError:
            pass
        except KeyError as e:  # a version that is gone
            problem = f"naming a version that is not there ({str(e).strip(chr(39))})"
        except (OSError, ValueError, TypeError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        versions = self.versions()
        if not versions:
            raise LookupError(f"no model: no bundled checkpoint and no version in {self.root}")
        fallback = versions[0] if versions[0].bundled else versions[-1]
        if problem:
            log.warning("the active-model pointer %s is %s; using v%d instead (python -m DRSegUNetLib models "
                        "activate N sets it)", pointer, problem, fallback.version)
        return fallback

    # -- writing
    def set_active(self, version: int | ModelVersion) -> ModelVersion:
        """Make ``version`` the active one (atomic pointer replace)."""
        v = self.get(version.version if isinstance(version, ModelVersion) else int(version))
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"version": v.version, "set": _now_iso()}
        _write_file_atomic(self.root / self.ACTIVE, (json.dumps(payload) + "\n").encode("utf-8"))
        return v

    def add_version(self, checkpoint: CheckpointSource, card: dict[str, Any] | None = None,
                    parent: int | ModelVersion | None = None) -> ModelVersion:
        """Store a new version (atomic; earlier versions and the active pointer are untouched).

        Args:
            checkpoint: a checkpoint file path, or its bytes.
            card: model-card fields (data fingerprints, corrections used, metrics, note …);
                ``version``, ``parent``, ``created`` and ``checkpoint_sha256`` are filled in.
            parent: the version this one was trained from.
        Returns:
            The new version. It is not made active: call :meth:`set_active`.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_temporary()  # leftovers of writers that died (each holds a checkpoint copy)
        parent_no = parent.version if isinstance(parent, ModelVersion) else parent
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            os.chmod(tmp, default_dir_mode())  # a version folder is as readable as the store (not mkdtemp's 0700)
            digest = hashlib.sha256()
            with open(tmp / self.CHECKPOINT, "wb") as dst:
                if isinstance(checkpoint, (bytes, bytearray, memoryview)):
                    digest.update(checkpoint)
                    dst.write(checkpoint)
                else:
                    with open(checkpoint, "rb") as src:
                        _copy_hashing(src, dst, digest)
                dst.flush()
                os.fsync(dst.fileno())
            full_card = dict(card or {})
            full_card.update(parent=parent_no, created=_now_iso(), checkpoint_sha256=digest.hexdigest())
            full_card.setdefault("level", 2)
            # The number is only known when the folder lands; retry if another writer won it.
            # A taken name that is not a version (a folder without its checkpoint) is skipped:
            # versions() ignores it, so without ``floor`` every retry would pick it again.
            floor = BUNDLED_VERSION
            for _ in range(1000):
                number = max([v.version for v in self.versions()] + [floor]) + 1
                full_card["version"] = number
                _write_file_atomic(tmp / self.CARD, (json.dumps(full_card, indent=2, default=str) + "\n").encode("utf-8"))
                _fsync_dir(tmp)
                target = self.root / f"v{number:04d}"
                try:
                    os.rename(tmp, target)
                except OSError:
                    if target.exists():
                        floor = number
                        continue
                    raise
                _fsync_dir(self.root)
                return ModelVersion(number, target / self.CHECKPOINT, full_card)
            raise RuntimeError(f"could not allocate a version number in {self.root}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def clean_temporary(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary leftovers of writers that died; returns how many were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        now = time.time()
        for p in self.root.iterdir():
            try:
                if not p.name.startswith(_TMP_PREFIX) or now - p.stat().st_mtime <= older_than_s:
                    continue
            except FileNotFoundError:  # another writer renamed or removed it meanwhile
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        return removed


def _copy_hashing(src: BinaryIO, dst: BinaryIO, digest: Any, chunk: int = 1 << 20) -> None:
    while True:
        block = src.read(chunk)
        if not block:
            return
        digest.update(block)
        dst.write(block)


# --------------------------------------------------------------------------- corrections


@dataclass(frozen=True)
class CorrectionInfo:
    """What the index says of one accepted slice (no pixel data)."""

    id: str
    source: str
    slice_index: int
    time: str
    shape: tuple[int, int]
    spacing: tuple[float, float]
    known: tuple[str, ...] | None  # segments checked (data.labels_to_allowed); None = all
    path: Path


@dataclass(frozen=True)
class Correction:
    """One accepted slice: CT in HU and its labels (0 bg, 1 GGO, 2 consolidation, 3 lung)."""

    id: str
    ct_hu: np.ndarray  # (H, W) float32
    labels: np.ndarray  # (H, W) uint8
    spacing: tuple[float, float]  # (row, column) mm
    source: str
    slice_index: int
    time: str
    known: tuple[str, ...] | None


class CorrectionsStore:
    """Accepted correction slices in a folder; see the module docstring for the layout.

    Args:
        root: the store folder (created on first write); default ``default_home()/"corrections"``.
    """

    INDEX = "index.jsonl"
    SUFFIX = ".npz"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_home() / "corrections"

    # -- writing
    def add(self, ct_slice: np.ndarray, label_slice: np.ndarray, spacing: Sequence[float], source: str,
            slice_index: int, known: Sequence[str] | None = None) -> str:
        """Store one accepted slice and return its id.

        Args:
            ct_slice: (H, W) CT in HU (stored as int16 when that is exact, else float32).
            label_slice: (H, W) labels 0 bg, 1 GGO, 2 consolidation, 3 lung.
            spacing: (row, column) pixel spacing in mm.
            source: identity of the source volume (name and content fingerprint).
            slice_index: index of the slice in the source's axial view.
            known: the segments checked on this slice, when only some were (None = all; see data.labels_to_allowed).
        """
        ct = np.asarray(ct_slice)
        labels = np.asarray(label_slice)
        check_correction(ct, labels, spacing, known)
        with np.errstate(over="ignore"):  # an overflow is refused just below, not warned about
            ct_stored = _compact_hu(ct)
        if not np.all(np.isfinite(ct_stored)):  # e.g. float64 1e39: stored as float32 it would be inf
            raise ValueError("the CT slice has values beyond float32's range (about 3.4e38); this is not CT in HU")
        self.root.mkdir(parents=True, exist_ok=True)
        cid = f"{time.time_ns() // 1000:017d}-{uuid.uuid4().hex[:8]}"
        stamp = _now_iso()
        meta = {
            "id": cid, "source": str(source), "slice_index": int(slice_index), "time": stamp,
            "shape": list(ct.shape), "spacing": [float(s) for s in spacing],
            "known": list(known) if known is not None else None,
        }
        arrays = dict(
            ct_hu=ct_stored, labels=labels.astype(np.uint8), spacing=np.asarray(meta["spacing"], np.float64),
            source=np.array(meta["source"]), slice_index=np.array(meta["slice_index"]), time=np.array(stamp),
            known=np.array(json.dumps(meta["known"])),
        )
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        _write_file_atomic(self.root / f"{cid}{self.SUFFIX}", buf.getvalue())
        try:
            self._append_index(meta)
        except OSError as e:  # the slice is stored (the file is the truth): do not report it as lost
            log.warning("correction %s is stored but not indexed (%s); it is read from its file", cid, e)
        return cid

    def _append_index(self, meta: dict[str, Any]) -> None:
        path = self.root / self.INDEX
        with open(path, "a+b") as f:
            # A crash can leave a torn last line without its newline: end it first.
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(meta) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    # -- reading
    def _ids_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(self.SUFFIX)] for p in self.root.iterdir()
                      if p.name.endswith(self.SUFFIX) and not p.name.startswith(_TMP_PREFIX))

    def _index(self) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        try:
            text = (self.root / self.INDEX).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return entries
        for line in text.splitlines():
            try:
                meta = json.loads(line)
                entries[str(meta["id"])] = meta
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from a crash
        return entries

    def __len__(self) -> int:
        return len(self._ids_on_disk())

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and (self.root / f"{cid}{self.SUFFIX}").is_file()

    def ids(self) -> list[str]:
        """Ids of all stored slices, oldest first."""
        return self._ids_on_disk()

    def items(self) -> Iterator[CorrectionInfo]:
        """Every stored slice, oldest first; read from its file when the index lacks it."""
        index = self._index()
        for cid in self._ids_on_disk():
            meta = index.get(cid)
            if meta is None:
                try:
                    c = self.load(cid)
                except (OSError, ValueError, KeyError) as e:
                    log.warning("skipping unreadable correction %s: %s", cid, e)
                    continue
                meta = {"source": c.source, "slice_index": c.slice_index, "time": c.time,
                        "shape": list(c.labels.shape), "spacing": list(c.spacing),
                        "known": list(c.known) if c.known is not None else None}
            known = meta.get("known")
            yield CorrectionInfo(
                id=cid, source=str(meta.get("source", "")), slice_index=int(meta.get("slice_index", -1)),
                time=str(meta.get("time", "")), shape=tuple(meta.get("shape", ())),  # type: ignore[arg-type]
                spacing=tuple(float(s) for s in meta.get("spacing", ())),  # type: ignore[arg-type]
                known=tuple(known) if known is not None else None, path=self.root / f"{cid}{self.SUFFIX}",
            )

    def load(self, cid: str) -> Correction:
        """The slice stored under ``cid`` (CT as float32 HU, labels as uint8).

        Raises InputError naming the entry when its file is missing, unreadable or fails
        the checks of :meth:`add` (a file written by another program or damaged on disk).
        """
        path = self.root / f"{cid}{self.SUFFIX}"
        try:
            with np.load(path, allow_pickle=False) as z:
                known = json.loads(str(z["known"])) if "known" in z.files else None
                ct, labels, spacing = z["ct_hu"], z["labels"], tuple(float(s) for s in z["spacing"])
                known = tuple(known) if known is not None else None
                check_correction(ct, labels, spacing, known)
                return Correction(
                    id=cid, ct_hu=ct.astype(np.float32), labels=labels.astype(np.uint8),
                    spacing=spacing,  # type: ignore[arg-type]
                    source=str(z["source"]), slice_index=int(z["slice_index"]), time=str(z["time"]),
                    known=known,
                )
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise InputError(f"correction {cid} in {self.root} is unusable ({why}); "
                             f"remove {path.name} from the store") from None

    def remove(self, cid: str) -> None:
        """Delete one stored slice (its file; the index keeps a line that readers skip)."""
        if cid not in self:
            raise KeyError(f"no correction {cid} in {self.root}")
        (self.root / f"{cid}{self.SUFFIX}").unlink()
        _fsync_dir(self.root)

    def fingerprint(self, ids: Sequence[str] | None = None) -> str:
        """A short digest of ``ids`` (default: the ids in the store now); names the training
        data in a model card, so pass the ids that were trained on (others may add meanwhile)."""
        ids = self._ids_on_disk() if ids is None else sorted(ids)
        return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def check_correction(ct: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                     known: Sequence[str] | None) -> None:
    """ValueError unless this is one accepted slice: (H, W) finite CT, labels 0-3 of the
    same shape, (row, column) spacing > 0, and known class names (see CorrectionsStore.add)."""
    if ct.ndim != 2 or labels.shape != ct.shape:
        raise ValueError(f"need a 2-D CT slice and labels of the same shape, got {ct.shape} and {labels.shape}")
    if not np.all(np.isfinite(ct)):
        raise ValueError("the CT slice has NaN or infinite values")
    whole = labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.array_equal(labels, np.round(labels)))  # NaN fails too
    if labels.size and (not whole or labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be {LABEL_LEGEND}")
    if len(spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be (row, column) in mm, both > 0, got {tuple(spacing)}")
    if known is not None:
        check_class_names(known, CHECKABLE)


def _compact_hu(ct: np.ndarray) -> np.ndarray:
    """int16 when the values are whole numbers in int16's range (CT usually is), else float32."""
    if np.issubdtype(ct.dtype, np.integer):
        if ct.size == 0 or (ct.min() >= -32768 and ct.max() <= 32767):
            return ct.astype(np.int16)
        return ct.astype(np.float32)
    f = ct.astype(np.float32)
    if f.size and np.all(np.isfinite(f)) and f.min() >= -32768 and f.max() <= 32767 and np.array_equal(f, np.round(f)):
        return f.astype(np.int16)
    return f


__all__ = [
    "HOME_ENV", "BUNDLED_VERSION", "default_home", "ModelVersion", "ModelStore",
    "CorrectionInfo", "Correction", "CorrectionsStore",
]
