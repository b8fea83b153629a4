"""The translation from this package's config to TRL and PEFT, and the Trainer built from it.

`build_lora_config(cfg.lora) -> peft.LoraConfig` and `build_sft_config(cfg.trainer, ...) -> trl.SFTConfig`
are the one boundary between our config and the libraries: training, the benchmarks and the tests all
build through them. All training behaviour comes from `SFTConfig` fields, so a TRL user knows it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, TrainerCallback, TrainerState
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig

from gsm8k_lora import parallel
from gsm8k_lora.config import LoraConfig, TrainerConfig
from gsm8k_lora.data.formatting import to_prompt_completion
from gsm8k_lora.data.loading import Splits
from gsm8k_lora.errors import DiskFull, RunStopped
from gsm8k_lora.rundir import RunDirectory
from gsm8k_lora.stopping import STOP, Interrupted
from gsm8k_lora.training.callbacks import GSM8KAccuracyCallback, TrainingProgress
from gsm8k_lora.training.history import TOKEN_ACCURACY_NOTE, stop_reason, summarize_history
from gsm8k_lora.training.resilience import (
    CheckpointGuard,
    checkpoint_bytes,
    resume_checkpoint,
)
from gsm8k_lora.training.trainer import QuietSFTTrainer, SFTTrainer


def build_lora_config(cfg: LoraConfig) -> peft.LoraConfig:
    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    return peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           bias=cfg.bias, target_modules=targets, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)


def build_sft_config(cfg: TrainerConfig, out_dir: Path, run_name: str = "", report_to: list[str] | None = None,
                     **changes) -> SFTConfig:
    """Every field set explicitly (SFTConfig's own defaults differ from the reference run); `changes` are
    SFTConfig fields set last, for callers that must differ from a run in a stated way (the benchmarks)."""
    early_stopping = cfg.early_stopping_patience is not None
    fields = dict(
        output_dir=str(out_dir), run_name=run_name, report_to=report_to or [], seed=cfg.seed, data_seed=cfg.seed,
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
        use_liger_kernel=cfg.use_liger_kernel, torch_compile=cfg.torch_compile,
        bf16=cfg.bf16, fp16=cfg.fp16, tf32=cfg.tf32, optim=cfg.optim, use_cpu=cfg.use_cpu,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        eval_strategy="steps", eval_steps=cfg.eval_steps, eval_on_start=cfg.eval_on_start,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=early_stopping, metric_for_best_model=cfg.metric_for_best_model,
        greater_is_better="loss" not in cfg.metric_for_best_model,
        # without step metrics, QuietSFTTrainer counts the tokens seen itself, with no read in the step
        include_num_input_tokens_seen="non_padding" if cfg.step_metrics else "no",
        dataloader_num_workers=cfg.dataloader_num_workers,
        # data-parallel: every LoRA weight takes part in every forward, so DDP need not search for unused ones
        ddp_find_unused_parameters=False, ddp_timeout=cfg.ddp_timeout,
        logging_nan_inf_filter=False,  # a NaN loss must reach the logs, where CheckpointGuard stops the run
        disable_tqdm=False,
    )
    return SFTConfig(**{**fields, **changes})


def trainer_class(cfg: TrainerConfig) -> type[SFTTrainer]:
    """TRL's SFTTrainer, or without per-step figures the subclass that reads nothing back in a step."""
    return SFTTrainer if cfg.step_metrics else QuietSFTTrainer


def build_trainer(cfg: TrainerConfig, lora: LoraConfig, model, tokenizer, splits: Splits, system_prompt: str | None,
                  out_dir: Path, name: str, extra: list[TrainerCallback]) -> SFTTrainer:
    """SFTTrainer on the training rows in the model's chat template (loss on `splits.validation_loss`), with this
    package's callbacks; `extra` (W&B's, GSM8K accuracy during training) go before early stopping, which reads
    the metric accuracy adds."""
    train_ds = to_prompt_completion(splits.train, tokenizer, system_prompt)
    val_ds = to_prompt_completion(splits.validation_loss, tokenizer, system_prompt)
    # W&B's callback is added here, not through report_to, so a W&B failure cannot end the run
    callbacks: list[TrainerCallback] = [CheckpointGuard(out_dir), *extra]
    if cfg.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = trainer_class(cfg)(model=model, args=build_sft_config(cfg, out_dir, name), train_dataset=train_ds,
                                 eval_dataset=val_ds, processing_class=tokenizer, peft_config=build_lora_config(lora),
                                 callbacks=callbacks)
    for callback in extra:
        if isinstance(callback, GSM8KAccuracyCallback):
            callback.trainer = trainer  # it logs through the trainer
    if any(type(cb) is ProgressCallback for cb in trainer.callback_handler.callbacks):  # not in a notebook
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TrainingProgress())
    return trainer


