"""Exceptions with one-line messages meant for the user."""
from __future__ import annotations


class InputError(ValueError):
    """The input image, data or file cannot be used; the message says why."""


class CheckpointError(ValueError):
    """A checkpoint is corrupt, not a checkpoint, or from another class layout."""


class TorchVersionError(ImportError):
    """The installed torch is older than ``DRSegUNetLib.MIN_TORCH`` (raised when a module that needs torch is imported)."""


class Cancelled(Exception):
    """The caller asked long work to stop."""
