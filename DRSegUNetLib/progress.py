"""Progress and cancellation for long work: callbacks, not globals.

A progress callback is called as ``progress(stage, step, total, message, **info)``
where ``info`` may carry numbers such as ``loss`` or ``val_dice``. A cancel check is
a callable returning True when the caller wants the work to stop; long loops call
:func:`check_cancel`, which raises :class:`~DRSegUNetLib.errors.Cancelled`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Protocol

from .errors import Cancelled

log = logging.getLogger("DRSegUNetLib")


class ProgressCallback(Protocol):
    def __call__(self, stage: str, step: int, total: int, message: str = "", **info: Any) -> None: ...


CancelCheck = Callable[[], bool]


def report(progress: Optional[ProgressCallback], stage: str, step: int, total: int, message: str = "", **info: Any) -> None:
    if progress is not None:
        progress(stage, step, total, message, **info)


def check_cancel(cancel: Optional[CancelCheck]) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the caller")
