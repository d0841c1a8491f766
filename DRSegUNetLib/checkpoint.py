"""Checkpoints: config + weights + class names + provenance, saved atomically.

A checkpoint is a ``torch.save`` dict of plain types and tensors only, so it loads
with ``weights_only=True``:
``{"format", "config", "state_dict", "class_names", "fingerprint", "metrics",
"code_version", "extra"}``. Inference rebuilds the network from ``config``.
"""
from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, check_torch
from .atomic import atomic_write_bytes
from .config import ModelConfig
from .errors import CheckpointError
from .network import build_network
from .vocabulary import CLASS_NAMES

check_torch(torch.__version__)  # one line (TorchVersionError) under a torch older than MIN_TORCH

FORMAT = "drsegunet-checkpoint/1"


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    class_names: tuple[str, ...] = CLASS_NAMES
    fingerprint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    code_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> torch.nn.Module:
        """A network (the config's arch; DRSegUNet by default) in eval mode with these weights (float32)."""
        try:
            model = build_network(self.config.network)
        except (ValueError, TypeError, ImportError) as e:
            raise CheckpointError(f"cannot build this checkpoint's network: {e}") from None
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in self.state_dict.items()}
        mismatch = _state_dict_mismatch(model.state_dict(), sd)
        if mismatch:
            raise CheckpointError(f"checkpoint weights do not match its network config: {mismatch}")
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "state_dict": self.state_dict,
            "class_names": list(self.class_names),
            "fingerprint": self.fingerprint,
            "metrics": self.metrics,
            "code_version": self.code_version,
            "extra": self.extra,
        }

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: ModelConfig, half: bool = False, **kw: Any) -> "Checkpoint":
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if half:
            sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
        return cls(config=config, state_dict=sd, **kw)


def _check_field_types(config: ModelConfig) -> None:
    """TypeError naming the first field whose value is not of its default's type (int for a float is fine)."""
    for part in dataclasses.fields(config):
        sub = getattr(config, part.name)
        for f in dataclasses.fields(sub):
            value, default = getattr(sub, f.name), f.default
            if default is dataclasses.MISSING or default is None:
                continue  # no default type to hold the value to
            want = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, want):
                raise TypeError(f"{part.name}.{f.name} is {value!r}, not a {type(default).__name__}")


def nonfinite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity ([] if none): one device
    sync when all are finite, as they are after every healthy training epoch."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    if not floats or bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
        return []
    return [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]


def _state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """The first few missing, unexpected and wrongly shaped keys of ``given``; "" if it fits."""
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    parts = [f"{what} {few(keys)}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    return "; ".join(parts)


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    atomic_torch_save(ckpt.to_dict(), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path``, never half-written (:func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _check_archive(path: Path) -> None:
    """CheckpointError when a zip-format checkpoint (torch.save's format) has a member whose
    bytes fail its CRC-32: a damaged copy that torch.load would read without complaint,
    with wrong weights. Files that are not zips are left to torch.load to judge."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path} is not a readable DRSegUNet checkpoint ({type(e).__name__})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: its part {bad!r} fails its checksum; use another copy")


def load_checkpoint(path: str | os.PathLike, expected_classes: tuple[str, ...] = CLASS_NAMES) -> Checkpoint:
    """Load and validate a checkpoint; raise CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable DRSegUNet checkpoint ({type(e).__name__})") from None
    except Exception as e:  # pickle errors of many kinds for arbitrary files
        raise CheckpointError(f"{path} is not a readable DRSegUNet checkpoint ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a DRSegUNet checkpoint (format tag missing or unknown)")
    names = tuple(d.get("class_names", ()))
    if names != tuple(expected_classes):
        raise CheckpointError(
            f"{path} was trained for classes {list(names)}, not {list(expected_classes)}"
        )
    try:
        config = ModelConfig.from_dict(d["config"])
        _check_field_types(config)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid config ({type(e).__name__}: {e})") from None
    if config.network.num_classes != len(names):
        raise CheckpointError(f"{path}: network has {config.network.num_classes} outputs for {len(names)} classes")
    sd = d.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path} has no state_dict of named tensors (found {type(sd).__name__})")
    bad = nonfinite_keys(sd)
    if bad:
        raise CheckpointError(f"{path} has NaN or infinite weights ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): its training diverged; use another checkpoint")
    return Checkpoint(
        config=config,
        state_dict=sd,
        class_names=names,
        fingerprint=d.get("fingerprint", {}),
        metrics=d.get("metrics", {}),
        code_version=d.get("code_version", "?"),
        extra=d.get("extra", {}),
    )
