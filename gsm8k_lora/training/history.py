"""Summaries of a Trainer's log history: pure functions over lists of dicts.

TRL logs `mean_token_accuracy`, the share of completion tokens whose top-1 next-token prediction
equals the label under teacher forcing. It is NOT GSM8K accuracy (which needs generated, graded
answers), so everything here calls it `token_accuracy`.
"""

from __future__ import annotations

import math

from gsm8k_lora import figures as F

TOKEN_ACCURACY_NOTE = ("token_accuracy is next-token accuracy under teacher forcing on the reference solution, "
                       "not GSM8K accuracy")


def series(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs for `key`, in logging order, skipping non-finite values."""
    return [(int(row.get("step", 0)), float(row[key])) for row in history
            if key in row and isinstance(row[key], (int, float)) and math.isfinite(row[key])]


def decrease_pct(first: float, last: float) -> float | None:
    """How much `last` is below `first`, in percent of `first` (negative: it rose)."""
    if first == 0:
        return None
    return 100.0 * (first - last) / first


def curve_summary(points: list[tuple[int, float]], name: str, lower_is_better: bool = True) -> dict:
    """A curve's figures (`figures.CURVES`): first, last, best and its step, and for a loss the decrease."""
    if not points:
        return {}
    values = [v for _, v in points]
    best = min(values) if lower_is_better else max(values)
    out = {F.curve(name, "first"): values[0], F.curve(name, "last"): values[-1], F.curve(name, "best"): best}
    if lower_is_better:
        out[F.curve(name, "decrease_pct")] = decrease_pct(values[0], values[-1])
    out[F.curve(name, "best_step")] = points[values.index(best)][0]
    return out


def summarize_history(history: list[dict]) -> dict:
    """Loss and token-accuracy figures, first/last/best, from `trainer.state.log_history`."""
    accuracy = F.figure(F.DURING_TRAINING, F.HEADLINE.figure)
    out: dict = {}
    out.update(curve_summary(series(history, "loss"), "train_loss"))
    out.update(curve_summary(series(history, "eval_loss"), "eval_loss"))
    out.update(curve_summary(series(history, accuracy), accuracy, lower_is_better=False))
    for logged, name in (("mean_token_accuracy", "train_token_accuracy"),
                         ("eval_mean_token_accuracy", "eval_token_accuracy")):
        points = series(history, logged)
        if points:
            out[F.curve(name, "first")], out[F.curve(name, "last")] = points[0][1], points[-1][1]
    final = next((row for row in reversed(history) if "train_runtime" in row), {})
    if final:
        out["train_runtime_s"] = final["train_runtime"]
        out["train_samples_per_s"] = final.get("train_samples_per_second")
    return out


def stop_reason(global_step: int, max_steps: int, early_stopped: bool) -> str:
    if early_stopped:
        return "early_stopping"
    return "completed" if global_step >= max_steps else "interrupted"
