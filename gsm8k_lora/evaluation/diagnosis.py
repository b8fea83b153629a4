"""Why a graded answer is wrong: pure functions over one graded answer, written into each answer of
`predictions.jsonl` (`error_category`) and counted by the report.

- `prompt_did_not_fit`: its prompt left no room in the model's context, so it was never answered;
- `truncated`: it ran to the token limit, or to the model's last position, before stating an answer;
- `no_final_answer`: it stated none (no `#### N`, no "the answer is N"): the by-value rule fell back to the last
  number it wrote, which may be any number;
- `arithmetic_slip`: a calculation it wrote is false (`<<8*8=48>>`, `3 + 4 = 8`), read exactly;
- `wrong_plan`: the arithmetic holds, the final number is wrong (a misread question or a wrong plan).
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

from gsm8k_lora.data.gsm8k import to_value

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
    "prompt_did_not_fit": "not answered: the prompt left no room in the model's context",
    "truncated": "answer truncated by the token limit or the model's context",
    "no_final_answer": "no explicit final answer (no `#### N` nor final statement: by-value read its last number)",
    "arithmetic_slip": "arithmetic slip (a written calculation is false)",
    "wrong_plan": "right arithmetic, wrong final number (misread question or wrong plan)",
}


def error_category(answer: dict, max_new_tokens: int | None = None) -> str | None:
    """Why a graded answer is wrong; None if it is right. An answer says whether it ran to the token
    limit (`hit_token_limit`); `max_new_tokens` only serves answers written before it did."""
    if answer["correct"]:
        return None
    if answer.get("prompt_did_not_fit"):  # answers written before the context was checked lack it
        return "prompt_did_not_fit"
    hit = answer.get("hit_token_limit")
    if hit is None:
        hit = max_new_tokens is not None and answer["generated_tokens"] >= max_new_tokens
    if (hit or answer.get("stopped_at_context_end")) and not answer.get("explicit_answer"):
        return "truncated"
    if answer["pred"] is None or not answer.get("explicit_answer"):
        return "no_final_answer"
    if arithmetic_slips(answer["completion"]):
        return "arithmetic_slip"
    return "wrong_plan"
