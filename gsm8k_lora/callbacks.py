"""GSM8K accuracy during training, beside the validation loss.

SFTTrainer evaluates loss only; this callback answers a fixed sample of validation questions at
each evaluation and adds `eval_gsm8k_by_value` to the metrics before early stopping and best-
checkpoint selection read them (it must come before EarlyStoppingCallback in the list), so
`trainer.metric_for_best_model=eval_gsm8k_by_value` keeps the checkpoint that answers best.
"""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.generation import build_prompt, generate


class GSM8KAccuracyCallback(TrainerCallback):
    def __init__(self, tokenizer, rows: list[dict], cfg: EvalConfig, system_prompt: str | None):
        self.tokenizer, self.rows = tokenizer, rows
        # the training prompt, greedy: comparable from step to step, and no shots to draw (lm-eval's need them)
        self.cfg = dataclasses.replace(cfg, num_samples=1, prompt="zero_shot_cot")
        self.prompts = [build_prompt(tokenizer, r["question"], self.cfg, [], system_prompt) for r in rows]
        self.trainer = None  # set by the pipeline once the trainer exists; used to log

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        from gsm8k_lora.evaluate import RULES, rate, score

        was_training = model.training
        generations = generate(model, self.tokenizer, self.prompts, self.cfg, desc="GSM8K validation answers")
        if was_training:
            model.train()
        records = score(self.rows, generations, "during_training")
        figures = {f"eval_{name}": rate(records, key) for key, name in RULES}
        figures["eval_answer_format_rate"] = rate(records, "explicit_answer")
        if metrics is not None:
            metrics.update(figures)  # the same dict the Trainer reads for best-metric and early stopping
        if self.trainer is not None:
            self.trainer.log(figures)


def safe_wandb_callback():
    """transformers' WandbCallback, except that a W&B failure mid-run (service crash, lost network,
    quota) turns W&B logging off with one line instead of ending the training: every figure is
    also written to the run directory."""
    import sys

    from transformers.integrations import WandbCallback

    class SafeWandbCallback(WandbCallback):
        failed = False

    def guarded(name: str):
        original = getattr(WandbCallback, name)

        def method(self, *args, **kwargs):
            if self.failed:
                return None
            try:
                return original(self, *args, **kwargs)
            except Exception as err:
                self.failed = True
                print(f"W&B failed ({type(err).__name__}: {err}); training goes on without W&B, and the run "
                      f"directory keeps every figure", file=sys.stderr)
                return None

        return method

    for name in ("setup", "on_train_begin", "on_train_end", "on_log", "on_save", "on_predict"):
        setattr(SafeWandbCallback, name, guarded(name))
    return SafeWandbCallback()
