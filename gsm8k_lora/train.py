"""Fine-tune with LoRA on GSM8K and measure what it bought: `python -m gsm8k_lora.train [overrides]`.

The command: its door (`cli.py`) composes the config once and answers before the libraries are imported (they
take ~8 s): `--help`, and in one line with exit code 2 any config mistake or anything this machine cannot do. A
single run is checked here and holds its run directory before Hydra writes into it; a sweep's jobs are checked by
its callback before the first starts (`sweep.py`). Each job is the recipe (`recipe.py`, steps 3 to 8) in its run
directory; `failures.job` says every failure's line and exit code.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import cli, failures, naming, parallel, sweep
from gsm8k_lora.config import CONF_DIR, Config, register_configs
from gsm8k_lora.errors import ConfigError, DataError, ModelLoadError, RunDirBusy
from gsm8k_lora.model import files as model_files
from gsm8k_lora.rundir import RunDirectory, read_sweep

HELP_OVERRIDES = (
    ("lora.r=16 lora.alpha=32", "the adapter's rank and scale (alpha / r)"),
    ("trainer.learning_rate=1e-4", "the learning rate (the reference run's: 2e-4)"),
    ("trainer.num_train_epochs=1", "epochs (trainer.max_steps=N stops earlier)"),
    ("eval.limit=200", "answer at most 200 test questions (all 1,319 by default)"),
    ("hydra.run.dir=outputs/runs/mine", "the run directory; the same command again resumes it"),
)


def help_text() -> str:
    options = cli.group_options(CONF_DIR)
    listed = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    defaults = {k: v for item in listed if isinstance(item, dict) for k, v in item.items()}
    width = max(len(g) for g in options)
    groups = [f"  {g:{width}s}  " + ", ".join(f"{o} (default)" if o == defaults.get(g) else o for o in opts)
              for g, opts in options.items()]
    overrides = [f"  {o:34s} {what}" for o, what in HELP_OVERRIDES]
    return "\n".join([
        "usage: python -m gsm8k_lora.train [group=option ...] [key=value ...]",
        "",
        "Fine-tunes a model with LoRA on GSM8K (TRL's SFTTrainer), then answers GSM8K test questions with the base",
        "model and the fine-tuned one and grades both; writes everything to a run directory and to W&B.",
        "The default is Falcon3-1B-Instruct on one CUDA GPU. On a CPU: experiment=smoke (make demo) or",
        "experiment=real_cpu (make real).",
        "",
        "config groups (group=option):", *groups,
        "",
        "overrides people use most:", *overrides,
        "",
        "a sweep: python -m gsm8k_lora.train -m trainer.learning_rate=1e-4,2e-4  (or make sweep)",
        "several GPUs: torchrun --nproc_per_node 8 -m gsm8k_lora.train hydra.run.dir=outputs/runs/NAME",
        "every key and its value: --cfg job;  Hydra's own help: --hydra-help;  the menu of the Makefile: make help",
    ])


def job(raw: DictConfig, config: Config | None = None, run_dir: RunDirectory | None = None) -> float | None:
    """One Hydra job: the recipe in its run directory, skipped where it finished before with the same overrides.
    A single run comes checked, its directory held, from the door; a sweep's job checks its own config."""
    hydra_cfg = HydraConfig.get()
    run_dir = run_dir or RunDirectory(Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task),
                                      command())
    started = datetime.now()
    value = run_job(raw, config, run_dir, hydra_cfg.mode == RunMode.MULTIRUN, started)
    print(f"done in {(datetime.now() - started).total_seconds():.1f}s; config: {raw.experiment_name}")
    return value


