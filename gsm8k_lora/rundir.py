"""The run directory, the unit of truth (README's "Outputs" lists its files), as one object: `RunDirectory`
owns what a run writes there, its markers, its lock, the comparison of a rerun with the run it would continue,
and the room its checkpoints need on the disk. The Trainer writes `adapter/` and `checkpoints/`; `tracking.py` writes
`wandb_run.json` through `write_json`.

`done.json` is written last, after every result file; a job directory without it is incomplete, so a sweep
started again re-runs only what is missing or failed. Each file is written whole or not at all (written beside,
then renamed): a reader never sees half a file, and a write that fails (a full disk) leaves no half-written
temporary file behind. The module's functions serve every directory the package writes or reads (runs, sweeps,
benchmarks). What a job's failures say and leave here is `failures.py`'s.

In a data-parallel run every process holds a `RunDirectory` of the same path, and only rank 0's writes happen
(`parallel.main_only` on each writer): a call on another rank does nothing. The one exception is a failure's
marker, written by the process that failed (with its rank), so the cause is not lost with it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shlex
import shutil
import socket
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from gsm8k_lora import parallel
from gsm8k_lora.environment import environment
from gsm8k_lora.errors import ConfigError, DataError, RunDirBusy
from gsm8k_lora.parallel import main_only

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DONE, FAILED = "done.json", "failed.json"
WANDB_RUN = "wandb_run.json"  # the run's W&B id, mode and link (or sync command): a resume continues that run
CHECKPOINT_MARKER = ".complete"  # written into a checkpoint once the Trainer has written all of its files
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a run writes into its directory (Hydra's `.hydra/` and job log, and W&B's `wandb/`, aside).
RUN_FILES = ("config.yaml", "environment.json", "metrics.json", "log_history.json", "eval_metrics.json",
             "predictions.jsonl", "report.md", WANDB_RUN, DONE, FAILED)
RUN_DIRS = ("checkpoints", "adapter", "merged")
SWEEP = "sweep.json"  # at a sweep's root: its name, start, W&B group and swept keys (`sweep.SweepCallback`)


# --- files, in any directory -----------------------------------------------------------------------------------
def write_text(path: Path, text: str) -> Path:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # its own per process: ranks may write one file
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a full disk, or a stop at once: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _parsed(path: Path, parse, kind: type = dict):
    """`parse` of a file's text, or DataError naming the file where it is not UTF-8, its reader refuses it, or it
    holds another kind of value: a damaged file of a run is said in one line by every reader of it."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as err:  # json's errors are ValueErrors
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a {'mapping' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


def read_json(path: Path) -> dict:
    return _parsed(path, json.loads) if path.exists() else {}


def read_config(run_dir: Path) -> dict:
    """A run directory's resolved config.yaml as plain data ({} if it has none)."""
    path = run_dir / "config.yaml"
    return _parsed(path, lambda text: yaml.safe_load(text) or {}) if path.exists() else {}


def read_predictions(run_dir: Path) -> list[dict]:
    path = run_dir / "predictions.jsonl"
    lines = _parsed(path, lambda text: [json.loads(line) for line in text.splitlines()], list) if path.exists() else []
    if not all(isinstance(row, dict) for row in lines):
        raise DataError(f"{path}: expected one JSON object a line")
    return lines


def read_sweep(sweep_dir: Path) -> dict:
    """A sweep's record, or {} where none was written."""
    return read_json(sweep_dir / SWEEP)


def write_plots(directory: Path, plots: dict[str, Figure | None]) -> list[Path]:
    """Each plot as `<name>.png` in `directory` (None: nothing was drawn, nothing is written)."""
    paths = []
    for name, plot in plots.items():
        if plot is None:
            continue
        path = directory / f"{name}.png"
        tmp = directory / f".{name}.png.tmp"
        try:
            plot.savefig(tmp, format="png")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def resolve_adapter(path: str) -> str:
    root = Path(path).expanduser()
    if (root / "adapter_config.json").exists():
        return str(root)
    if (root / "adapter" / "adapter_config.json").exists():
        return str(root / "adapter")
    raise ConfigError(f"adapter={path!r} is invalid: expected a LoRA adapter directory "
                      "or a run directory with adapter/")


def run_directory(adapter: str | None) -> Path | None:
    """The run directory an `adapter=` path belongs to (it holds config.yaml), or None for a bare adapter."""
    if not adapter:
        return None
    root = Path(adapter).expanduser()
    candidates = [root]
    if root.name == "adapter":  # RUN/adapter
        candidates.append(root.parent)
    if root.parent.name == "checkpoints":  # RUN/checkpoints/checkpoint-N
        candidates.append(root.parent.parent)
    return next((c for c in candidates if (c / "config.yaml").exists()), None)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints the Trainer finished writing, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := _CHECKPOINT_RE.match(p.name)) and (p / CHECKPOINT_MARKER).exists()]
    return [p for _, p in sorted(found)]


