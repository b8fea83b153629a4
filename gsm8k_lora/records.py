"""The run directory, the unit of truth: every file a run writes, written here (README's "Outputs" lists them;
the Trainer writes `adapter/` and `checkpoints/`, `tracking.py` `wandb_run.json` through `write_json`).

`done.json` is written last, after every result file; a job directory without it is incomplete, so a sweep
started again re-runs only what is missing or failed. Each file is written whole or not at all (written
beside, then renamed): a reader never sees half a file, and a write that fails (a full disk) leaves no
half-written temporary file behind.

A directory holds one run: `RunLock` keeps a second process out while one works in it, and
`training_differences` names the settings a rerun changed, so a resume never continues a run trained with
other settings.
"""

from __future__ import annotations

import errno
import importlib.metadata as md
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import traceback
from datetime import datetime
from pathlib import Path

import yaml
from filelock import FileLock, Timeout
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora.errors import ConfigError, RunDirBusy

PACKAGES = ("gsm8k_lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "hydra-core", "wandb",
            "bitsandbytes")
DONE, FAILED = "done.json", "failed.json"
WANDB_RUN = "wandb_run.json"  # the run's W&B id, mode and link (or sync command): a resume continues that run
CHECKPOINT_MARKER = ".complete"  # written into a checkpoint once the Trainer has written all of its files
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a run writes into its directory (Hydra's `.hydra/` and job log, and W&B's `wandb/`, aside).
RUN_FILES = ("config.yaml", "environment.json", "metrics.json", "log_history.json", "eval_metrics.json",
             "predictions.jsonl", "report.md", WANDB_RUN, DONE, FAILED)
RUN_DIRS = ("checkpoints", "adapter", "merged")


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and always without them): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def write_text(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a full disk, or a stop at once: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def read_config(run_dir: Path) -> dict:
    """A run directory's resolved config.yaml as plain data ({} if it has none)."""
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None) or {}


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    import torch  # deferred for start-up time: `report` and `compare` read run directories without torch

    cuda = torch.cuda.is_available()
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
    }


def write_run_record(run_dir: Path, raw_cfg: DictConfig, model_weights: dict) -> dict:
    """config.yaml (resolved) and environment.json; returns the resolved config, as W&B logs it."""
    resolved = OmegaConf.to_container(raw_cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    write_json(run_dir / "environment.json", {**environment(), "model_weights": model_weights})
    return resolved


def write_figures(directory: Path, figures: dict[str, Figure | None]) -> list[Path]:
    """Each figure as `<name>.png` in `directory` (None: nothing was drawn, nothing is written)."""
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        path = directory / f"{name}.png"
        tmp = directory / f".{name}.png.tmp"
        try:
            figure.savefig(tmp, format="png")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def write_training(run_dir: Path, metrics: dict, history: list[dict], figures: dict[str, Figure]) -> None:
    """metrics.json, log_history.json and the loss plot, written before evaluation so a failure there loses none."""
    write_json(run_dir / "log_history.json", {"log_history": history})
    write_figures(run_dir, figures)
    write_json(run_dir / "metrics.json", metrics)


def write_eval(run_dir: Path, predictions: dict[str, list[dict]], metrics: dict) -> None:
    write_text(run_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for rs in predictions.values() for r in rs))
    write_json(run_dir / "eval_metrics.json", metrics)


def read_predictions(run_dir: Path) -> list[dict]:
    path = run_dir / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


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


def completed(job_dir: Path, overrides: list[str]) -> dict | None:
    """The done marker of this job if it finished with these same overrides, else None."""
    record = read_json(job_dir / DONE)
    return record if record and record.get("overrides") == overrides else None


def mark_done(job_dir: Path, overrides: list[str], objective: str, value: float | None, started: datetime) -> None:
    """done.json, last: the overrides it ran with, the objective a sweeper reads, and when and where it ran."""
    (job_dir / FAILED).unlink(missing_ok=True)
    write_json(job_dir / DONE, {"overrides": overrides, "objective": objective, "value": value,
                                "started": started.isoformat(timespec="milliseconds"),
                                "finished": datetime.now().isoformat(timespec="milliseconds"), "pid": os.getpid()})


def mark_failed(job_dir: Path, overrides: list[str], err: BaseException) -> None:
    """failed.json, best effort: when the failure is a full disk, the marker may not fit either, and the one
    line the user gets matters more than a traceback about the marker."""
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f"{last[0].filename}:{last[0].lineno}" if last else None
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        write_json(job_dir / FAILED, {"overrides": overrides, "error": f"{type(err).__name__}: {err}", "where": where})
    except OSError:
        pass


SWEEP = "sweep.json"  # at a sweep's root: its name, start, W&B group and swept keys (`sweep.SweepCallback`)


def read_sweep(sweep_dir: Path) -> dict:
    """The sweep's record, or {} where none was written."""
    return read_json(sweep_dir / SWEEP)


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoints the Trainer finished writing, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := _CHECKPOINT_RE.match(p.name)) and (p / CHECKPOINT_MARKER).exists()]
    return [p for _, p in sorted(found)]