def run_job(raw: DictConfig, config: Config | None, run_dir: RunDirectory, multirun: bool,
            started: datetime) -> float | None:
    if multirun:
        parallel.join_submitit_task()  # a submitit job's tasks: one data-parallel run
    with parallel.quiet_replica(), failures.job(run_dir, multirun):
        run_dir.hold()
        if multirun:
            sweep.pin_gpu()
        done = run_dir.completed()
        if done is not None:
            print(run_dir.skip_line(done))
            return done["value"]
        if config is None:  # a sweep's job: its own config, as the launcher composed it
            config = cli.check_training([raw], run_dir.overrides, multirun)[0]
            problem = run_dir.rerun_problem(OmegaConf.to_container(raw, resolve=True), config.trainer.resume)
            if problem:
                raise RunDirBusy(problem)  # touches nothing: the directory is another run's
            check_resume(run_dir, config.trainer.resume)
        if config.trainer.resume == "never" and run_dir.holds_run():
            run_dir.clear()
            print(f"starting {run_dir.path} afresh (trainer.resume=never): its earlier checkpoints and results are "
                  f"deleted")
        from gsm8k_lora import recipe  # deferred: torch, transformers, TRL and PEFT, after the checks (see the top)

        results = recipe.run(config, raw, run_dir, job_naming(config, run_dir.overrides, multirun))
        value = results.get(config.objective)
        run_dir.mark_done(config.objective, value, started)  # rank 0's, after every rank has finished its share
        return value
    return None  # a sweep's job that failed or was refused: said in one line, and the sweep goes on


def job_naming(config: Config, overrides: list[str], multirun: bool) -> naming.RunNaming:
    """How this job reads on the dashboard: in a sweep, named by its swept values and grouped with the sweep
    (`sweep.json`, written when the sweep started); alone, named by the command line's own overrides."""
    record = read_sweep(Path(HydraConfig.get().sweep.dir)) if multirun else {}
    swept = record.get("swept") if multirun else None
    group = config.logger.group or (record.get("group") or Path(HydraConfig.get().sweep.dir).name if multirun else None)
    return naming.RunNaming(naming.run_name(overrides, swept, config.experiment_name), group, "train",
                            naming.tags(config),
                            naming.setting_name(overrides, swept, config.experiment_name) if multirun else None)


def command() -> str:
    """The command as typed (its launcher's part rebuilt, `parallel.command_line`). A submitit job's process was
    started by submitit on a pickled job: its command is the job's own overrides, run by the sweep."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return "submitit job of a sweep: " + shlex.join(["gsm8k_lora.train", *HydraConfig.get().overrides.task])
    return parallel.command_line("gsm8k_lora.train", sys.argv[1:])


def checked_job(composed: cli.Composed) -> Callable[[DictConfig], float | None]:
    """A single run, checked before anything loads: its config, and its run directory (no other run's, held by
    this process before Hydra writes its files there)."""
    config = cli.check_training([composed.task], composed.overrides)[0]
    run_dir = RunDirectory(composed.run_dir, composed.task_overrides, command())
    problem = run_dir.rerun_problem(OmegaConf.to_container(composed.task, resolve=True), config.trainer.resume)
    if problem:
        raise ConfigError(problem)
    check_resume(run_dir, config.trainer.resume)
    run_dir.hold()
    return partial(job, config=config, run_dir=run_dir)


def check_resume(run_dir: RunDirectory, resume: str) -> None:
    """What `trainer.resume=auto` reads of this directory, read first by its formats' readers: the adapter where
    training finished, else the last complete checkpoint. A damaged file is one line saying how to go on."""
    if resume != "auto" or run_dir.completed() is not None:  # a completed run is skipped: nothing is read
        return
    finished = run_dir.finished_training() is not None
    target = run_dir.path / "adapter" if finished else next(reversed(run_dir.checkpoints()), None)
    if target is None:
        return
    try:
        (model_files.check_adapter if finished else model_files.check_checkpoint)(target)
    except ModelLoadError as err:
        instead = "train again from its last checkpoint" if finished else "resume from the checkpoint before it"
        raise DataError(f"{err}; delete {target} to {instead}, or add trainer.resume=never to start afresh") from err


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    cli.command(sys.argv[1:], help_text(), job, checked_job)
