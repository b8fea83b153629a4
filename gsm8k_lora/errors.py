"""The failures a user is told about in one line, and the exit code of each. Raised anywhere below the
entry points; said and turned into an exit code by `fail`, at the door and where a job ends (`rundir.py`).

A failure that a library's exception caused (a file its reader refused) is raised `from` that exception: the
line says so and names the switch, `HYDRA_FULL_ERROR=1`, that prints the whole traceback above it. It is the
variable Hydra's own commands already read for their full traceback, so one switch serves every command."""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn

FULL_ERROR = "HYDRA_FULL_ERROR"


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


def full_error() -> bool:
    return os.environ.get(FULL_ERROR) == "1"


def fail(err: BaseException, quiet: bool = False) -> NoReturn:
    """An expected failure (`EXPECTED`) as one line on stderr, or none (`quiet`), and its exit code; with
    HYDRA_FULL_ERROR=1 the traceback first, of it and of the library's exception that caused it."""
    if quiet:
        sys.exit(err.exit_code)
    if full_error():
        traceback.print_exception(err, file=sys.stderr)
    hint = f" ({FULL_ERROR}=1 shows the traceback)" if err.__cause__ is not None and not full_error() else ""
    print(f"{err.label}: {err}{hint}", file=sys.stderr)
    sys.exit(err.exit_code)
