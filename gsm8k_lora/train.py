"""Fine-tune with LoRA on GSM8K and measure what it bought: `python -m gsm8k_lora.train [overrides]`.

This module is the command. Its door answers before the libraries are imported (they take ~8 s): `--help`,
and in one line with exit code 2 any config mistake or anything this machine cannot do, for every job of a
sweep before the first starts. `main` is Hydra's job: it keeps one process in a run directory, never lets a
rerun with other settings continue an earlier run, skips a finished job, marks a failed one, and hands the
run to the recipe (`recipe.py`, steps 3 to 8).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import setup_globals
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import cli, hub, naming, preflight, records
from gsm8k_lora.config import CONF_DIR, Config, register_configs, validate
from gsm8k_lora.errors import EXPECTED, ConfigError, DiskFull, RunDirBusy, stops_a_sweep
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.stopping import STOP, StopNow

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
        "every key and its value: --cfg job;  Hydra's own help: --hydra-help;  the menu of the Makefile: make help",
    ])


def rerun_problem(run_dir: Path, resolved: dict, resume: str) -> str | None:
    """Why this config may not continue the run already in `run_dir` (None: it may, or there is none)."""
    if resume != "auto" or not (run_dir / "config.yaml").exists() or not records.holds_run(run_dir):
        return None
    differ = records.training_differences(records.read_config(run_dir), resolved)
    if not differ:
        return None
    return (f"hydra.run.dir={run_dir} holds a run trained with other settings ({'; '.join(differ)}); to keep "
            f"both, give this run a new hydra.run.dir, or add trainer.resume=never to start {run_dir} afresh "
            f"(deleting its checkpoints and results)")


GRID = {"grid.epochs": "trainer.num_train_epochs", "grid.learning_rates": "trainer.learning_rate"}


def grid_problem(overrides: list[str]) -> str | None:
    """`grid.*` holds an experiment's default values for the sweep files; a comma list given for it is a sweep
    of the grid key itself (Hydra's reading), which trains none of the values asked for."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if key in GRID and override.is_sweep_override():
            return (f"{override.input_line} is invalid: it sweeps {key} itself; give the values as "
                    f"{GRID[key]}={override.input_line.partition('=')[2]} (it replaces the sweep file's)")
    return None


def check_configs(composed: cli.Composed) -> list[Config]:
    """Every job's config validated, and everything this machine cannot do for them, said once (ConfigError)."""
    problem = grid_problem(composed.overrides)
    if problem:
        raise ConfigError(problem)
    configs = [validate(cli.task_config(job)) for job in composed.jobs]
    ignored = next(filter(None, (protocols.get(c.eval.prompt).fixed_problem(cli.typed_keys(composed.overrides))
                                 for c in configs)), None)
    if ignored:
        raise ConfigError(ignored)
    found = list(dict.fromkeys(p for cfg in configs for p in preflight.problems(cfg)))  # once each, in order
    if found:
        raise ConfigError(preflight.message(found, sweep=composed.multirun))
    return configs


class Door:
    """What the command checks and holds before Hydra starts: in a single run, the run directory it will use
    (pinned on the command line, so Hydra picks the same one), no earlier run there with other settings, and
    the directory's lock, held until the process ends."""

    def __init__(self):
        self.run_dir: Path | None = None
        self.fresh = False  # this process made the run directory: remove it again if the run never began
        self.lock: records.RunLock | None = None

    def open(self, argv: list[str]) -> None:
        setup_globals()  # Hydra's resolvers (`now`), as @hydra.main registers them
        composed = cli.compose(argv)
        if composed is None:
            return
        configs = check_configs(composed)
        if hub.unreachable_note():
            print(hub.unreachable_note(), file=sys.stderr)
        if composed.multirun:
            return
        run_dir = Path(str(OmegaConf.select(composed.jobs[0], "hydra.run.dir"))).absolute()
        problem = rerun_problem(run_dir, OmegaConf.to_container(cli.task_config(composed.jobs[0]), resolve=True),
                                configs[0].trainer.resume)
        if problem:
            raise ConfigError(problem)
        if not any(a.startswith("hydra.run.dir=") for a in argv):
            sys.argv.append(f"hydra.run.dir={run_dir}")  # `${now:...}` could resolve to another second in Hydra
        self.run_dir, self.fresh = run_dir, not run_dir.exists()
        if records.is_main_process():  # data-parallel ranks share the directory; rank 0 holds it
            self.lock = records.RunLock(run_dir)
            note = self.lock.acquire()
            if note:
                print(note, file=sys.stderr)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


DOOR = Door()


def skip_line(job_dir: Path, done: dict) -> str:
    return (f"skipping {job_dir}: completed before with the same overrides ({done['objective']}={done['value']}); "
            f"to run it again, add trainer.resume=never (starts it afresh) or give another hydra.run.dir")


def stopped_at_once(job_dir: Path) -> str:
    return (f"stopped at once; checkpoints in {job_dir / 'checkpoints'} marked .complete can be resumed with the "
            f"same command and hydra.run.dir={job_dir}")


def job_naming(config: Config, overrides: list[str], multirun: bool) -> naming.RunNaming:
    """How this job reads on the dashboard: in a sweep, named by its swept values and grouped with the sweep
    (`sweep.json`, written when the sweep started); alone, named by the command line's own overrides."""
    sweep = records.read_sweep(Path(HydraConfig.get().sweep.dir)) if multirun else {}
    swept = sweep.get("swept") if multirun else None
    group = config.logger.group or (sweep.get("group") or Path(HydraConfig.get().sweep.dir).name if multirun else None)
    return naming.RunNaming(naming.run_name(overrides, swept, config.experiment_name), group, "train",
                            naming.tags(config))


def main_guarded(cfg: DictConfig) -> float | None:
    """One Hydra job: its run directory's bookkeeping around the recipe. An expected failure is one line and a
    non-zero exit; in a sweep the job is marked failed and the others go on (the sweep's end reports it)."""
    hydra_cfg = HydraConfig.get()
    job_dir, overrides = Path(hydra_cfg.runtime.output_dir).absolute(), list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    lock = None
    if DOOR.run_dir != job_dir and records.is_main_process():  # a sweep's job: its own directory's lock
        lock = records.RunLock(job_dir)
    try:
        if lock is not None:
            note = lock.acquire()
            if note:
                print(note, file=sys.stderr)
        return guarded_job(cfg, job_dir, overrides, multirun)
    except RunDirBusy as err:  # another process's directory, or another run's: nothing was touched
        if not multirun:
            cli.fail(err)
        print(f"job {job_dir.name} refused: {err}", file=sys.stderr)
        return None
    finally:
        if lock is not None:
            lock.release()


def gpu_count() -> int:
    """The machine's NVIDIA GPUs, asked of nvidia-smi: asking torch would start CUDA before a GPU is chosen."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def pin_gpu() -> None:
    """A job that a parallel launcher (SWEEP=parallel) runs beside others in a worker process of its own gets one
    GPU of its own on a multi-GPU machine, before anything starts CUDA (a process that sees several GPUs trains on
    all of them at once). Nothing when the user chose the GPUs, or with a single GPU or none."""
    launcher = str(OmegaConf.select(HydraConfig.get(), "launcher._target_") or "")
    if "joblib" not in launcher.lower() or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    count = gpu_count()
    gpu = records.claim_gpu(Path(HydraConfig.get().sweep.dir), count) if count > 1 else None
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        print(f"job {HydraConfig.get().job.num}: GPU {gpu} of {count}")


def guarded_job(cfg: DictConfig, job_dir: Path, overrides: list[str], multirun: bool) -> float | None:
    started = datetime.now()
    if multirun:
        pin_gpu()
    done = records.completed(job_dir, overrides)
    if done is not None:
        print(skip_line(job_dir, done))
        return done["value"]

    def stop_now() -> None:  # a second signal: record the stop, say one line
        records.mark_failed(job_dir, overrides, RuntimeError("stopped at once"))
        print(stopped_at_once(job_dir), file=sys.stderr)

    STOP.install(stop_now)  # the first SIGINT/SIGTERM stops at the next safe point, wherever the run is
    try:
        config = check_configs(cli.Composed(multirun, [cfg], overrides))[0]  # a sweep's job: the door saw a sample
        problem = rerun_problem(job_dir, OmegaConf.to_container(cfg, resolve=True), config.trainer.resume)
        if problem:
            raise RunDirBusy(problem)  # touches nothing: the directory is another run's
        if config.trainer.resume == "never" and records.holds_run(job_dir):
            records.clear_run(job_dir)
            print(f"starting {job_dir} afresh (trainer.resume=never): its earlier checkpoints and results are deleted")
        from gsm8k_lora import recipe  # deferred: torch, transformers, TRL and PEFT, after the checks (see the top)

        results = recipe.run(config, cfg, job_dir, job_naming(config, overrides, multirun))
    except RunDirBusy:
        raise
    except StopNow as stop:  # a signal outside any safe point (loading): nothing in flight to keep
        if not (not multirun and DOOR.fresh and records.discard_empty_run(job_dir)):
            records.mark_failed(job_dir, overrides, RuntimeError(str(stop)))
        print(f"{stop}; {stopped_at_once(job_dir)}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except EXPECTED as err:
        if not multirun and DOOR.fresh and records.discard_empty_run(job_dir):
            cli.fail(err)  # the run never began: nothing is left behind
        records.mark_failed(job_dir, overrides, err)
        if multirun and not stops_a_sweep(err):  # one line; the other jobs go on, and the sweep's end says it
            print(f"job {job_dir.name} failed: {err.label}: {err}", file=sys.stderr)
            return None
        cli.fail(err)
    except Exception as err:
        reason = records.no_room(err, job_dir)
        if reason is None:
            records.mark_failed(job_dir, overrides, err)
            raise
        full = DiskFull(records.disk_full_line(job_dir, reason))  # every later job would meet it too
        records.mark_failed(job_dir, overrides, full)
        cli.fail(full)
    finally:
        STOP.restore()
    value = results.get(config.objective)
    if records.is_main_process():
        records.mark_done(job_dir, overrides, config.objective, value, started)
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    start = time.perf_counter()
    result = main_guarded(cfg)
    print(f"done in {time.perf_counter() - start:.1f}s; config: {OmegaConf.select(cfg, 'experiment_name')}")
    return result


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    cli.answer_help(help_text())
    try:
        DOOR.open(sys.argv[1:])  # steps 1 and 2: compose and check, before anything loads
    except EXPECTED as error:
        cli.fail(error)
    try:
        main()
    finally:
        DOOR.close()
