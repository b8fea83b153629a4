"""How a run reads on the W&B dashboard: its name, group, job type, tags and the flat settings people filter
and group by. Pure functions of the config and the command line (cheap to import: the door uses them too).

- Name: what tells the run apart. In a sweep, the swept values in short form (`lr=1e-4 epochs=2`); for a
  single run, the command line's own overrides without the constants every run of its kind shares (the
  experiment, the grid, hydra.* and logger.* settings); the experiment's name when nothing is left.
- Group: the sweep's name and start time (`lr_epochs 2026-12-01 18:30`), the same for every job of a multirun.
- Setting: in a sweep, the name without the seed (`lr=1e-4 epochs=2`), shared by a setting's seeds.
- Identifying settings: a flat block (lr, epochs, LoRA r / alpha / dropout, model, data, training rows, the
  evaluation's protocol and n, seed) beside the nested resolved config, because W&B's grouping and parallel
  coordinates work most simply on flat top-level keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora.config import Config

SHORT = {"trainer.learning_rate": "lr", "trainer.num_train_epochs": "epochs", "trainer.max_steps": "steps",
         "trainer.per_device_train_batch_size": "batch", "trainer.gradient_accumulation_steps": "accumulation",
         "trainer.warmup_steps": "warmup", "trainer.seed": "seed", "lora.r": "r", "lora.alpha": "alpha",
         "lora.dropout": "dropout", "eval.num_samples": "samples", "eval.prompt": "prompt"}
# Shared by every run of a kind, so they tell no run from another.
CONSTANTS = ("experiment", "grid.", "hydra.", "logger.", "report.")


@dataclass(frozen=True)
class RunNaming:
    name: str
    group: str | None
    job_type: str  # train | evaluate | sweep_summary
    tags: list[str] = field(default_factory=list)
    setting: str | None = None  # in a sweep, the swept values but the seed (`setting_name`): W&B groups seeds by it


def short(key: str) -> str:
    return SHORT.get(key, key)


def _value(text: str) -> str:
    """A swept value as a person reads it: an optimiser's 0.000316227766 as 3.16e-04, others as given."""
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.3g}" if len(text) > 8 and not text.isdigit() else text


def override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def run_name(overrides: list[str], swept: list[str] | None, fallback: str) -> str:
    """The W&B run name of a job with these (`hydra.overrides.task`) overrides; `swept`: the sweep's swept keys."""
    if swept:
        values = {override_key(o): o.partition("=")[2] for o in overrides}
        shown = [f"{short(k)}={_value(values[k])}" for k in swept if k in values]
        if shown:
            return " ".join(shown)
    own = [o for o in overrides if not override_key(o).startswith(CONSTANTS)]
    return " ".join(own) if own else fallback


SEED = "trainer.seed"  # a sweep's seeds (`grid.seeds`): runs of one setting, not settings of their own


def setting_name(overrides: list[str], swept: list[str] | None, fallback: str) -> str:
    """The setting a job ran: its run name without its seed, the same for each seed of the setting (W&B's
    `setting`, the comparison's `setting` column)."""
    return run_name([o for o in overrides if override_key(o) != SEED], [k for k in swept or [] if k != SEED],
                    fallback)


def swept_values(master: DictConfig) -> dict[str, list[str]] | None:
    """Each key's `key=value` overrides in the basic sweeper's order: the sweep file's params, then the command
    line, where a later override of the same key replaces the earlier, as in the sweeper. None when a value is
    not a list (a range or interval: another sweeper's search space)."""
    values: dict[str, list[str]] = {}
    for override in _final_overrides(master):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            return None
    return values


def swept_keys(master: DictConfig) -> list[str]:
    """The keys a sweep varies: more than one value, or a search space (Optuna's intervals)."""
    swept = {}
    for override in _final_overrides(master):
        key = override.get_key_element()
        many = override.is_sweep_override() and (not override.is_discrete_sweep()
                                                 or len(list(override.sweep_string_iterator())) > 1)
        swept[key] = many
    return [key for key, many in swept.items() if many]


def _final_overrides(master: DictConfig) -> list:
    params = OmegaConf.select(master, "hydra.sweeper.params")
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(master.hydra.overrides.task)
    return OverridesParser.create().parse_overrides(lines)


def adapter_artifact(group: str | None, run_id: str) -> str:
    """The W&B artifact name of a run's adapter: one per sweep (`adapter-lr_epochs-2026-12-01-18-30`), a version per
    job, so the sweep's best can carry the alias `best`; a single run's own (`adapter-<run id>`). W&B allows letters,
    digits, `-`, `_` and `.` in the name."""
    return "adapter-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", group).strip("-") if group else run_id)


def sweep_group(name: str, started: datetime) -> str:
    return f"{name} {started:%Y-%m-%d %H:%M}"


def sweep_name(master: DictConfig) -> str:
    """The sweep file's name (`lr_epochs`), or for a sweep typed on the command line, the experiment's."""
    config_name = OmegaConf.select(master, "hydra.job.config_name") or "config"
    return config_name if config_name != "config" else f"{OmegaConf.select(master, 'experiment_name')} sweep"


def model_name(name_or_path: str) -> str:
    """The model's short name: `Falcon3-1B-Instruct`, `SmolLM2-135M-Instruct`, `tiny`."""
    return name_or_path.removeprefix("builtin:").rstrip("/").rpartition("/")[2] or name_or_path


def tags(cfg: Config) -> list[str]:
    return list(dict.fromkeys([*cfg.logger.tags, cfg.experiment_name, model_name(cfg.model.name_or_path)]))


def scale_keys(scale: dict) -> dict:
    """The run's size as flat W&B config keys (`sft.scale_record`): runs on another number of GPUs sit apart."""
    return {key: scale[key] for key in ("processes", "nodes", "launcher", "global_batch")}


def identifying(cfg: Config, rows_train: int | None, eval_n: int | None) -> dict:
    """The flat settings a person filters and groups runs by; each names the nested key it copies."""
    data = cfg.data.source if cfg.data.source == "synthetic" else f"{cfg.data.source}:{Path(cfg.data.path).name}"
    return {
        "lr": cfg.trainer.learning_rate, "epochs": cfg.trainer.num_train_epochs, "max_steps": cfg.trainer.max_steps,
        "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
        "model": model_name(cfg.model.name_or_path), "load_in_4bit": cfg.model.load_in_4bit, "data": data,
        "rows_train": rows_train, "eval_prompt": cfg.eval.prompt, "eval_samples": cfg.eval.num_samples,
        "eval_n": eval_n, "seed": cfg.trainer.seed,
    }
