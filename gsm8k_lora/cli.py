"""The door of the commands: what the user reads in the terminal before anything loads, and the one composition
of each command's config, which it then runs.

- `answer_help(text)`: `--help` / `-h` print the command's own page (Hydra's generic one lists schema nodes as
  options and takes seconds); `--hydra-help` stays Hydra's.
- `compose(argv)`: the config this command line composes, once: the run's, or a sweep's master. A mistake Hydra
  finds while composing (an unknown key or option, a value of the wrong type, bad override syntax), which Hydra
  reports in 8 to 13 lines offering the `base_*` schemas as options, becomes one `ConfigError` line that names
  the key and what is allowed.
- `check_training` / `check_evaluation`: a command's config validated (`config.validate`) and everything this
  machine cannot do for it (`preflight`), said at once; a sweep's `SweepCallback` runs them over every job before
  the first starts (`check_sweep`), a sweep's job over its own config.
- `command(...)`: the door of `train` and `evaluate`, then their job.
- `launch(composed, task)`: the composed config run as `@hydra.main` runs it (Hydra's run directory, `.hydra/`,
  job log, callbacks; a sweep's sweeper and launcher), without composing it again.

Why Hydra's private API: its public compose API (`hydra.compose`) knows no `--config-dir` and refuses sweep
overrides (`lr=1e-4,2e-4`), and `@hydra.main` composes by itself, after which a mistake is Hydra's many lines; so
the door makes the calls `@hydra.main` makes (`hydra._internal`: `Hydra.create_main_hydra2`, `compose_config`,
`run_job`, the sweeper, `load_sweep_config` and the basic sweeper's expansion). hydra-core is pinned below 1.4,
where those calls are what they are here; `test_cli_errors.py` holds the pin to that bound.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra import version
from hydra._internal.callbacks import Callbacks
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path, get_args_parser, run_and_report
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import configure_log, run_job, setup_globals
from hydra.errors import HydraException, MissingConfigException, OverrideParseException, SearchPathException
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from gsm8k_lora import hub, parallel, preflight
from gsm8k_lora.config import Config, validate
from gsm8k_lora.errors import EXPECTED, ConfigError, DataError, fail
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.model import files as model_files
from gsm8k_lora.naming import override_key, swept_values
from gsm8k_lora.rundir import resolve_adapter, run_directory

# The commands' config, as @hydra.main(config_path="../conf", config_name="config") finds it from this package.
CONFIG_PATH = "../conf"
CONFIG_NAME = "config"
VERSION_BASE = "1.3"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def command(argv: list[str], help_text: str, job: Callable[[DictConfig], Any],
            checked_job: Callable[[Composed], Callable[[DictConfig], Any]]) -> Any:
    """A Hydra command's door, then its job: `--help`; the config composed once and checked before anything loads
    (`checked_job`: the job, bound to what it checked, or ConfigError: one line, exit 2); then run by Hydra. A
    sweep's jobs are checked by its callback before the first starts, and each checks its own config (`job`).
    Under a launcher every process passes the door alike: rank 0 alone speaks (`parallel.quiet_replica`)."""
    answer_help(help_text, argv)
    with parallel.quiet_replica():
        return _command(argv, job, checked_job)


def _command(argv: list[str], job: Callable[[DictConfig], Any],
             checked_job: Callable[[Composed], Callable[[DictConfig], Any]]) -> Any:
    try:
        composed = compose(argv)
        if composed is None:  # Hydra answers --cfg, --info, --hydra-help itself
            return hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name=CONFIG_NAME)(job)()
        check_launch(composed)
        if composed.runs_jobs_here:  # before anything starts CUDA: a plain launch keeps to one GPU
            note = parallel.one_gpu(argv, f"gsm8k_lora.{Path(sys.argv[0]).stem}")
            if note:
                print(note, file=sys.stderr)
        if composed.multirun:
            return launch(composed, job)
        task = checked_job(composed)
        if hub.unreachable_note() and parallel.is_main_process():
            print(hub.unreachable_note(), file=sys.stderr)
    except EXPECTED as err:
        fail(err, quiet=not parallel.is_main_process())  # every rank met the same config: rank 0 says it
    return launch(composed, task)


def check_launch(composed: Composed) -> None:
    """Several processes launched together (torchrun, accelerate launch) run one run, never a sweep, and must agree
    on where it is written (Hydra's default directory is named by the second each process composed it in): the
    run's directory is required. Another rank than 0 writes none of Hydra's files (`.hydra/`, the job log)."""
    scale = parallel.scale()
    if scale.processes == 1:
        return
    if composed.multirun:  # every process would run the sweep's callback and each job's Hydra set-up
        raise ConfigError(f"-m (a sweep) is invalid with {parallel.describe(scale)}: launch a sweep once, and each of "
                          f"its jobs data-parallel through submitit: make sweep SWEEP=slurm (or slurm_local on this "
                          f"machine) ARGS=\"hydra.launcher.tasks_per_node={scale.processes}\"")
    if not any(override_key(o) == "hydra.run.dir" for o in composed.overrides):
        raise ConfigError(f"hydra.run.dir is required with {parallel.describe(scale)}: they must agree on the "
                          f"directory they write, and its default is named by the time each one starts; add "
                          f"hydra.run.dir=outputs/runs/NAME")
    if not parallel.is_main_process():
        with open_dict(composed.config):
            composed.config.hydra.output_subdir = None
            composed.config.hydra.job_logging = {"version": 1, "root": {"level": "ERROR", "handlers": []},
                                                 "disable_existing_loggers": False}


def answer_help(text: str, argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(text)
        sys.exit(0)


@dataclass
class Composed:
    app: Hydra  # Hydra's own app, holding the config loader; the global Hydra it set up stays until `launch` ends
    config_name: str
    multirun: bool
    config: DictConfig  # with its `hydra` node: the run's, or in a sweep the master
    overrides: list[str]  # the command line's overrides

    @property
    def task(self) -> DictConfig:
        """The config the task function receives: the composed one without its `hydra` node."""
        return task_config(self.config)

    @property
    def run_dir(self) -> Path:
        return Path(str(OmegaConf.select(self.config, "hydra.run.dir"))).absolute()

    @property
    def runs_jobs_here(self) -> bool:
        """Whether the jobs run in this process: a single run, or a sweep's with Hydra's basic launcher (a parallel
        or submitit launcher runs each job in a process of its own)."""
        launcher = str(OmegaConf.select(self.config, "hydra.launcher._target_") or "")
        return not self.multirun or launcher.endswith("BasicLauncher")

    @property
    def task_overrides(self) -> list[str]:
        """The overrides of the task's config (Hydra's own `hydra.*` ones aside), as a job records them."""
        return list(self.config.hydra.overrides.task)


def typed_keys(overrides: list[str]) -> list[str]:
    """The keys a command line sets (`+key=`, `~key` and `key=a,b` included), in its order."""
    return [override_key(o) for o in overrides]


def task_config(cfg: DictConfig) -> DictConfig:
    """The config the task function receives: the composed one without its `hydra` node, as Hydra gives it."""
    task = cfg.copy()
    with open_dict(task):
        task.pop("hydra", None)
    return task


def compose(argv: list[str]) -> Composed | None:
    """The config this command line composes, or None when Hydra answers it itself (`--cfg`, `--info`,
    `--hydra-help`, shell completion, HYDRA_FULL_ERROR=1: the command then hands it to `@hydra.main`).
    Raises ConfigError: one line."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.hydra_help or args.info or args.shell_completion or args.cfg or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None  # Hydra's own output and diagnostics, left untouched
    syntax = _syntax_problem(args.overrides)
    if syntax:
        raise ConfigError(syntax)
    setup_globals()  # Hydra's resolvers (`now`), as @hydra.main registers them
    version.setbase(VERSION_BASE)  # Hydra's defaults of that version, as @hydra.main(version_base=...) sets them
    app = None
    try:
        app = _hydra_app(args)
        name = args.config_name or CONFIG_NAME
        overrides = list(args.overrides)
        multirun = args.multirun or app.get_mode(config_name=name, overrides=overrides) == RunMode.MULTIRUN
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        # the override Hydra's own launch adds, so that .hydra/hydra.yaml reads as @hydra.main writes it
        config = app.compose_config(config_name=name, overrides=[*overrides, f"hydra.mode={mode.name}"],
                                    run_mode=mode)
        return Composed(app, name, multirun, config, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        GlobalHydra.instance().clear()
        raise ConfigError(describe(err, app)) from None


GRID = {"grid.epochs": "trainer.num_train_epochs", "grid.learning_rates": "trainer.learning_rate",
        "grid.seeds": "trainer.seed"}


def grid_problem(overrides: list[str]) -> str | None:
    """`grid.*` holds an experiment's default values for the sweep files; a comma list given for it is a sweep
    of the grid key itself (Hydra's reading), which trains none of the values asked for."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if key in GRID and override.is_sweep_override():
            return (f"{override.input_line} is invalid: it sweeps {key} itself; give the values as "
                    f"{GRID[key]}={override.input_line.partition('=')[2]} (it replaces the sweep file's)")
    return None


def check_training(jobs: list[DictConfig], overrides: list[str], multirun: bool = False) -> list[Config]:
    """Every job's config validated, and everything this machine cannot do for them, said once (ConfigError)."""
    problem = grid_problem(overrides)
    if problem:
        raise ConfigError(problem)
    configs = [validate(job) for job in jobs]
    ignored = next(filter(None, (protocols.get(c.eval.prompt).fixed_problem(typed_keys(overrides))
                                 for c in configs)), None)
    if ignored:
        raise ConfigError(ignored)
    found = list(dict.fromkeys(p for cfg in configs for p in preflight.problems(cfg)))  # once each, in order
    if found:
        raise ConfigError(preflight.message(found, sweep=multirun))
    for cfg in {repr((c.data, c.model, c.trainer.resume)): c for c in configs}.values():  # each set of files once
        preflight.check_files(cfg)
    return configs


# What an evaluation of a run directory takes from the run's own config.yaml unless the command line sets it.
RUN_KEYS = ("model", "data", "eval.prompt", "eval.num_fewshot")


def inherit_run_config(raw: DictConfig, overrides: list[str]) -> DictConfig:
    """Evaluate a run on what it was trained on: its model, data, prompt and system prompt, unless an
    override on the command line names them; an adapter is refused on any other base model."""
    run_dir = run_directory(raw.adapter)
    if run_dir is None:
        return raw
    run = read_run_config(run_dir / "config.yaml")
    given = typed_keys(overrides)
    merged = raw.copy()
    for key in RUN_KEYS:
        if any(g == key or key.startswith(g + ".") for g in given):  # replaced as a whole (model=tiny)
            continue
        OmegaConf.update(merged, key, OmegaConf.select(run, key), merge=True)
        for leaf in (g for g in given if g.startswith(key + ".")):  # model.dtype=...: the run's, but this key
            OmegaConf.update(merged, leaf, OmegaConf.select(raw, leaf), merge=False)
    for key in ("model.name_or_path", "model.gguf_file"):
        ours, theirs = OmegaConf.select(merged, key), OmegaConf.select(run, key)
        if ours != theirs:
            raise ConfigError(f"{key}={ours!r} is invalid: the adapter in {run_dir} was trained on {key}={theirs!r}; "
                              f"drop the model override to evaluate it on its own base model")
    return merged


def read_run_config(path: Path) -> DictConfig:
    """A run's config.yaml as OmegaConf reads it; DataError naming it where it is not a YAML mapping."""
    try:
        run = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as err:
        raise DataError(f"{path}: not a config this package wrote ({type(err).__name__}: {_first_line(err)})") from err
    if not isinstance(run, DictConfig):
        raise DataError(f"{path}: expected a YAML mapping of the run's settings, got {type(run).__name__}")
    return run


def check_evaluation(raw: DictConfig, overrides: list[str]) -> tuple[Config, DictConfig]:
    """The config to evaluate (a run's own where `adapter=` names one), validated, with everything this machine
    cannot do for it said at once (ConfigError)."""
    merged = inherit_run_config(raw, overrides)
    cfg = validate(merged)
    ignored = protocols.get(cfg.eval.prompt).fixed_problem(typed_keys(overrides))
    if ignored:
        raise ConfigError(ignored)
    adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
    found = preflight.problems(cfg, training=False)
    if found:
        raise ConfigError(preflight.message(found))
    if adapter:
        model_files.check_adapter(Path(adapter))
    preflight.check_files(cfg, training=False)
    return cfg, merged


def check_sweep(master: DictConfig) -> None:
    """Every value of every swept key, checked as its command checks a job's config, before the first job starts:
    jobs that try each value once (`sweep_jobs`), composed as the launcher will compose them (ConfigError)."""
    app = GlobalHydra.instance().hydra
    try:
        jobs = [task_config(app.config_loader.load_sweep_config(master, job)) for job in sweep_jobs(master)]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe(err, app)) from None
    jobs = jobs or [task_config(master)]
    overrides = list(master.hydra.overrides.task)
    if master.hydra.job.name == "evaluate":
        for job in jobs:
            check_evaluation(job, overrides)
    else:
        check_training(jobs, overrides, multirun=True)
    if hub.unreachable_note():
        print(hub.unreachable_note(), file=sys.stderr)


