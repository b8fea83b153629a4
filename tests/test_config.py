"""Every option composes; bad values fail with one clear line before any model loads."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gsm8k_lora.config import ConfigError, register_configs, validate
from gsm8k_lora.figures import HEADLINE
from tests.conftest import ROOT, run_cli

CONF = ROOT / "conf"
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ("model", "data", "lora", "trainer", "logger", "eval")}


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_reproduce_the_reference_run():
    cfg = validate(compose_cfg())
    assert cfg.model.name_or_path == "tiiuae/Falcon3-1B-Instruct"
    assert (cfg.data.path, cfg.data.name, cfg.data.val_fraction) == ("openai/gsm8k", "main", 0.1)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (8, 16, 0.1, "none")
    t = cfg.trainer
    assert (t.learning_rate, t.num_train_epochs, t.gradient_accumulation_steps) == (2e-4, 3, 1)
    assert (t.early_stopping_patience, t.metric_for_best_model, t.bf16) == (5, "eval_loss", True)
    assert cfg.logger.backend == "wandb"


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    extra = ["data.path=somewhere"] if (group, option) == ("data", "local") else []
    cfg = validate(compose_cfg(f"{group}={option}", *extra))
    assert getattr(cfg, group) is not None


def test_smoke_experiment_is_tiny_synthetic_cpu():
    cfg = validate(compose_cfg("experiment=smoke"))
    assert cfg.model.name_or_path == "builtin:tiny"
    assert cfg.data.source == "synthetic"
    assert cfg.trainer.use_cpu and not cfg.trainer.bf16
    assert cfg.experiment_name == "smoke"


def test_overrides_reach_the_typed_config():
    cfg = validate(compose_cfg("lora.r=16", "trainer.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]"))
    assert (cfg.lora.r, cfg.trainer.learning_rate, cfg.lora.target_modules) == (16, 1e-4, ["q_proj", "v_proj"])


# TrainerConfig fields named differently in SFTConfig (transformers 5 renamed gradient_checkpointing).
SFT_NAMES = {"gradient_checkpointing": "activation_checkpointing"}
# TrainerConfig fields that are not SFTConfig fields, and what reads them instead.
NOT_SFT = {"early_stopping_patience": "EarlyStoppingCallback (and load_best_model_at_end)",
           "save_merged": "train.run", "resume": "training.sft.train",
           "step_metrics": "training.sft.trainer_class (and include_num_input_tokens_seen)"}
# A value for every TrainerConfig field, each unlike SFTConfig's own default and valid together (on a CPU):
# a field the builder forgot to pass would show SFTConfig's default, not this value.
DISTINCT = {
    "num_train_epochs": 2.5, "max_steps": 7, "learning_rate": 3.3e-4, "lr_scheduler_type": "cosine",
    "warmup_steps": 3, "weight_decay": 0.01, "per_device_train_batch_size": 3, "per_device_eval_batch_size": 5,
    "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, "max_length": 512, "completion_only_loss": False,
    "packing": True, "padding_free": True, "train_sampling_strategy": "group_by_length",
    "gradient_checkpointing": False, "bf16": False, "fp16": True, "tf32": False, "optim": "sgd", "use_cpu": True,
    "logging_steps": 2, "eval_steps": 3, "save_steps": 6, "save_total_limit": 4, "eval_on_start": True,
    "early_stopping_patience": 2, "metric_for_best_model": f"eval_{HEADLINE.figure}", "dataloader_num_workers": 1,
    "ddp_timeout": 1234,
    "seed": 7, "save_merged": True, "resume": "never", "use_liger_kernel": True, "torch_compile": True,
    "step_metrics": False,
}


def sft_value(sft, field: str):
    value = getattr(sft, SFT_NAMES.get(field, field))
    return getattr(value, "value", value)  # SFTConfig turns some strings into enums (SchedulerType, OptimizerNames)


def trainer_fields() -> list[str]:
    import dataclasses

    from gsm8k_lora.config import TrainerConfig

    return [f.name for f in dataclasses.fields(TrainerConfig)]


def test_sft_config_holds_every_trainer_value_of_the_yaml(tmp_path):
    from omegaconf import OmegaConf

    from gsm8k_lora.training.sft import build_sft_config

    # cpu_smoke.yaml starts from default.yaml and sets what differs: the values, read from the two files
    yaml_values = {**OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml")),
                   **OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "cpu_smoke.yaml"))}
    sft = build_sft_config(validate(compose_cfg("experiment=smoke")).trainer, tmp_path, "x")
    for field in trainer_fields():
        if field in NOT_SFT:
            continue
        assert sft_value(sft, field) == yaml_values[field], field


def test_sft_config_takes_every_trainer_field(tmp_path):
    import dataclasses

    from trl import SFTConfig

    from gsm8k_lora.training.sft import build_sft_config

    assert set(DISTINCT) == set(trainer_fields()), "give DISTINCT a value for each TrainerConfig field"
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    assert not set(NOT_SFT) & sft_fields
    cfg = validate(compose_cfg("experiment=smoke", "eval.during_training=true",
                               *(f"trainer.{k}={v}" for k, v in DISTINCT.items())))
    assert {k: getattr(cfg.trainer, k) for k in DISTINCT} == DISTINCT
    sft = build_sft_config(cfg.trainer, tmp_path, "x")
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    for field, value in DISTINCT.items():
        if field in NOT_SFT:
            continue
        default = defaults[SFT_NAMES.get(field, field)]
        assert getattr(default, "value", default) != value, f"{field}: pick a value unlike SFTConfig's default"
        assert sft_value(sft, field) == value, field
    # what the builder sets from no single field, or always
    assert sft.load_best_model_at_end is True and sft.greater_is_better is True  # patience set; an accuracy
    assert sft.data_seed == 7 and sft.activation_checkpointing_kwargs is None
    assert (sft.output_dir, sft.run_name, sft.report_to) == (str(tmp_path), "x", [])
    assert [sft_value(sft, k) for k in ("logging_strategy", "eval_strategy", "save_strategy")] == ["steps"] * 3
    assert sft.logging_first_step is True and sft.logging_nan_inf_filter is False
    # without step metrics the tokens seen are counted by QuietSFTTrainer, not read back at every step
    assert sft.assistant_only_loss is False and sft.include_num_input_tokens_seen == "no"


def test_sft_config_follows_early_stopping_and_checkpointing(tmp_path):
    from gsm8k_lora.training.sft import build_sft_config

    off = validate(compose_cfg("experiment=smoke", "trainer.early_stopping_patience=null",
                               "trainer.gradient_checkpointing=true")).trainer
    sft = build_sft_config(off, tmp_path, "x")
    assert sft.load_best_model_at_end is False and sft.greater_is_better is False  # eval_loss: lower is better
    assert sft.activation_checkpointing is True and sft.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_lora_config_takes_every_value(tmp_path):
    from gsm8k_lora.training.sft import build_lora_config

    cfg = validate(compose_cfg("experiment=smoke", "lora.r=4", "lora.alpha=32", "lora.dropout=0.05",
                               "lora.bias=lora_only", "lora.use_rslora=true", "lora.use_dora=true"))
    lora = build_lora_config(cfg.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias, lora.use_rslora, lora.use_dora) == (
        4, 32, 0.05, "lora_only", True, True)
    assert lora.target_modules == "all-linear" and lora.task_type == "CAUSAL_LM"
    listed = build_lora_config(validate(compose_cfg("lora.target_modules=[q_proj,v_proj]")).lora)
    assert set(listed.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r"),
    ("lora.alpha=-1", "lora.alpha"),
    ("lora.dropout=1.0", "lora.dropout"),
    ("lora.bias=some", "lora.bias"),
    ("trainer.learning_rate=0", "trainer.learning_rate"),
    ("trainer.num_train_epochs=0", "trainer.num_train_epochs"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.save_steps=30", "trainer.save_steps"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("model.dtype=float8", "model.dtype"),
    ("logger.mode=sometimes", "logger.mode"),
    ("eval.prompt=three_shot", "eval.prompt"),
    ("eval.limit=0", "eval.limit"),
    ("eval.num_samples=4 eval.temperature=0", "eval.temperature"),
])
def test_invalid_values_fail_with_the_key_and_what_is_allowed(override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=smoke", *override.split()))
    message = str(err.value)
    assert key in message and "\n" not in message
    assert any(word in message for word in ("must", "allowed"))


def test_missing_local_path_is_reported():
    with pytest.raises(ConfigError, match="data.path"):
        validate(compose_cfg("data=local"))


@pytest.mark.parametrize("args, needle", [
    (["lora.r=0"], "lora.r=0 is invalid: must be a positive integer"),
    pytest.param(["trainer.bf16=true", "trainer.use_cpu=false"], "trainer.bf16=True needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is valid on a GPU")),
    (["lora.rr=8"], "lora.rr is invalid"),
    (["lora=nonexistent"], "allowed: attn_only, default, r16"),
    (["lora.r=eight"], "lora.r=eight is invalid"),
])
def test_cli_rejects_bad_config_before_loading_anything(tmp_path, args, needle):
    cache = tmp_path / "cache"
    proc = run_cli("train", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", *args,
                   env={"GSM8K_LORA_CACHE": str(cache)}, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not cache.exists(), "a model was built or loaded before the config was validated"
    assert not (Path(tmp_path / "run") / "metrics.json").exists()
