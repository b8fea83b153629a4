"""The failures a user is told about in one line, and the exit code of each. Raised anywhere below the
entry points; said and turned into an exit code by `fail`, at the door and where a job ends (`rundir.py`)."""

from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A config value that is out of range or inconsistent; its message is one line for the user."""

    exit_code = 2
    label = "config error"


class DataError(RuntimeError):
    """Data that cannot be used; the message says which file or value and what to do."""

    exit_code = 1
    label = "error"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says why and what to do."""

    exit_code = 1
    label = "error"


class RunDirBusy(RuntimeError):
    """The run directory is in use by another process; nothing was touched."""

    exit_code = 2
    label = "error"


class DiskFull(RuntimeError):
    """No room to write where the run writes: the message says where, how much a checkpoint of the run takes,
    which checkpoint is the last complete one, and that the same command resumes from it."""

    exit_code = 74  # sysexits' EX_IOERR
    label = "disk full"


class RunStopped(RuntimeError):
    """Training stopped on purpose (a signal) or for a reason the user must act on (NaN, out of memory)."""

    label = "stopped"

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
        self.label = "stopped" if exit_code > 128 else "error"  # > 128: 128 + a signal's number


EXPECTED = (ConfigError, DataError, ModelLoadError, RunDirBusy, DiskFull, RunStopped)


def stops_a_sweep(err: BaseException) -> bool:
    """A signal (exit code 128 + its number) stops a whole sweep; any other failure stops only its job."""
    return getattr(err, "exit_code", 1) > 128


def fail(err: BaseException, quiet: bool = False, who: str = "") -> NoReturn:
    """An expected failure (`EXPECTED`) as one line on stderr, begun by `who` (a data-parallel run's rank names
    itself: `rank 1 of 2: `), or none (`quiet`), and its exit code."""
    if not quiet:
        print(f"{who}{err.label}: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