def launch(composed: Composed, task: Callable[[DictConfig], Any]) -> Any:
    """`task` run on the composed config as `@hydra.main` runs it (`Hydra.run` / `Hydra.multirun`, without their
    composing): a single run in `hydra.run.dir`, or a sweep through its sweeper and launcher, each job composed by
    them; Hydra's callbacks (the sweep's `SweepCallback`) around it."""
    cfg, name = composed.config, composed.config_name
    context = HydraContext(config_loader=composed.app.config_loader, callbacks=Callbacks(cfg))
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)

    def run() -> Any:
        if not composed.multirun:
            context.callbacks.on_run_start(config=cfg, config_name=name)
            ret = run_job(hydra_context=context, task_function=task, config=cfg, job_dir_key="hydra.run.dir",
                          job_subdir_key=None)
            context.callbacks.on_run_end(config=cfg, config_name=name, job_return=ret)
            return ret.return_value  # a job's unexpected exception, raised as Hydra raises it
        context.callbacks.on_multirun_start(config=cfg, config_name=name)
        sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context, task_function=task)
        returns = sweeper.sweep(arguments=OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
        context.callbacks.on_multirun_end(config=cfg, config_name=name)
        return returns

    try:
        return run_and_report(run)
    finally:
        GlobalHydra.instance().clear()


def _syntax_problem(overrides: list[str]) -> str | None:
    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_overrides([line])
        except OverrideParseException as err:
            return (f"{line} is invalid: {_first_line(err)}; allowed forms: key=value, group=option, "
                    f"+key=value, ~key")
    return None


def _hydra_app(args):
    search_path = create_automatic_config_search_path(__file__, None, args.config_path or CONFIG_PATH)
    if args.config_dir is not None:  # as Hydra adds --config-dir: ahead of the schemas
        config_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(config_dir):
            raise SearchPathException(f"--config-dir {args.config_dir} is invalid: no such directory")
        search_path.prepend(provider="command-line", path=f"file://{config_dir}",
                            anchor=SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name=Path(sys.argv[0]).stem, config_search_path=search_path)


def sweep_jobs(master) -> list[list[str]]:
    """Override lists that, between them, try every value of every swept key once (the first job of the
    grid, then one key changed at a time), as Hydra's basic sweeper expands them; [] for other sweepers,
    whose search spaces are not a list of values."""
    if OmegaConf.select(master, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return []
    values = swept_values(master)
    if values is None:
        return []
    first = [choices[0] for choices in values.values()]
    jobs = [first]
    for index, choices in enumerate(values.values()):
        jobs += [first[:index] + [choice] + first[index + 1:] for choice in choices[1:]]
    return jobs


def describe(err: Exception, app=None) -> str:
    """Hydra's or OmegaConf's composition error as one line that names the key and what is allowed."""
    cause = err.__cause__ if err.__cause__ is not None else err
    raised = _raised_within(err, ConfigError)
    if raised is not None:  # a resolver's own check (`config.seed_list`), already one line
        return str(raised)
    if isinstance(err, MissingConfigException):
        group, _, name = (err.missing_cfg_file or "").rpartition("/")
        options = err.options if err.options is not None else _options(app, group)
        what = f"{group}={name}" if group else f"--config-name {name}"
        return f"{what} is invalid: no such {'option' if group else 'config'}; allowed: {_join(options)}"
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key:
        parent, _, key = full_key.rpartition(".")
        if not _is_schema(cause.object_type):  # a mapping of the user's (model.hub_kernels): keys are added with +
            return f"{full_key} is invalid: {parent} has no key {key!r}; add one with +{full_key}=VALUE"
        keys = [f.name for f in dataclasses.fields(cause.object_type)]
        return f"{full_key} is invalid: {parent or 'the config'} has no key {key!r}; allowed: {_join(keys)}"
    if isinstance(cause, ValidationError) and full_key:
        kind = _field_type(cause.object_type, full_key.rpartition(".")[2])
        override = str(err).partition("Error merging override ")[2].strip() or full_key  # key=value as typed
        return f"{override} is invalid: {_first_line(cause)}" + (f"; allowed: {kind}" if kind else "")
    return "; ".join(line.strip() for line in str(err).splitlines()
                     if line.strip() and not line.lstrip().startswith(("See https", "Set the environment")))


def _raised_within(err: BaseException, kind: type) -> BaseException | None:
    """The exception of `kind` that `err` was raised from or while handling, if any (OmegaConf re-raises a resolver's
    error as its own, keeping it only in the chain)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _options(app, group: str) -> list[str]:
    if app is None:
        return []
    return app.config_loader.get_group_options(group, results_filter=ObjectType.CONFIG)


def _join(names: list[str]) -> str:
    # base_* are the schemas the YAML files start from, _dummy_* Hydra's own placeholder: not choices
    shown = [n for n in names if not n.startswith(("base_", "_dummy_"))]
    return ", ".join(shown) if shown else "(none found)"


def _is_schema(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _field_type(kind, key: str) -> str | None:
    if not _is_schema(kind):
        return None
    annotation = next((f.type for f in dataclasses.fields(kind) if f.name == key), None)
    if annotation is None:
        return None
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """Each config group's options, as files under conf/ (the schemas `base_*` are not options)."""
    return {group.name: sorted(p.stem for p in group.glob("*.yaml")) for group in sorted(conf_dir.iterdir())
            if group.is_dir()}
