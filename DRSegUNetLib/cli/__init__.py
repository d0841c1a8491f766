"""``python -m DRSegUNetLib``: segment, train, evaluate, info, lungs, pseudolabel, selftrain, crossval (and more).

Each family of commands is a module here that registers its parsers (``add_parsers``) and holds
its commands (``COMMANDS``); what several share (options, the progress printer, the model a
``--model`` names, checks of input and output paths) is in ``common`` and ``files``.

Errors the user can fix (bad input, bad checkpoint) print one line and exit 2;
nothing half-written is left at an output path.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import __version__
from . import checkpoints, correction_loop, crossval, evaluate, segment, train, weak_supervision
from .common import ProgressPrinter

# In the order ``--help`` lists their commands.
FAMILIES = (segment, train, crossval, evaluate, weak_supervision, correction_loop, checkpoints)
COMMANDS = {name: command for family in FAMILIES for name, command in family.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m DRSegUNetLib",
                                     description="DRSegUNet: segment COVID-19 lung infection (GGO, consolidation) and lungs on chest CT.")
    parser.add_argument("--version", action="version", version=f"DRSegUNetLib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.add_parsers(sub)
    _name_defaults(parser)
    return parser


def _help_names_default(action: argparse.Action) -> bool:
    """Whether an option's help says its default: "default" and the value as a word (a path's file
    name will do; an empty default needs only the word). None and False defaults need nothing."""
    import re

    default, text = action.default, action.help or ""
    if default is None or default is False or default == argparse.SUPPRESS:
        return True
    if "default" not in text:
        return False
    if isinstance(default, (str, list, tuple)) and not default:
        return True
    values = {str(default)}
    if isinstance(default, float):
        values.add(f"{default:g}")
    if isinstance(default, str) and "/" in default:
        values.add(Path(default).name)
    return any(re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w-])", text) for v in values)


def _name_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default X)" to the help of every option of every command that does not say its default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _name_defaults(sub)
        elif action.option_strings and action.help and action.help != argparse.SUPPRESS \
                and not _help_names_default(action):
            action.help = f"{action.help} (default {action.default})"


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _stdout_closed_by_reader(error: BrokenPipeError) -> bool:
    """Whether a BrokenPipeError is stdout's: a pipe (``info | head -1``) whose reader has gone."""
    import os
    import stat

    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return error.filename is None and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))


def _drop_stdout() -> None:
    """Point stdout (and stderr when it is the same pipe) at /dev/null, so that nothing more is written
    to the closed pipe, not even by Python's flush at exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        try:
            same = os.path.sameopenfile(sys.stdout.fileno(), sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            same = False
        os.dup2(devnull, sys.stdout.fileno())
        if same:
            os.dup2(devnull, sys.stderr.fileno())
    finally:
        os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; exit 2 with one line on stderr for what the user can fix: bad input, a bad
    checkpoint, a torch older than ``DRSegUNetLib.MIN_TORCH``, and OSErrors (a missing file, a folder that cannot be written, a full disk), each
    naming the path."""
    from ..errors import Cancelled, CheckpointError, InputError, TorchVersionError

    try:
        parser = build_parser()  # the finetune and crossval parsers import the modules that need torch
    except TorchVersionError as e:  # a torch older than MIN_TORCH: one line, as for bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup(args)
    try:
        code = COMMANDS[args.command](args)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is seen below
        return code
    except (InputError, CheckpointError, TorchVersionError) as e:
        ProgressPrinter.end_line()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if not _stdout_closed_by_reader(e):
            return _os_error(args, e)
        _drop_stdout()  # the reader has what it wanted (e.g. `info | head -1`): not an error
        return 0
    except OSError as e:  # a folder that cannot be written, a path that is a file, a missing file, a full disk
        return _os_error(args, e)
    except Cancelled:
        ProgressPrinter.end_line()
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        ProgressPrinter.end_line()
        print("interrupted", file=sys.stderr)
        return 130


def _os_error(args: argparse.Namespace, e: OSError) -> int:
    if getattr(args, "verbose", False):
        raise e
    ProgressPrinter.end_line()
    what = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    print(f"error: {what} ({e.strerror})" if what and e.strerror else f"error: {e.strerror or e}", file=sys.stderr)
    return 2
