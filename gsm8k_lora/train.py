"""Fine-tune with LoRA on GSM8K: `python -m gsm8k_lora.train [overrides]`.

Compose (Hydra) -> validate -> load data -> load model -> TRL SFTTrainer -> save adapter and metrics.
All training behaviour comes from `SFTConfig` fields set in `build_sft_config`; below the two
builders no code sees a DictConfig.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import tracking
from gsm8k_lora.config import Config, ConfigError, LoraConfig, TrainerConfig, register_configs, validate
from gsm8k_lora.data import DataError


def build_lora_config(cfg: LoraConfig):
    import peft

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    return peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           bias=cfg.bias, target_modules=targets, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)


def build_sft_config(cfg: TrainerConfig, out_dir: Path, report_to: list[str], run_name: str):
    """Every field set explicitly: SFTConfig's own defaults differ from the reference run."""
    from trl import SFTConfig

    early_stopping = cfg.early_stopping_patience is not None
    return SFTConfig(
        output_dir=str(out_dir), run_name=run_name, report_to=report_to, seed=cfg.seed, data_seed=cfg.seed,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length, completion_only_loss=cfg.completion_only_loss, assistant_only_loss=False,
        packing=cfg.packing, padding_free=cfg.padding_free, train_sampling_strategy=cfg.train_sampling_strategy,
        # transformers 5 renamed gradient_checkpointing; the new name wins over TRL's default of True
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        bf16=cfg.bf16, fp16=cfg.fp16, tf32=cfg.tf32, optim=cfg.optim, use_cpu=cfg.use_cpu,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        eval_strategy="steps", eval_steps=cfg.eval_steps, eval_on_start=cfg.eval_on_start,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early_stopping, metric_for_best_model=cfg.metric_for_best_model,
        greater_is_better="loss" not in cfg.metric_for_best_model,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=cfg.dataloader_num_workers,
        logging_nan_inf_filter=False,  # a NaN loss must reach the logs, where CheckpointGuard stops the run
        disable_tqdm=False,
    )


def check_hardware(cfg: Config) -> None:
    """Settings this machine cannot run, caught before anything is loaded."""
    cuda = torch.cuda.is_available() and not cfg.trainer.use_cpu
    if cfg.trainer.bf16 and not (cuda and torch.cuda.is_bf16_supported()):
        raise ConfigError("trainer.bf16=True is invalid: this machine has no bf16-capable CUDA GPU; "
                          "use trainer=cpu_smoke or trainer.bf16=false")
    if cfg.trainer.fp16 and not cuda:
        raise ConfigError("trainer.fp16=True is invalid: fp16 mixed precision needs a CUDA GPU")
    if cfg.trainer.tf32 and not cuda:
        raise ConfigError("trainer.tf32=True is invalid: TF32 needs an Ampere or newer CUDA GPU; set it to null")
    if cfg.model.load_in_4bit:
        from gsm8k_lora.model import four_bit_device

        four_bit_device(cfg.trainer.use_cpu)  # bitsandbytes installed, with kernels for this device


def run_name_from_overrides(overrides: list[str], fallback: str) -> str:
    """W&B run name from the command-line overrides, e.g. 'lora.r=16,trainer.learning_rate=1e-4'."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    return ",".join(keep) if keep else fallback


def stopped_at_once(job_dir: Path) -> str:
    return (f"stopped at once; checkpoints in {job_dir / 'checkpoints'} marked .complete can be resumed with the "
            f"same command and hydra.run.dir={job_dir}")


def main_guarded(cfg: DictConfig) -> float | None:
    """Validate, then run; expected failures become one line and a non-zero exit (in a sweep, the
    job is marked failed and Hydra goes on with the others)."""
    from hydra.types import RunMode

    from gsm8k_lora import jobs
    from gsm8k_lora.model import ModelLoadError
    from gsm8k_lora.resilience import RunStopped

    hydra_cfg = HydraConfig.get()
    job_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    done = jobs.completed(job_dir, overrides)
    if done is not None:
        print(f"skipping {job_dir}: completed before with the same overrides ({done['objective']}={done['value']})")
        return done["value"]
    def stop_now() -> None:  # a second signal in training, or Ctrl-C outside it: record the stop, say one line
        jobs.mark_failed(job_dir, overrides, RuntimeError("stopped at once"))
        print(stopped_at_once(job_dir), file=sys.stderr)

    try:
        config = validate(cfg)
        check_hardware(config)
        if multirun and config.logger.group is None:  # one W&B group per sweep: its directory name
            config.logger.group = Path(hydra_cfg.sweep.dir).name
        from gsm8k_lora.pipeline import run

        results = run(config, cfg, job_dir, run_name_from_overrides(overrides, config.experiment_name), stop_now)
    except (ConfigError, DataError, ModelLoadError, RunStopped) as err:
        jobs.mark_failed(job_dir, overrides, err)
        interrupted = isinstance(err, RunStopped) and err.exit_code > 100  # a signal stops a whole sweep too
        if multirun and not interrupted:
            raise
        label = "config error" if isinstance(err, ConfigError) else ("stopped" if interrupted else "error")
        print(f"{label}: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2 if isinstance(err, ConfigError) else 1))
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, evaluating): stop at once, in one line
        stop_now()
        sys.exit(130)
    except Exception as err:
        jobs.mark_failed(job_dir, overrides, err)
        raise
    value = results.get(config.objective)
    if tracking.is_main_process():
        jobs.mark_done(job_dir, overrides, config.objective, value)
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    start = time.perf_counter()
    result = main_guarded(cfg)
    print(f"done in {time.perf_counter() - start:.1f}s; config: {OmegaConf.select(cfg, 'experiment_name')}")
    return result


if __name__ == "__main__":
    from gsm8k_lora.cli import run

    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    run(main)  # a config mistake: one line, exit code 2