# --- the room on the disk ----------------------------------------------------------------------------------------
NO_ROOM = {errno.ENOSPC: "no space is left on the disk", errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "a file reached the size limit of this process (ulimit -f)"}
# How torch's and safetensors' writers report a failed write: no errno, only their own message.
WRITER_FAILURES = ("inline_container", "iostream error", "PytorchStreamWriter", "StorageFull", "No space left")


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def no_room(err: BaseException, where: Path) -> str | None:
    """Why a write failed for lack of room (the disk, a quota, a file size limit), read from the exception and
    the exceptions it came from, or None if that is not why. A writer's own message counts where the disk is
    indeed (nearly) full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            return NO_ROOM[err.errno]
        if any(marker in str(err) for marker in WRITER_FAILURES):
            if _nearly_full(where):
                return NO_ROOM[errno.ENOSPC]
            if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
                return NO_ROOM[errno.EFBIG]
        err = err.__cause__ or err.__context__
    return None


def _nearly_full(where: Path) -> bool:
    usage = shutil.disk_usage(where if where.exists() else where.parent)
    return usage.free < max(2**20, usage.total // 1000)


# --- a rerun against the run it would continue -------------------------------------------------------------------
# Settings a resume may change, because they cannot change what was trained: how the trained model is
# evaluated (eval.*, except the accuracy during training, which can choose the best checkpoint), reported and
# logged; where to resume from; merging after training; data loader workers (the data order comes from the
# sampler, in the main process); how long ranks wait for each other; labels (experiment_name, objective) and
# where builtin models are cached.
# Every other key (model.*, data.*, lora.*, trainer.*, grid) shapes the training and must be the same.
MAY_DIFFER = ("eval.", "report.", "logger.", "trainer.resume", "trainer.save_merged", "trainer.dataloader_num_workers",
              "trainer.ddp_timeout", "experiment_name", "objective", "cache_dir", "adapter")
MUST_MATCH = ("eval.during_training", "eval.during_training_limit")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def training_differences(old: dict, new: dict) -> list[str]:
    """`key old -> new` for each setting that shapes training and differs between two resolved configs. A key
    only one of them has (a config written by another version of the package) is not compared."""
    before, after = _flat(old), _flat(new)
    differ = []
    for key in sorted(before.keys() & after.keys()):
        free = key.startswith(MAY_DIFFER) and not key.startswith(MUST_MATCH)
        if not free and before[key] != after[key]:
            differ.append(f"{key} {before[key]!r} -> {after[key]!r}")
    return differ


class RunDirectory:
    """One job's directory: `path`, the command line's overrides that made the job, and the command as typed."""

    def __init__(self, path: Path, overrides: list[str] | None = None, command: str = ""):
        self.path = Path(path).absolute()
        self.overrides = list(overrides or [])
        self.command = command
        self._lock: FileLock | None = None
        self.fresh = not self.path.exists()  # made by this process: removed again if the run never began

    # --- what a run writes ---
    @main_only
    def write_record(self, resolved: dict, model_weights: dict, scale: dict) -> None:
        """config.yaml (resolved) and environment.json, with the weights loaded and the run's scale (processes,
        launcher, batch sizes)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / "config.yaml", OmegaConf.to_yaml(resolved))
        write_json(self.path / "environment.json", {**environment(self.command), "model_weights": model_weights,
                                                    "scale": scale})

    @main_only
    def write_training(self, metrics: dict, history: list[dict], plots: dict[str, Figure]) -> None:
        """metrics.json, log_history.json and the loss plot, written before evaluation so a failure there loses none."""
        write_json(self.path / "log_history.json", {"log_history": history})
        write_plots(self.path, plots)
        write_json(self.path / "metrics.json", metrics)

    @main_only
    def write_eval(self, predictions: dict[str, list[dict]], metrics: dict) -> None:
        write_text(self.path / "predictions.jsonl",
                   "".join(json.dumps(r) + "\n" for rs in predictions.values() for r in rs))
        write_json(self.path / "eval_metrics.json", metrics)

    @main_only
    def write_report(self, text: str, plots: dict[str, Figure | None]) -> Path:
        report = write_text(self.path / "report.md", text)
        write_plots(self.path, plots)
        return report

    # --- what a run holds ---
    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.path / "checkpoints")

    def holds_run(self) -> bool:
        """Something a rerun could continue or mix with: a complete checkpoint, an adapter or training figures."""
        return bool(self.checkpoints()) or (self.path / "adapter").is_dir() or (self.path / "metrics.json").exists()

    def finished_training(self) -> dict | None:
        """The training figures of a run whose training ended and was written (its adapter and metrics.json),
        else None: a resume of it goes straight to evaluation."""
        if (self.path / "adapter" / "adapter_config.json").exists() and (self.path / "metrics.json").exists():
            return read_json(self.path / "metrics.json")
        return None

    def rerun_problem(self, resolved: dict, resume: str) -> str | None:
        """Why this config, run by this many processes, may not continue the run already here (None: it may, or
        there is none)."""
        if resume != "auto" or not (self.path / "config.yaml").exists() or not self.holds_run():
            return None
        differ = training_differences(read_config(self.path), resolved)
        if not differ:
            return self.scale_problem(parallel.scale())
        return (f"hydra.run.dir={self.path} holds a run trained with other settings ({'; '.join(differ)}); to keep "
                f"both, give this run a new hydra.run.dir, or add trainer.resume=never to start {self.path} afresh "
                f"(deleting its checkpoints and results)")

    def scale_problem(self, now: parallel.Scale) -> str | None:
        """Why `now`'s processes may not continue the training here: another number of processes has another global
        batch, another number of steps and another learning-rate schedule, so a resumed checkpoint would train on as
        a different run. A run whose training finished may be answered by any number (the answers are the same), so
        that resume is allowed. None: it may continue."""
        before = parallel.recorded(read_json(self.path / "environment.json"))
        if before is None or before.processes == now.processes or self.finished_training() is not None:
            return None
        again = ("the same sweep command" if before.launcher == "submitit" else
                 shlex.join([*before.launch_prefix(), "gsm8k_lora.train", *self.kept_overrides(),
                             f"hydra.run.dir={self.path}"]))
        return (f"hydra.run.dir={self.path} holds a run trained on {parallel.describe(before)}, and this command "
                f"runs {parallel.describe(now)}: its global batch, steps and learning-rate schedule would change "
                f"mid-run. Resume it as it was launched ({again}), give this run a new hydra.run.dir, or add "
                f"trainer.resume=never to start {self.path} afresh")

    @main_only
    def clear(self) -> None:
        """Remove what an earlier run wrote here (checkpoints, adapter, figures, plots), so a fresh start cannot
        mix with it. Hydra's `.hydra/` and log, and W&B's `wandb/`, stay."""
        for name in RUN_DIRS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for path in [*(self.path / n for n in RUN_FILES), *self.path.glob("*.png")]:
            path.unlink(missing_ok=True)

    @main_only
    def discard_if_empty(self) -> bool:
        """Remove this directory where this process made it and it holds nothing of a run (only Hydra's files, a
        failure marker, the config it failed on): a run that failed before it began leaves nothing behind. True if
        removed."""
        kept = [self.path / "eval_metrics.json", self.path / "wandb"]
        if not self.fresh or not self.path.is_dir() or self.holds_run() or any(p.exists() for p in kept):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    # --- markers ---
    def completed(self) -> dict | None:
        """The done marker of this job if it finished with these same overrides, else None."""
        record = read_json(self.path / DONE)
        return record if record and record.get("overrides") == self.overrides else None

    @main_only
    def mark_done(self, objective: str, value: float | None, started: datetime) -> None:
        """done.json, last: the overrides it ran with, the objective a sweeper reads, and when and where it ran."""
        (self.path / FAILED).unlink(missing_ok=True)
        write_json(self.path / DONE, {"overrides": self.overrides, "objective": objective, "value": value,
                                      "started": started.isoformat(timespec="milliseconds"),
                                      "finished": datetime.now().isoformat(timespec="milliseconds"),
                                      "pid": os.getpid()})

    def mark_failed(self, err: BaseException, replace: bool = True) -> None:
        """failed.json, by the process that failed (its rank with it), best effort: when the failure is a full disk,
        the marker may not fit either, and the one line the user gets matters more than a traceback about it.
        `replace=False`: not over a marker already there (another rank's cause)."""
        last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
        where = f"{last[0].filename}:{last[0].lineno}" if last else None
        if not replace and (self.path / FAILED).exists():
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / FAILED, {"overrides": self.overrides, "error": f"{type(err).__name__}: {err}",
                                            "where": where, "rank": parallel.rank()})
        except OSError:
            pass

    # --- the room on the disk ---
    def room_problem(self, checkpoint: int, adapter: int, saves: int) -> str | None:
        """Why this run will not fit where it writes (None: it fits): `saves` checkpoints on disk at once (the save
        total limit, plus the one written before the oldest is removed), the adapter, and 1 MiB of results; what
        this directory already holds of them counts as written."""
        held = sum(size(p) for p in self.checkpoints())
        need = max(0, saves * checkpoint + adapter + 2**20 - held)
        free = shutil.disk_usage(self.path).free
        if free >= need:
            return None
        return (f"{self.path} has {mib(free)} free; this run needs about {mib(need)} more ({saves} checkpoints of "
                f"about {mib(checkpoint)} on disk at once, then the {mib(adapter)} adapter). Free space, lower "
                f"trainer.save_total_limit, or give a hydra.run.dir on a larger disk")

    def disk_full_line(self, reason: str) -> str:
        """One line after a write failed for lack of room: where, what a checkpoint takes (measured from the last
        complete one, which is kept), and that the same command resumes from it once there is room. A checkpoint
        left half-written is removed: it is not one, and it holds the room a resume needs."""
        complete = self.checkpoints()
        last = complete[-1] if complete else None
        if (self.path / "checkpoints").is_dir():
            for folder in (self.path / "checkpoints").glob("checkpoint-*"):
                if folder.is_dir() and folder not in complete:
                    shutil.rmtree(folder, ignore_errors=True)
        head = f"{reason} where {self.path} is written ({mib(shutil.disk_usage(self.path).free)} free)"
        if last is None:
            return f"{head}; no checkpoint was complete yet. Free space and run the same command to start again"
        return (f"{head}; a checkpoint of this run takes {mib(size(last))}, and {last.name}, the last complete one, "
                f"is kept. Free space and run the same command: it resumes from {last.name}")

    # --- what the user is told ---
    def kept_overrides(self) -> list[str]:
        return [o for o in self.overrides if not o.startswith("trainer.resume=")]

    def resume_command(self) -> str:
        """The command that resumes this run: its overrides, in this directory, launched as this run was (a submitit
        sweep's job: the same sweep again, which skips the jobs that finished)."""
        scale = parallel.scale()
        if scale.launcher == "submitit":
            return "the same sweep command (its finished jobs are skipped)"
        return shlex.join([*scale.launch_prefix(), "gsm8k_lora.train", *self.kept_overrides(),
                           f"hydra.run.dir={self.path}"])

    def skip_line(self, done: dict) -> str:
        return (f"skipping {self.path}: completed before with the same overrides ({done['objective']}="
                f"{done['value']}); to run it again, add trainer.resume=never (starts it afresh) or give another "
                f"hydra.run.dir")

    def stopped_at_once(self) -> str:
        return (f"stopped at once; checkpoints in {self.path / 'checkpoints'} marked .complete can be resumed with "
                f"the same command and hydra.run.dir={self.path}")

    def hold(self) -> None:
        """This directory's lock, for this process (where it does not hold it already), or RunDirBusy naming the
        holder. `filelock.FileLock` is an flock(2) on `.lock`, which the operating system releases when the holder
        dies (kill -9 included), so a dead process never blocks a resume; who holds it is written beside
        (`.lock.json`), and a record left by a holder that died is taken over with a note. Data-parallel ranks
        share the directory: rank 0 holds it."""
        if not parallel.is_main_process() or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock, holder_file = FileLock(self.path / ".lock"), self.path / ".lock.json"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = read_json(holder_file)
            who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}" if holder
                   else "another process")
            raise RunDirBusy(f"{self.path} is in use by {who}: wait for it to end, or give this run another "
                             f"hydra.run.dir") from None
        self._lock, stale = lock, read_json(holder_file)
        write_json(holder_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.now().isoformat(timespec="seconds"), "command": self.command})
        if stale:
            print(f"took over the lock of {self.path} left by pid {stale['pid']} on {stale['host']} (started "
                  f"{stale['started']}), which ended without releasing it", file=sys.stderr)

    def release(self) -> None:
        if self._lock is not None:
            (self.path / ".lock.json").unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
