"""Every option composes; bad values fail with one clear line before any model loads."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gsm8k_lora.config import ConfigError, register_configs, validate
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


def test_sft_config_takes_every_value_from_the_config(tmp_path):
    from gsm8k_lora.train import build_lora_config, build_sft_config

    cfg = validate(compose_cfg("experiment=smoke", "trainer.learning_rate=3e-4", "lora.r=4"))
    sft = build_sft_config(cfg.trainer, tmp_path, [], "x")
    assert sft.learning_rate == 3e-4 and sft.gradient_checkpointing is False and sft.bf16 is False
    assert sft.completion_only_loss is True and sft.load_best_model_at_end is True
    assert sft.metric_for_best_model == "eval_loss" and sft.greater_is_better is False
    assert sft.report_to == [] and sft.max_steps == cfg.trainer.max_steps
    lora = build_lora_config(cfg.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias, lora.target_modules) == (
        4, 16, 0.1, "none", "all-linear")


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
    pytest.param(["trainer.bf16=true"], "trainer.bf16=True is invalid",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 is valid on a GPU")),
    (["lora.rr=8"], "rr"),
    (["lora=nonexistent"], "Available options"),
    (["lora.r=eight"], "lora.r"),
])
def test_cli_rejects_bad_config_before_loading_anything(tmp_path, args, needle):
    cache = tmp_path / "cache"
    proc = run_cli("train", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", *args,
                   env={"GSM8K_LORA_CACHE": str(cache)}, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not cache.exists(), "a model was built or loaded before the config was validated"
    assert not (Path(tmp_path / "run") / "metrics.json").exists()
