"""The package's Trainer callbacks beside the library's: the terminal's progress, and GSM8K accuracy during
training.

- `TrainingProgress`: transformers' progress bars, with the latest loss in the bar instead of a printed dict
  for every log (the figures are in log_history.json and W&B).
- `GSM8KAccuracyCallback`: SFTTrainer evaluates loss only; this answers a fixed sample of validation
  questions at each evaluation and adds `eval_gsm8k_by_value` (and every other rule's accuracy) to the metrics
  before early stopping and best-checkpoint selection read them (it must come before EarlyStoppingCallback in
  the list), so `trainer.metric_for_best_model=eval_gsm8k_by_value` keeps the checkpoint that answers best.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.evaluation.scoring import accuracies, score


class TrainingProgress(ProgressCallback):
    """transformers' bars, named, with the loss shown in the training bar rather than printed as a dict."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("Training")

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        created = self.prediction_bar is None
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if created and self.prediction_bar is not None:
            self.prediction_bar.set_description("Validation loss")

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: f"{v:.4g}" for k in ("loss", "eval_loss") if isinstance(v := (logs or {}).get(k), float)}
        if state.is_world_process_zero and self.training_bar is not None and shown:
            self.training_bar.set_postfix(shown, refresh=False)


class GSM8KAccuracyCallback(TrainerCallback):
    def __init__(self, tokenizer, rows: list[dict], cfg: EvalConfig, system_prompt: str | None):
        self.tokenizer, self.rows = tokenizer, rows
        # the training prompt, greedy: comparable from step to step, and no shots to draw (lm-eval's need them)
        self.cfg = dataclasses.replace(cfg, num_samples=1, prompt=protocols.ZERO_SHOT_COT.name)
        self.prompts = [build_prompt(tokenizer, r["question"], self.cfg, [], system_prompt) for r in rows]
        self.trainer = None  # set once the trainer exists; used to log

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        was_training = model.training
        generations = generate(model, self.tokenizer, self.prompts, self.cfg, desc="GSM8K validation answers")
        if was_training:
            model.train()
        figures = accuracies(score(self.rows, generations, "during_training"), "eval")
        if metrics is not None:
            metrics.update(figures)  # the same dict the Trainer reads for best-metric and early stopping
        if self.trainer is not None:
            self.trainer.log(figures)
