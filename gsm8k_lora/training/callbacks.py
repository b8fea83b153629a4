"""GSM8K accuracy during training, beside the validation loss.

SFTTrainer evaluates loss only; this callback answers a fixed sample of validation questions at
each evaluation and adds `eval_gsm8k_by_value` (and every other rule's accuracy) to the metrics before
early stopping and best-checkpoint selection read them (it must come before EarlyStoppingCallback in the
list), so `trainer.metric_for_best_model=eval_gsm8k_by_value` keeps the checkpoint that answers best.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.evaluation.scoring import accuracies, score


class GSM8KAccuracyCallback(TrainerCallback):
    def __init__(self, tokenizer, rows: list[dict], cfg: EvalConfig, system_prompt: str | None):
        self.tokenizer, self.rows = tokenizer, rows
        # the training prompt, greedy: comparable from step to step, and no shots to draw (lm-eval's need them)
        self.cfg = dataclasses.replace(cfg, num_samples=1, prompt="zero_shot_cot")
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
