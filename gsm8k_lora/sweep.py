"""A sweep as one thing: its start, which every job shares, and its end, the comparison built for the user.

A Hydra callback (`hydra.callbacks.sweep` in conf/config.yaml), so every multirun gets it, whatever its
sweeper or launcher:
- `on_multirun_start`: every job's config checked as its command checks it (`cli.check_sweep`): a sweep that
  cannot run is one line and exit code 2 before any job starts or anything is written; then `sweep.json` at the
  sweep's root: its name, start and W&B group (`lr_epochs 2026-12-01 18:30`), which every job reads, and which a
  sweep run again into the same directory keeps;
- `on_multirun_end`: from the jobs' directories alone, the comparison (`comparison.csv`, `comparison.md`, the
  plots it could draw, `report.md`), a W&B summary run in the sweep's group (the table and the plots), and the
  dashboard view (`tracking.save_view`); a sweep with failed jobs lists each with its reason and exits with 1.
A job that a parallel launcher runs beside others on a multi-GPU machine claims a GPU of its own (`pin_gpu`); a
submitit job of several tasks is one data-parallel run (`parallel.join_submitit_task`).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import cli, naming, parallel, tracking
from gsm8k_lora.config import LoggerConfig
from gsm8k_lora.errors import EXPECTED, fail
from gsm8k_lora.reporting.report import build_sweep
from gsm8k_lora.rundir import SWEEP, read_sweep, write_json, write_plots, write_text


def logger_config(config: DictConfig) -> LoggerConfig:
    return LoggerConfig(**OmegaConf.to_container(config.logger, resolve=True))


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            cli.check_sweep(config)
        except EXPECTED as err:
            fail(err)
        sweep_dir = Path(config.hydra.sweep.dir)
        if read_sweep(sweep_dir):
            return  # run again into the same directory: the same sweep, the same group
        started = datetime.now()
        name = naming.sweep_name(config)
        group = OmegaConf.select(config, "logger.group") or naming.sweep_group(name, started)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_json(sweep_dir / SWEEP, {"name": name, "started": started.isoformat(timespec="seconds"),
                                                    "group": group, "swept": naming.swept_keys(config)})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(p.is_dir() and p.name.isdigit() for p in sweep_dir.iterdir()):
            return  # no job ran
        text, files, plots, comparison = build_sweep(sweep_dir)
        for name, content in files.items():
            write_text(sweep_dir / name, content)
        drawn = write_plots(sweep_dir, plots)
        write_text(sweep_dir / "report.md", text)
        sweep = read_sweep(sweep_dir)
        tracking.log_sweep_summary(logger_config(config), sweep_dir, sweep, comparison, drawn)
        failed = [row for row in comparison.rows if row["status"] != "done"]
        print(f"sweep: {len(comparison.rows) - len(failed)} of {len(comparison.rows)} jobs done; comparison and "
              f"report in {sweep_dir}")
        if failed:
            for row in failed:
                print(f"  job {row['job']} {row['status']}: {row['error'] or 'no result (see its directory)'}",
                      file=sys.stderr)
            sys.exit(1)


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


def pin_gpu() -> None:
    """A sweep's job, in the process it runs in, before anything starts CUDA (a process that sees several GPUs would
    train on all of them with `nn.DataParallel`): a parallel launcher's worker (SWEEP=parallel) claims a GPU no other
    worker holds; any other job that is one process seeing several GPUs keeps to the first
    (`parallel.one_gpu`). Nothing when the job's tasks form a data-parallel group (each takes its local rank's GPU),
    or with a single GPU or none."""
    launcher = str(OmegaConf.select(HydraConfig.get(), "launcher._target_") or "")
    if "joblib" not in launcher.lower() or "CUDA_VISIBLE_DEVICES" in os.environ:
        note = parallel.one_gpu([], hint="one task a GPU: hydra.launcher.tasks_per_node=N with gpus_per_node=N")
        if note:
            print(note)
        return
    count = parallel.gpu_count()
    gpu = claim_gpu(Path(HydraConfig.get().sweep.dir), count) if count > 1 else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        print(f"job {HydraConfig.get().job.num}: GPU {gpu} of {count}")
