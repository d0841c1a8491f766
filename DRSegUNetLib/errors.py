"""Exceptions with one-line messages meant for the user."""
from __future__ import annotations


class InputError(ValueError):
    """The input image, data or file cannot be used; the message says why."""


class CheckpointError(ValueError):
    """A checkpoint is corrupt, not a checkpoint, or from another class layout."""


class Cancelled(Exception):
    """The caller asked long work to stop."""
