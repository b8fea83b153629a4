"""Readings computed from a run's figures, for the report: pure functions, tested on known inputs.

- `read_learning_curve`: is validation loss still falling, flat, or rising while training falls?
- `error_breakdown`: the wrong answers by error category (each answer's, `evaluation/diagnosis.py`).
- `cost_usd`, `next_steps`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from gsm8k_lora import figures as F
from gsm8k_lora.evaluation.diagnosis import ERROR_CATEGORIES, error_category
from gsm8k_lora.figures import read

FLAT_PCT = 0.5  # a relative change of validation loss within +-0.5% over the window is a plateau


@dataclass(frozen=True)
class CurveReading:
    label: str  # still_improving | plateaued | overfitting | rising | too_short
    val_change_pct: float | None  # relative change of validation loss over the window, in %
    train_change_pct: float | None
    window_pct: float  # the last part of training the window covers, in % of steps
    sentence: str


def _window(points: list[tuple[int, float]], start_step: float) -> list[tuple[int, float]]:
    inside = [p for p in points if p[0] >= start_step]
    return inside if len(inside) >= 2 else points[-2:]


def _change_pct(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2 or points[0][1] == 0:
        return None
    return 100.0 * (points[-1][1] - points[0][1]) / points[0][1]


def read_learning_curve(train: list[tuple[int, float]], val: list[tuple[int, float]],
                        tail_fraction: float = 0.25) -> CurveReading:
    """Classify the end of training from the relative slope of validation loss over its last part."""
    if len(val) < 2:
        return CurveReading("too_short", None, None, 100 * tail_fraction,
                            "Too few validation points to read the learning curve.")
    last_step = val[-1][0]
    start = last_step * (1 - tail_fraction)
    val_win = _window(val, start)
    window_pct = 100.0 * (last_step - val_win[0][0]) / last_step if last_step else 100.0
    val_change = _change_pct(val_win)
    train_change = _change_pct(_window(train, val_win[0][0])) if train else None
    span = f"over the last {window_pct:.0f}% of steps"
    if val_change < -FLAT_PCT:
        return CurveReading("still_improving", val_change, train_change, window_pct,
                            f"Validation loss fell {-val_change:.1f}% {span}: still improving, more epochs may help.")
    if val_change > FLAT_PCT and train_change is not None and train_change < -FLAT_PCT:
        return CurveReading("overfitting", val_change, train_change, window_pct,
                            f"Validation loss rose {val_change:.1f}% {span} while training loss fell "
                            f"{-train_change:.1f}%: overfitting.")
    if val_change > FLAT_PCT:
        return CurveReading("rising", val_change, train_change, window_pct,
                            f"Validation loss rose {val_change:.1f}% {span}, and training loss did not fall: "
                            f"unstable training (learning rate too high?).")
    return CurveReading("plateaued", val_change, train_change, window_pct,
                        f"Validation loss changed {val_change:+.1f}% {span}: plateaued.")


def error_breakdown(answers: list[dict], max_new_tokens: int | None = None, examples: int = 3) -> dict:
    counts: dict[str, int] = {key: 0 for key in ERROR_CATEGORIES}
    shown: dict[str, list[dict]] = defaultdict(list)
    for answer in answers:
        category = answer["error_category"] if "error_category" in answer else error_category(answer, max_new_tokens)
        if category is None:
            continue
        counts[category] += 1
        if len(shown[category]) < examples:
            shown[category].append(answer)
    return {"counts": counts, "examples": dict(shown)}


def cost_usd(runtime_s: float, gpu_count: int, price_per_gpu_hour: float) -> tuple[float, float]:
    """(GPU-hours, cost) for `runtime_s` of wall time on `gpu_count` GPUs."""
    gpu_hours = runtime_s / 3600.0 * gpu_count
    return gpu_hours, gpu_hours * price_per_gpu_hour


def next_steps(curve: CurveReading, early_stopped: bool, evaluation: dict) -> list[str]:
    """Suggestions that follow from the figures; each says which figure it follows from."""
    out = []
    if curve.label == "still_improving" and not early_stopped:
        out.append(f"Train longer (more epochs): validation loss was still falling ({curve.val_change_pct:+.1f}%).")
    if curve.label == "overfitting":
        out.append("Train for fewer epochs or keep early stopping on: validation loss rose while training loss fell.")
    if curve.label == "rising":
        out.append("Lower the learning rate: validation loss rose without training loss falling.")
    pair = F.HEADLINE.pair
    diff, p = read(evaluation, F.paired(pair, "difference")), read(evaluation, F.paired(pair, "mcnemar_p"))
    if diff is not None and p is not None and p >= 0.05:
        out.append(f"Evaluate on more questions: the accuracy difference ({diff:+.1%}) is not significant (p={p:.2g}).")
    if diff is not None and diff < 0 and p is not None and p < 0.05:
        out.append("Fine-tuning lowered GSM8K accuracy: try a lower learning rate, fewer epochs or a smaller rank.")
    loops, base_loops = (read(evaluation, F.figure(model, "repetition_loop_rate")) for model in ("finetuned",
                                                                                                 "baseline"))
    if loops is not None and base_loops is not None and loops - base_loops >= 0.05:
        out.append(f"Fine-tuned answers fall into repetition loops more often ({loops:.0%} against {base_loops:.0%} "
                   f"before): read them in predictions.jsonl; a lower learning rate or more varied rows may help.")
    k = F.sampled_k(evaluation)
    maj = read(evaluation, F.figure("finetuned", F.majority(k))) if k else None
    greedy = read(evaluation, F.figure("finetuned", F.HEADLINE.figure))
    if maj is not None and greedy is not None and maj - greedy >= 0.02:
        out.append(f"Use self-consistency: majority vote beats greedy by {maj - greedy:+.1%}.")
    if not out:
        out.append("No figure points to an obvious change; a sweep over learning rate and epochs is the next step.")
    return out
