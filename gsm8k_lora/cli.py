"""The door of the entry points: what the user reads in the terminal before anything loads, and when
something goes wrong.

- `answer_help(text)`: `--help` / `-h` print the command's own page (Hydra's generic one lists schema nodes as
  options and takes seconds); `--hydra-help` stays Hydra's.
- `compose(argv)`: the configs Hydra will compose from this command line: the run's, or in a sweep one per
  value of every swept key. A mistake Hydra finds while composing (an unknown key or option, a value of the
  wrong type, bad override syntax), which Hydra reports in 8 to 13 lines offering the `base_*` schemas as
  options, becomes one `ConfigError` line that names the key and what is allowed.
- `fail(err)`: an expected failure (`errors.py`) is one line on stderr and its exit code.
The entry points check the composed configs (`config.validate`, `preflight`) before they hand over to the
`@hydra.main` function, so a sweep that cannot run starts no job and writes nothing.

Why Hydra's private API: its public compose API (`hydra.compose`) knows no `--config-dir` and refuses sweep
overrides (`lr=1e-4,2e-4`), so checking every job of a sweep before it starts needs the calls `@hydra.main` makes
itself (`hydra._internal`: `Hydra.create_main_hydra2`, `compose_config`, `load_sweep_config`, the basic sweeper's
expansion). hydra-core is pinned below 1.4, where those calls are what they are here; `test_cli_errors.py`
holds the pin to that bound.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException, SearchPathException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from gsm8k_lora.errors import ConfigError
from gsm8k_lora.naming import override_key, swept_values

# Both entry points decorate `main` with @hydra.main(config_path="../conf", config_name="config");
# this module sits beside them, so the relative path resolves to the same directory.
CONFIG_PATH = "../conf"
CONFIG_NAME = "config"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def answer_help(text: str, argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(text)
        sys.exit(0)


@dataclass
class Composed:
    multirun: bool
    jobs: list[DictConfig]  # with their `hydra` node; `task_config` strips it, as Hydra does for the task
    overrides: list[str]  # the command line's overrides


def typed_keys(overrides: list[str]) -> list[str]:
    """The keys a command line sets (`+key=`, `~key` and `key=a,b` included), in its order."""
    return [override_key(o) for o in overrides]


def task_config(cfg: DictConfig) -> DictConfig:
    """The config the `@hydra.main` function receives: the composed one without its `hydra` node."""
    task = cfg.copy()
    with open_dict(task):
        task.pop("hydra", None)
    return task


def compose(argv: list[str]) -> Composed | None:
    """The configs this command line composes, or None when Hydra answers it itself (`--cfg`, `--info`,
    `--hydra-help`, shell completion, HYDRA_FULL_ERROR=1). Raises ConfigError: one line."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.hydra_help or args.info or args.shell_completion or args.cfg or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None  # Hydra's own output and diagnostics, left untouched
    syntax = _syntax_problem(args.overrides)
    if syntax:
        raise ConfigError(syntax)
    app = None
    try:
        app = _hydra_app(args)
        return _compose_all(app, args)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe(err, app)) from None
    finally:
        GlobalHydra.instance().clear()  # @hydra.main initialises its own


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


def _compose_all(app, args) -> Composed:
    """The config of the run; in a sweep, one config per value of every swept key."""
    name = args.config_name or CONFIG_NAME
    overrides = list(args.overrides)
    multirun = args.multirun or app.get_mode(config_name=name, overrides=overrides) == RunMode.MULTIRUN
    if not multirun:
        return Composed(False, [app.compose_config(config_name=name, overrides=overrides, run_mode=RunMode.RUN)],
                        overrides)
    master = app.compose_config(config_name=name, overrides=overrides, run_mode=RunMode.MULTIRUN)
    jobs = [app.config_loader.load_sweep_config(master, job) for job in sweep_jobs(master)]
    return Composed(True, jobs or [master], overrides)


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


def fail(err: BaseException) -> NoReturn:
    """An expected failure (`errors.EXPECTED`) as one line on stderr, and its exit code."""
    print(f"{err.label}: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


def group_options(conf_dir: Path) -> dict[str, list[str]]:
    """Each config group's options, as files under conf/ (the schemas `base_*` are not options)."""
    return {group.name: sorted(p.stem for p in group.glob("*.yaml")) for group in sorted(conf_dir.iterdir())
            if group.is_dir()}
