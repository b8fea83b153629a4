"""The steps of one fine-tuning run, in order. The run directory is the unit of truth:

    config.yaml        resolved config          environment.json   versions, commit, command, device
    metrics.json       figures of this run      log_history.json   every logged step
    eval_metrics.json  GSM8K accuracy           predictions.jsonl  graded answers, baseline and fine-tuned
    adapter/           LoRA adapter + tokenizer loss.png           train and validation loss
    checkpoints/       Trainer checkpoints      wandb_run.txt      W&B link (or the sync command)
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import data, evaluate, plots, sources, tracking
from gsm8k_lora.config import Config
from gsm8k_lora.metrics import TOKEN_ACCURACY_NOTE, stop_reason, summarize_history
from gsm8k_lora.resilience import CheckpointGuard, RunStopped, oom_message, resume_checkpoint


def write_run_record(run_dir: Path, raw_cfg: DictConfig, weights: sources.Resolved) -> dict:
    resolved = OmegaConf.to_container(raw_cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")
    tracking.write_json(run_dir / "environment.json", {**tracking.environment(), "model_weights": weights.as_dict()})
    return resolved


def validation_for_loss(cfg: Config, splits: data.Splits):
    """The validation rows the loss is computed on during training: the first `data.val_limit` of the
    (shuffled) split, so evaluation cost is bounded on a CPU; the full split by default."""
    limit = cfg.data.val_limit
    return splits.validation if limit is None else splits.validation.select(range(min(limit, len(splits.validation))))


def format_for_sft(cfg: Config, splits: data.Splits, tokenizer) -> tuple:
    train = data.to_prompt_completion(splits.train, tokenizer, cfg.data.system_prompt)
    validation = data.to_prompt_completion(validation_for_loss(cfg, splits), tokenizer, cfg.data.system_prompt)
    return train, validation


def build_trainer(cfg: Config, model, tokenizer, splits: data.Splits, out_dir: Path, use_wandb: bool, name: str,
                  on_stop_now=None):
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from gsm8k_lora.callbacks import GSM8KAccuracyCallback, safe_wandb_callback
    from gsm8k_lora.train import build_lora_config, build_sft_config

    train_ds, val_ds = format_for_sft(cfg, splits, tokenizer)
    callbacks = [CheckpointGuard(out_dir, tracking.is_main_process(), on_stop_now)]
    if use_wandb:  # added here, not through report_to, so a W&B failure cannot end the run
        callbacks.append(safe_wandb_callback())
    if cfg.eval.during_training:  # before early stopping, which reads the metric it adds
        sample = splits.validation.select(range(min(cfg.eval.during_training_limit, len(splits.validation))))
        callbacks.append(GSM8KAccuracyCallback(tokenizer, sample.to_list(), cfg.eval, cfg.data.system_prompt))
    if cfg.trainer.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.trainer.early_stopping_patience))
    trainer = SFTTrainer(model=model, args=build_sft_config(cfg.trainer, out_dir, [], name),
                         train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                         peft_config=build_lora_config(cfg.lora), callbacks=callbacks)
    for callback in callbacks:
        if isinstance(callback, GSM8KAccuracyCallback):
            callback.trainer = trainer
    return trainer


def train(trainer, cfg: Config, run_dir: Path) -> None:
    """trainer.train(), resumed from the last complete checkpoint when there is one; a signal, a NaN
    or an out-of-memory error ends it with a message that says what to do."""
    import torch

    checkpoint = resume_checkpoint(cfg.trainer.resume, run_dir / "checkpoints")
    if checkpoint:
        print(f"resuming from {checkpoint}")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise RunStopped(oom_message(cfg)) from None
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CheckpointGuard))
    if guard.signal_name:
        typed = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "trainer.resume="))]
        command = shlex.join(["python", "-m", "gsm8k_lora.train", *typed])
        raise RunStopped(f"stopped by {guard.signal_name} at step {trainer.state.global_step}, checkpoint saved. "
                         f"Resume with: {command} hydra.run.dir={run_dir} trainer.resume=auto",
                         exit_code=130 if guard.signal_name == "SIGINT" else 143)


def collect_metrics(trainer, splits: data.Splits, cfg: Config) -> dict:
    state = trainer.state
    early = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "EarlyStoppingCallback"),
                 None)
    early_stopped = bool(early and cfg.trainer.early_stopping_patience
                         and early.early_stopping_patience_counter >= cfg.trainer.early_stopping_patience)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics = {
        **splits.stats,
        **summarize_history(state.log_history),
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "epochs": state.epoch,
        "tokens_seen": int(state.num_input_tokens_seen),
        "stop_reason": stop_reason(state.global_step, state.max_steps, early_stopped),
        "best_checkpoint": state.best_model_checkpoint,
        "trainable_params": trainable,
        "total_params": total,
        "token_accuracy_note": TOKEN_ACCURACY_NOTE,
    }
    return metrics


def write_training_results(trainer, splits: data.Splits, cfg: Config, run_dir: Path, name: str, wandb_run,
                           extra: dict | None = None) -> dict:
    """metrics.json, log_history.json and loss.png, written before evaluation so a failure there loses none."""
    metrics = {**collect_metrics(trainer, splits, cfg), **(extra or {})}
    history = trainer.state.log_history
    tracking.write_json(run_dir / "log_history.json", {"log_history": history})
    plots.loss_curves(history, run_dir / "loss.png", title=f"Loss: {name}")
    tracking.write_json(run_dir / "metrics.json", metrics)
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    return metrics


def run(cfg: Config, raw_cfg: DictConfig, run_dir: Path, name: str, on_stop_now=None) -> dict:
    """One run; returns its figures (metrics.json and eval_metrics.json together). `on_stop_now` is called
    when a second SIGINT/SIGTERM ends training at once."""
    from gsm8k_lora.model import load, resolve_dtype, weight_memory

    main_process = tracking.is_main_process()  # data-parallel: every rank trains, rank 0 writes and evaluates
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = data.build_splits(cfg.data)  # data problems surface before the model loads
    stats = splits.stats
    print(f"data: {stats['rows_train']} train / {stats['rows_validation']} validation / {stats['rows_test']} test "
          f"rows ({stats['rows_dropped_train'] + stats['rows_dropped_test']} malformed rows dropped)")
    eval_rows = evaluate.eval_rows(splits, cfg.eval) if cfg.eval.enabled else []
    weights_source = sources.resolve(cfg.model, cfg.cache_dir)  # fetched or converted first where needed
    resolved = write_run_record(run_dir, raw_cfg, weights_source) if main_process else {}
    model, tokenizer = load(cfg.model, cfg.cache_dir, use_cpu=cfg.trainer.use_cpu, resolved=weights_source)
    weights = weight_memory(model, resolve_dtype(cfg.model.dtype))  # before the adapter: base weights only
    weights.update(model_weights=weights_source.description,
                   rows_validation_loss=len(validation_for_loss(cfg, splits)),
                   system_prompt=data.describe_system_prompt(tokenizer, cfg.data.system_prompt))
    print(f"model: {weights_source.description}; system prompt: {weights['system_prompt']}")

    wandb_run = tracking.start_wandb(cfg.logger, run_dir, name, resolved) if main_process else None
    exit_code = 1
    try:
        trainer = build_trainer(cfg, model, tokenizer, splits, run_dir / "checkpoints", wandb_run is not None, name,
                                on_stop_now)
        train(trainer, cfg, run_dir)
        adapter_dir = run_dir / "adapter"
        trainer.save_model(str(adapter_dir))
        if not main_process:
            exit_code = 0
            return {}
        tokenizer.save_pretrained(adapter_dir)
        metrics = write_training_results(trainer, splits, cfg, run_dir, name, wandb_run, extra=weights)
        eval_figures = {}
        if eval_rows:  # GSM8K accuracy from generated answers, baseline and fine-tuned on the same questions
            shots = evaluate.shot_pool(splits, cfg.eval)
            eval_figures = evaluate.run_eval(cfg, trainer.model, tokenizer, eval_rows, shots, run_dir, adapters=True,
                                             wandb_run=wandb_run)
        if cfg.trainer.save_merged:  # last: merging folds the adapter into the base weights in place
            trainer.model.merge_and_unload().save_pretrained(run_dir / "merged")
            tokenizer.save_pretrained(run_dir / "merged")
        if cfg.report.enabled:
            from gsm8k_lora.report import write_report

            print(f"report: {write_report(run_dir, cfg.report.gpu_hour_price_usd, wandb_run)}")
        print_loss_summary(metrics, run_dir)
        exit_code = 0
        return {**metrics, **eval_figures}
    finally:
        tracking.finish_wandb(wandb_run, exit_code)


def print_loss_summary(metrics: dict, run_dir: Path) -> None:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    print(f"train loss: first {fmt('train_loss_first')} -> last {fmt('train_loss_last')}; "
          f"validation loss: first {fmt('eval_loss_first')} -> last {fmt('eval_loss_last')} "
          f"(best {fmt('eval_loss_best')}); stop: {metrics['stop_reason']} at step {metrics['steps']}")
    print(f"run directory: {run_dir}")
