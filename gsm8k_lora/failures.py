"""Every failure a job meets in its run directory, said in one line with its exit code (`job`): a stop by signal
(`stopping.STOP`), an expected failure (`errors.py`), a full disk, a bug. One process, or every rank of a
data-parallel run, whose failures end the run as one (`_rank_failed`).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from gsm8k_lora import parallel
from gsm8k_lora.errors import EXPECTED, DiskFull, RunDirBusy, fail, stops_a_sweep
from gsm8k_lora.rundir import RunDirectory, no_room
from gsm8k_lora.stopping import STOP, StopNow


@contextmanager
def job(run_dir: RunDirectory, multirun: bool) -> Iterator[None]:
    """A job's life in `run_dir` (its first step: `hold`) and the end of every failure. An expected failure marks
    the job failed, or, where it began nothing, removes the directory it made; in a sweep a job's failure is one
    line and the other jobs go on (a signal stops them all). A write that failed for lack of room is `DiskFull`.
    Anything else is a bug: marked, and raised with its traceback. The lock is released at the end."""
    def stop_now() -> None:  # a second signal: record the stop, say one line
        run_dir.mark_failed(RuntimeError("stopped at once"))
        print(run_dir.stopped_at_once(), file=sys.stderr)

    # the first SIGINT/SIGTERM stops at the next safe point, wherever the run is; with several ranks, at once
    several = parallel.distributed()
    STOP.install(None if several else stop_now, at_once=several)
    try:
        yield
    except (Exception, StopNow) as err:
        if several:
            _rank_failed(run_dir, err, multirun)
        else:
            _failed(run_dir, err, multirun)
    finally:
        STOP.restore()
        run_dir.release()


def _failed(run_dir: RunDirectory, err: Exception | StopNow, multirun: bool) -> None:
    """A single process's failure: said in one line with its exit code, or (a bug) raised. Returns only where a
    sweep goes on to its next job."""
    if isinstance(err, RunDirBusy):  # another process's or another run's directory: nothing was touched
        if not multirun:
            fail(err)
        print(f"job {run_dir.path.name} refused: {err}", file=sys.stderr)
    elif isinstance(err, StopNow):  # a signal outside any safe point (loading): nothing in flight to keep
        if multirun or not run_dir.discard_if_empty():
            run_dir.mark_failed(RuntimeError(str(err)))
        print(f"{err}; {run_dir.stopped_at_once()}", file=sys.stderr)
        sys.exit(err.exit_code)
    elif isinstance(err, EXPECTED):
        if not multirun and run_dir.discard_if_empty():
            fail(err)  # the run never began: nothing is left behind
        run_dir.mark_failed(err)
        if multirun and not stops_a_sweep(err):  # one line; the other jobs go on, and the sweep's end says it
            print(f"job {run_dir.path.name} failed: {err.label}: {err}", file=sys.stderr)
            return
        fail(err)
    else:
        reason = no_room(err, run_dir.path)
        if reason is None:
            run_dir.mark_failed(err)
            raise err
        full = DiskFull(run_dir.disk_full_line(reason))  # every later job would meet it too
        run_dir.mark_failed(full)
        fail(full)


def _rank_failed(run_dir: RunDirectory, err: Exception | StopNow, multirun: bool) -> None:
    """One rank of a data-parallel run failed: the run ends, said once where one rank failed. Its launcher
    (torchrun, accelerate) ends the other ranks with SIGTERM as soon as one exits with an error, and a rank whose
    peer died sees its next collective fail: neither is a cause, so neither speaks, and a stop's marker goes only
    where no rank left its cause (`parallel.peer_lost`). The rank that failed says one line naming itself, the run
    directory and the resume command, marks the run failed, and gives the line to torchrun as its error record, so
    the launcher's summary names it as the root cause; a bug's traceback follows. SIGINT (the user's key, which
    every rank gets) is said by rank 0 alone. A failure every rank meets alike (a model that does not load) is
    said by each. In a sweep's job (a submitit job's tasks) the ranks return, so the sweep goes on to its next job
    and its comparison; a stop by signal ends the sweep."""
    signal_name = getattr(err, "signal_name", None) or (STOP.signal_name if stops_a_sweep(err) else None)
    main = parallel.is_main_process()
    if signal_name is not None:
        if main:
            run_dir.mark_failed(RuntimeError(f"stopped by {signal_name}"), replace=False)
            if signal_name == "SIGINT":
                parallel.speak(f"stopped by SIGINT; {run_dir.stopped_at_once()}")
        sys.exit(getattr(err, "exit_code", 1))
    if parallel.peer_lost(err):
        return _end(multirun, 1)
    if isinstance(err, RunDirBusy):  # every rank met it at once, and nothing was touched
        if main:
            parallel.speak(f"{'job ' + run_dir.path.name + ' refused' if multirun else err.label}: {err}")
        return _end(multirun, err.exit_code)
    reason = no_room(err, run_dir.path)
    err = DiskFull(run_dir.disk_full_line(reason)) if reason else err
    expected = isinstance(err, EXPECTED)
    run_dir.mark_failed(err)
    line = f"{parallel.who()}{f'{err.label}: {err}' if expected else f'{type(err).__name__}: {err}'}"
    if run_dir.resume_command() not in line:
        line += f" (run directory {run_dir.path}; resume with: {run_dir.resume_command()})"
    parallel.speak(line)
    parallel.record_for_launcher(line)
    if not expected:  # a bug: its traceback, where this rank's own stderr is silenced (`parallel.quiet_replica`)
        traceback.print_exception(err, file=sys.__stderr__)
        raise err
    return _end(multirun, err.exit_code)


def _end(multirun: bool, exit_code: int) -> None:
    """A rank's end after its failure was said: in a sweep's job, back to the sweep; else the process's exit."""
    if not multirun:
        sys.exit(exit_code)
