"""The door of the entry points: what the user reads in the terminal when something is wrong, and nothing else.

- `run(main)`: a config mistake is one line and exit code 2 (below);
- `fail(err)`: an expected failure (`errors.py`) is one line and its exit code.
(Library noise is silenced in `gsm8k_lora/__init__.py`.)

Config mistakes:

Hydra finds some mistakes while it composes (a key the schema lacks, a config-group option with no
file, a value of the wrong type, bad override syntax) and reports each in 8 to 13 lines with exit
code 1, offering the `base_*` schemas as options. `run(main)` composes first, as `@hydra.main` will
(same search path, `--config-dir`, `--config-name` and overrides; in a multirun, every value of every
swept key), and turns such a mistake into `config error: <key> is invalid: ...; allowed: ...`.
Value ranges and cross-field rules are checked later, per job, by `config.validate`.

Hydra's public compose API knows no `--config-dir`, so this makes the calls `@hydra.main` makes itself
(`hydra._internal`; hydra-core is pinned below 1.4).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
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
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

# Both entry points decorate `main` with @hydra.main(config_path="../conf", config_name="config");
# this module sits beside them, so the relative path resolves to the same directory.
CONFIG_PATH = "../conf"
CONFIG_NAME = "config"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def run(main: Callable[[], object]) -> None:
    """Check what Hydra will compose from the command line, then hand over to the decorated `main`. The
    caller has run `config.register_configs()`: the schemas must be in Hydra's ConfigStore first."""
    problem = config_problem(sys.argv[1:])
    if problem is not None:
        print(f"config error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


def config_problem(argv: list[str]) -> str | None:
    """One line saying what is wrong with the config these arguments compose, or None."""
    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None  # Hydra's own help and diagnostics, left untouched
    syntax = _syntax_problem(args.overrides)
    if syntax:
        return syntax
    app = None
    try:
        app = _hydra_app(args)
        _compose_all(app, args)
    except (HydraException, OmegaConfBaseException) as err:
        return describe(err, app)
    except Exception:  # not a mistake this check knows: Hydra composes again below and reports it itself
        return None
    finally:
        GlobalHydra.instance().clear()  # @hydra.main initialises its own
    return None


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


def _compose_all(app, args) -> None:
    """The config of the run, or of the sweep and then of each value of each swept key."""
    name = args.config_name or CONFIG_NAME
    multirun = args.multirun or app.get_mode(config_name=name, overrides=list(args.overrides)) == RunMode.MULTIRUN
    if not multirun:
        app.compose_config(config_name=name, overrides=list(args.overrides), run_mode=RunMode.RUN)
        return
    master = app.compose_config(config_name=name, overrides=list(args.overrides), run_mode=RunMode.MULTIRUN)
    for job in sweep_jobs(master):
        app.config_loader.load_sweep_config(master, job)


def sweep_jobs(master) -> list[list[str]]:
    """Override lists that, between them, try every value of every swept key once (the first job of the
    grid, then one key changed at a time), as Hydra's basic sweeper expands them; [] for other sweepers,
    whose search spaces are not a list of values."""
    if OmegaConf.select(master, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return []
    params = OmegaConf.to_container(master.hydra.sweeper.params, resolve=True) if master.hydra.sweeper.params else {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(master.hydra.overrides.task)
    values: dict[str, list[str]] = {}  # a later override of the same key replaces the earlier, as in the sweeper
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
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
        keys = [f.name for f in dataclasses.fields(cause.object_type)] if _is_schema(cause.object_type) else []
        allowed = f"; allowed: {_join(keys)}" if keys else ""
        return f"{full_key} is invalid: {parent or 'the config'} has no key {key!r}{allowed}"
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

