"""Typed schemas for every config group, registered with Hydra's ConfigStore.

Hydra checks key names and types against these dataclasses while it composes the config; the
`__post_init__` checks below add ranges and cross-field rules. `validate(cfg)` turns the composed
config into these objects, so a bad value fails here, before any model or data is loaded.
Defaults live in the YAML files under `conf/`; a field without a YAML value keeps the default here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that is out of range or inconsistent; its message is one line for the user."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, key, value, "allowed: " + ", ".join(map(str, choices)))


@dataclass
class PypiWeights:
    """A GGUF copy of a model shipped inside a PyPI wheel: for machines that reach PyPI but not the hub."""

    package: str = MISSING
    version: str = MISSING  # pinned, with the wheel's sha256
    sha256: str = MISSING
    gguf_member: str = MISSING  # the GGUF's path inside the wheel


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id, local directory, or "builtin:tiny"
    revision: str | None = None
    source: str = "hub"  # hub: name_or_path as given; pypi: the `pypi` copy; auto: the hub if reachable, else pypi
    gguf_file: str | None = None  # a .gguf file (or a file name inside the directory name_or_path)
    pypi: PypiWeights | None = None
    dtype: str = "auto"  # auto: bfloat16 on a bf16 GPU, else float32
    attn_implementation: str = "sdpa"
    load_in_4bit: bool = False  # QLoRA through bitsandbytes (CUDA; CPU where bitsandbytes has CPU kernels)
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    chat_template_path: str | None = None  # a .jinja file for tokenizers without a chat template
    trust_remote_code: bool = False
    tiny_seed: int = 0  # only for builtin:tiny

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path", self.name_or_path, "must not be empty")
        _check_choice("model.source", self.source, ("hub", "pypi", "auto"))
        _check(self.source == "hub" or self.pypi is not None, "model.source", self.source,
               "needs a model.pypi block (package, version, sha256, gguf_member); see conf/model/smollm2_135m.yaml")
        _check(not (self.gguf_file and self.load_in_4bit), "model.load_in_4bit", self.load_in_4bit,
               "must be false with model.gguf_file (a GGUF is dequantised to float32)")
        _check_choice("model.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        _check_choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        _check_choice("model.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))


@dataclass
class DataConfig:
    source: str = MISSING  # hub | local | synthetic
    path: str | None = None  # hub dataset id, or a local directory / file
    name: str | None = None  # hub config name ("main")
    val_fraction: float = 0.1
    split_seed: int = 42
    # null: no system message, so the chat template's own default applies (SmolLM2's inserts one, Falcon3's
    # none); a string (even "") replaces it. The report states which.
    system_prompt: str | None = None
    max_bad_fraction: float = 0.01  # share of malformed rows tolerated before the run fails
    train_limit: int | None = None  # keep only the first N training rows (after the split)
    val_limit: int | None = None  # validation loss during training on the first N validation rows; null: all
    # synthetic generator only
    num_train: int = 2000
    num_test: int = 200
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("hub", "local", "synthetic"))
        if self.source in ("hub", "local"):
            _check(bool(self.path), "data.path", self.path, f"required for data.source={self.source}")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", self.max_bad_fraction,
               "must be in [0, 1]")
        _check(self.train_limit is None or self.train_limit > 0, "data.train_limit", self.train_limit,
               "must be a positive integer or null")
        _check(self.val_limit is None or self.val_limit > 0, "data.val_limit", self.val_limit,
               "must be a positive integer or null")
        _check(self.num_train >= 10, "data.num_train", self.num_train, "must be at least 10")
        _check(self.num_test >= 1, "data.num_test", self.num_test, "must be at least 1")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    bias: str = "none"
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", self.r, "must be a positive integer")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be a positive integer")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check_choice("lora.bias", self.bias, ("none", "all", "lora_only"))
        _check(len(self.target_modules) > 0, "lora.target_modules", list(self.target_modules), "must not be empty")


@dataclass
class TrainerConfig:
    """Fields named as in trl.SFTConfig, so a TRL user knows them; every one is passed explicitly."""

    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0  # an integer count, or a ratio of total steps in [0, 1)
    weight_decay: float = 0.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_length: int | None = 1024
    completion_only_loss: bool = True
    packing: bool = False  # BFD packing, position ids reset per example (implies padding-free)
    padding_free: bool = False  # one flat sequence per batch, no pad tokens
    train_sampling_strategy: str = "random"  # group_by_length: batches of similar length, less padding
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    tf32: bool | None = None
    optim: str = "adamw_torch"
    use_cpu: bool = False
    logging_steps: int = 10
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: int | None = 2
    eval_on_start: bool = True
    early_stopping_patience: int | None = 5  # null: no early stopping
    metric_for_best_model: str = "eval_loss"
    dataloader_num_workers: int = 0
    seed: int = 42
    save_merged: bool = False  # also write adapter merged into the base weights
    resume: str = "auto"  # auto: from the run directory's last complete checkpoint, if any; never; or a path

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
        if self.early_stopping_patience is not None:
            # transformers keeps the best checkpoint by comparing saved steps with evaluated steps
            _check(self.save_steps % self.eval_steps == 0, "trainer.save_steps", self.save_steps,
                   f"must be a multiple of trainer.eval_steps={self.eval_steps} when early stopping is on")


@dataclass
class LoggerConfig:
    backend: str = "none"  # wandb | none
    project: str = "gsm8k-lora"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto: online when a W&B key is configured, else offline
    init_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check_choice("logger.backend", self.backend, ("wandb", "none"))
        _check_choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class EvalConfig:
    enabled: bool = True  # after training, answer the test questions with baseline and fine-tuned model
    split: str = "test"
    limit: int | None = None  # the first N questions; null: all
    prompt: str = "zero_shot_cot"  # zero_shot_cot | fewshot | lm_eval_gsm8k (chat, multi-turn) | lm_eval_gsm8k_plain
    num_fewshot: int = 5  # fewshot / lm_eval_gsm8k: examples from the train split
    batch_size: int = 32
    max_new_tokens: int = 320
    num_samples: int = 1  # > 1: self-consistency, sampled at `temperature` (maj@k, pass@k)
    temperature: float = 0.7
    compare_baseline: bool = True  # also answer with the adapter disabled
    during_training: bool = False  # at every evaluation, GSM8K accuracy on a fixed validation sample
    during_training_limit: int = 100  # size of that sample
    stop_sequences: list[str] = field(default_factory=lambda: ["Question:", "<|user|>", "\n\nQ:"])

    def __post_init__(self) -> None:
        _check_choice("eval.split", self.split, ("test", "validation"))
        _check(self.limit is None or self.limit > 0, "eval.limit", self.limit, "must be a positive integer or null")
        _check_choice("eval.prompt", self.prompt, ("zero_shot_cot", "fewshot", "lm_eval_gsm8k", "lm_eval_gsm8k_plain"))
        _check(self.num_samples == 1 or not self.prompt.startswith("lm_eval"), "eval.num_samples", self.num_samples,
               "must be 1 with an lm-eval prompt (lm-eval's gsm8k task decodes greedily)")
        _check(0 <= self.num_fewshot <= 16, "eval.num_fewshot", self.num_fewshot, "must be in [0, 16]")
        for key in ("batch_size", "max_new_tokens", "num_samples"):
            _check(getattr(self, key) > 0, f"eval.{key}", getattr(self, key), "must be a positive integer")
        _check(self.num_samples == 1 or self.temperature > 0, "eval.temperature", self.temperature,
               "must be positive when eval.num_samples > 1")
        _check(self.during_training_limit > 0, "eval.during_training_limit", self.during_training_limit,
               "must be a positive integer")


@dataclass
class ReportConfig:
    enabled: bool = True  # write report.md at the end of each run
    gpu_hour_price_usd: float = 2.5  # an assumption for the cost line; set it to what you pay

    def __post_init__(self) -> None:
        _check(self.gpu_hour_price_usd >= 0, "report.gpu_hour_price_usd", self.gpu_hour_price_usd, "must be >= 0")


@dataclass
class GridConfig:
    """Values the grid sweep files in sweeps/ read, so an experiment can scale a sweep to its setting."""

    epochs: str = "1,2,3"
    learning_rates: str = "1e-4,2e-4,5e-4"


OBJECTIVES = ("eval_loss_best", "eval_gsm8k_by_value_best", "finetuned_gsm8k_by_value")


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = MISSING
    adapter: str | None = None  # evaluate: a LoRA adapter directory or a run directory holding adapter/
    experiment_name: str = "default"
    objective: str = "eval_loss_best"  # what a run returns to a sweeper (Optuna)
    grid: GridConfig = field(default_factory=GridConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    cache_dir: str | None = None  # where builtin models are built; default ~/.cache/gsm8k_lora

    def __post_init__(self) -> None:
        generated = "gsm8k" in self.trainer.metric_for_best_model
        _check(not generated or self.eval.during_training, "trainer.metric_for_best_model",
               self.trainer.metric_for_best_model, "a generated-accuracy metric needs eval.during_training=true")
        _check(self.trainer.metric_for_best_model in ("eval_loss", "eval_gsm8k_by_value"),
               "trainer.metric_for_best_model", self.trainer.metric_for_best_model,
               "allowed: eval_loss, eval_gsm8k_by_value")
        _check(not (self.trainer.save_merged and self.model.load_in_4bit), "trainer.save_merged",
               self.trainer.save_merged, "must be false with model.load_in_4bit=true: merging re-quantises the "
               "weights and rounds most of the adapter away; merge the saved adapter into the bf16 base instead")
        _check_choice("objective", self.objective, OBJECTIVES)
        _check(self.eval.enabled or not self.objective.startswith("finetuned"), "objective", self.objective,
               "needs eval.enabled=true")
        _check(self.eval.during_training or not self.objective.startswith("eval_gsm8k"), "objective",
               self.objective, "needs eval.during_training=true")


def register_configs() -> None:
    """Register each schema as `base_<group>` so YAML files can start from it."""
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