def holds_run(run_dir: Path) -> bool:
    """Something a rerun could continue or mix with: a complete checkpoint, an adapter or training figures."""
    return bool(complete_checkpoints(run_dir / "checkpoints")) or (run_dir / "adapter").is_dir() \
        or (run_dir / "metrics.json").exists()


def finished_training(run_dir: Path) -> dict | None:
    """The training figures of a run whose training ended and was written (its adapter and metrics.json),
    else None: a resume of it goes straight to evaluation."""
    if (run_dir / "adapter" / "adapter_config.json").exists() and (run_dir / "metrics.json").exists():
        return read_json(run_dir / "metrics.json")
    return None


# Settings a resume may change, because they cannot change what was trained: how the trained model is
# evaluated (eval.*, except the accuracy during training, which can choose the best checkpoint), reported and
# logged; where to resume from; merging after training; data loader workers (the data order comes from the
# sampler, in the main process); labels (experiment_name, objective) and where builtin models are cached.
# Every other key (model.*, data.*, lora.*, trainer.*, grid) shapes the training and must be the same.
MAY_DIFFER = ("eval.", "report.", "logger.", "trainer.resume", "trainer.save_merged", "trainer.dataloader_num_workers",
              "experiment_name", "objective", "cache_dir", "adapter")
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


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote here (checkpoints, adapter, figures, plots), so a fresh start cannot
    mix with it. Hydra's `.hydra/` and log, and W&B's `wandb/`, stay."""
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for path in [*(run_dir / n for n in RUN_FILES), *run_dir.glob("*.png")]:
        path.unlink(missing_ok=True)


def discard_empty_run(run_dir: Path) -> bool:
    """Remove a run directory this process made that holds nothing of a run (only Hydra's files, a failure
    marker, the config it failed on): a run that failed before it began leaves nothing behind. True if removed."""
    kept = [run_dir / "eval_metrics.json", run_dir / "wandb"]
    if not run_dir.is_dir() or holds_run(run_dir) or any(p.exists() for p in kept):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


class RunLock:
    """One process per run directory, held while it works there: `filelock.FileLock`, an flock(2) on
    `.lock`, which the operating system releases when the holder dies (kill -9 included), so a lock left by
    a dead process never blocks a resume. Who holds it is written beside (`.lock.json`): a second process is
    told who, and a record left by a holder that died is recognised as stale and taken over."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.holder_file = run_dir / ".lock.json"
        self._lock: FileLock | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunDirBusy naming the holder; returns a note when a stale lock was taken over."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.run_dir / ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = read_json(self.holder_file)
            who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}" if holder
                   else "another process")
            raise RunDirBusy(f"{self.run_dir} is in use by {who}: wait for it to end, or give this run another "
                             f"hydra.run.dir") from None
        self._lock = lock
        stale = read_json(self.holder_file)
        write_json(self.holder_file, {"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": datetime.now().isoformat(timespec="seconds"),
                                      "command": " ".join(sys.argv)})
        if stale:
            return (f"took over the lock of {self.run_dir} left by pid {stale['pid']} on {stale['host']} "
                    f"(started {stale['started']}), which ended without releasing it")
        return None

    def release(self) -> None:
        if self._lock is not None:
            self.holder_file.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


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


def disk_full_line(run_dir: Path, reason: str) -> str:
    """One line after a write failed for lack of room: where, what a checkpoint takes (measured from the last
    complete one, which is kept), and that the same command resumes from it once there is room. A checkpoint
    left half-written is removed: it is not one, and it holds the room a resume needs."""
    complete = complete_checkpoints(run_dir / "checkpoints")
    last = complete[-1] if complete else None
    if (run_dir / "checkpoints").is_dir():
        for folder in (run_dir / "checkpoints").glob("checkpoint-*"):
            if folder.is_dir() and folder not in complete:
                shutil.rmtree(folder, ignore_errors=True)
    free = shutil.disk_usage(run_dir).free
    head = f"{reason} where {run_dir} is written ({mib(free)} free)"
    if last is None:
        return f"{head}; no checkpoint was complete yet. Free space and run the same command to start again"
    return (f"{head}; a checkpoint of this run takes {mib(size(last))}, and {last.name}, the last complete one, is "
            f"kept. Free space and run the same command: it resumes from {last.name}")


_GPU_LOCKS: list[FileLock] = []  # held for the life of the process: a worker keeps its GPU from job to job


def claim_gpu(sweep_dir: Path, count: int) -> int | None:
    """One of `count` GPUs for a job running beside others (a parallel launcher's worker process): the first whose
    lock in the sweep directory no other worker holds, or None when all are taken."""
    for index in range(count):
        lock = FileLock(sweep_dir / f".gpu-{index}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        _GPU_LOCKS.append(lock)
        return index
    return None
