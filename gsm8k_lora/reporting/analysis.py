"""Readings computed from a run's figures, for the report: pure functions, tested on known inputs.

- `read_learning_curve`: is validation loss still falling, flat, or rising while training falls?
- `error_category`: why a wrong answer is wrong (format, truncation, arithmetic slip, wrong plan).
- `cost_usd`, `next_steps`.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

from gsm8k_lora.data.gsm8k import to_value

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


# `<<48/2=24>>` calculator notes and plain `48 / 2 = 24` statements.
_CALC_RES = (
    re.compile(r"<<\s*([-+*/().\d\s,]+?)\s*=\s*(-?[\d.,]+)\s*>>"),
    re.compile(r"(?<![\w.<])(\d[\d,]*(?:\.\d+)?(?:\s*[-+*/x×]\s*\d[\d,]*(?:\.\d+)?)+)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)"),
)
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def evaluate_expression(expr: str) -> Fraction | None:
    """+ - * / and parentheses over numbers, exactly (Fractions); None for anything else. Python's own
    parser reads the expression; only these node types are evaluated, so nothing is ever executed."""
    text = expr.replace(",", "").replace("×", "*").replace("x", "*")

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    try:
        return value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def arithmetic_slips(completion: str) -> list[str]:
    """Calculations written in the completion whose stated result is false."""
    slips = []
    for pattern in _CALC_RES:
        for expr, result in pattern.findall(completion):
            value, stated = evaluate_expression(expr), to_value(result)
            if value is not None and stated is not None and value != stated:
                slips.append(f"{expr.strip()}={result}")
    return slips


ERROR_CATEGORIES = {
    "truncated": "answer truncated by the token limit",
    "no_answer": "no extractable answer (format)",
    "arithmetic_slip": "arithmetic slip (a written calculation is false)",
    "wrong_plan": "right arithmetic, wrong final number (misread question or wrong plan)",
}


def error_category(record: dict, max_new_tokens: int | None = None) -> str | None:
    """Why a graded prediction is wrong; None if it is right. A record says whether it ran to the token
    limit (`hit_token_limit`); `max_new_tokens` only serves records written before it did."""
    if record["correct"]:
        return None
    hit = record.get("hit_token_limit")
    if hit is None:
        hit = max_new_tokens is not None and record["generated_tokens"] >= max_new_tokens
    if hit and not record.get("explicit_answer"):
        return "truncated"
    if record["pred"] is None or not record.get("explicit_answer"):
        return "no_answer"
    if arithmetic_slips(record["completion"]):
        return "arithmetic_slip"
    return "wrong_plan"


def error_breakdown(records: list[dict], max_new_tokens: int | None = None, examples: int = 3) -> dict:
    counts: dict[str, int] = {key: 0 for key in ERROR_CATEGORIES}
    shown: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        category = error_category(record, max_new_tokens)
        if category is None:
            continue
        counts[category] += 1
        if len(shown[category]) < examples:
            shown[category].append(record)
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
    diff, p = evaluation.get("paired_by_value_difference"), evaluation.get("paired_by_value_mcnemar_p")
    if diff is not None and p is not None and p >= 0.05:
        out.append(f"Evaluate on more questions: the accuracy difference ({diff:+.1%}) is not significant (p={p:.2g}).")
    if diff is not None and diff < 0 and p is not None and p < 0.05:
        out.append("Fine-tuning lowered GSM8K accuracy: try a lower learning rate, fewer epochs or a smaller rank.")
    loops = evaluation.get("finetuned_repetition_loop_rate")
    base_loops = evaluation.get("baseline_repetition_loop_rate")
    if loops is not None and base_loops is not None and loops - base_loops >= 0.05:
        out.append(f"Fine-tuned answers fall into repetition loops more often ({loops:.0%} against {base_loops:.0%} "
                   f"before): read them in predictions.jsonl; a lower learning rate or more varied rows may help.")
    maj = next((v for k, v in evaluation.items() if k.startswith("finetuned_gsm8k_maj@")), None)
    greedy = evaluation.get("finetuned_gsm8k_by_value")
    if maj is not None and greedy is not None and maj - greedy >= 0.02:
        out.append(f"Use self-consistency: majority vote beats greedy by {maj - greedy:+.1%}.")
    if not out:
        out.append("No figure points to an obvious change; a sweep over learning rate and epochs is the next step.")
    return out