def finished_at(checkpoint: Path, cfg: TrainerConfig) -> bool:
    """Whether training had ended when this checkpoint was written: its last step, or early stopping's."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    early = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback", {}).get("attributes", {})
    patience = cfg.early_stopping_patience
    return state["global_step"] >= state["max_steps"] or (
        patience is not None and early.get("early_stopping_patience_counter", 0) >= patience)


def restore_finished(trainer: SFTTrainer, checkpoint: Path) -> None:
    """The end of a training that had finished, from its checkpoint, instead of training on: the Trainer
    resumed from its last checkpoint trains one step past `max_steps`. The state, early stopping's count, and
    the adapter weights the end of training keeps (the best checkpoint's when early stopping is on)."""
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    weights = Path(best) if trainer.args.load_best_model_at_end and best and Path(best).is_dir() else checkpoint
    set_peft_model_state_dict(trainer.model, load_file(str(weights / "adapter_model.safetensors")))
    early = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)), None)
    saved = trainer.state.stateful_callbacks.get("EarlyStoppingCallback", {}).get("attributes", {})
    if early is not None and saved:
        early.early_stopping_patience_counter = saved.get("early_stopping_patience_counter", 0)


def planned_saves(trainer: SFTTrainer, cfg: TrainerConfig) -> int:
    """How many checkpoints this run keeps on disk at once: the save total limit, plus the one written before the
    oldest is removed, plus the best one when it is kept at the end; at most one a save of the whole run."""
    args = trainer.args
    steps = args.max_steps if args.max_steps > 0 else math.ceil(
        len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps * args.num_train_epochs)
    every = math.ceil(steps / cfg.save_steps) + 1  # and the last step's
    if cfg.save_total_limit is None:
        return every
    return min(every, cfg.save_total_limit + 1 + int(args.load_best_model_at_end))


def check_room(trainer: SFTTrainer, cfg: TrainerConfig, run_dir: RunDirectory) -> None:
    """Refuse, before training, a run whose checkpoints will not fit where it writes."""
    trainable, _ = trainer.model.get_nb_trainable_parameters()
    checkpoint = checkpoint_bytes(trainable, trainer.processing_class)
    problem = run_dir.room_problem(checkpoint, checkpoint - 8 * trainable, planned_saves(trainer, cfg))
    if problem:
        raise DiskFull(f"not enough disk for this run: {problem}")


def train(trainer: SFTTrainer, cfg: TrainerConfig, run_dir: RunDirectory, oom: str) -> None:
    """trainer.train(), resumed from the last complete checkpoint when there is one (or, where training had
    finished there, restored from it), after a check that its checkpoints fit on the disk. A signal stops it at
    the next safe point with a checkpoint saved; a NaN or an out-of-memory error ends it with a message that
    says what to do (`oom`)."""
    checkpoint = resume_checkpoint(cfg.resume, run_dir.path / "checkpoints")
    if checkpoint and finished_at(Path(checkpoint), cfg):
        print(f"training had finished at {checkpoint}: restored from it, not trained again")
        restore_finished(trainer, Path(checkpoint))
        return
    if parallel.is_main_process():
        check_room(trainer, cfg, run_dir)
    if checkpoint:
        print(f"resuming from {checkpoint}")
    guard = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CheckpointGuard))
    try:
        with STOP.safe_section():
            trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError:
        raise RunStopped(oom) from None
    except Interrupted as stop:  # between two batches of the validation loss: save what the steps did
        trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own save, as at a save step
        guard.mark(trainer.state.global_step)
        raise RunStopped(f"by {stop.signal_name} during the validation loss at step {trainer.state.global_step}, "
                         f"checkpoint saved (that step's validation loss is not computed). Resume with: "
                         f"{run_dir.resume_command()}", stop.exit_code) from None
    if STOP.requested:  # after a step: the Trainer saved a checkpoint of it
        raise RunStopped(f"by {STOP.signal_name} at step {trainer.state.global_step}, checkpoint saved. "
                         f"Resume with: {run_dir.resume_command()}", 130 if STOP.signal_name == "SIGINT" else 143)


def scale_record(cfg: TrainerConfig, scale: parallel.Scale) -> dict:
    """How large the run is: its processes, nodes and launcher, and the batch one optimizer step sees (`global_batch`:
    a process's batch x accumulation x processes), recorded in environment.json and on W&B. Another number of
    processes is another run: more or fewer rows a step, another number of steps and learning-rate schedule."""
    return {**scale.as_dict(), "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "global_batch": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * scale.processes}


def training_metrics(trainer: SFTTrainer, splits: Splits, cfg: TrainerConfig) -> dict:
    """The figures of `metrics.json` that training produced, with the run's scale."""
    state = trainer.state
    early = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStoppingCallback)), None)
    early_stopped = bool(early and cfg.early_stopping_patience
                         and early.early_stopping_patience_counter >= cfg.early_stopping_patience)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    batches = len(trainer.get_train_dataloader())  # this process's share of an epoch (the sampler shards it)
    return {
        **splits.stats,
        **scale_record(cfg, parallel.scale()),
        "steps_per_epoch": math.ceil(batches / cfg.gradient_accumulation_steps),
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
        # the most the GPU held at once while training (a CPU's memory is not counted here)
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
