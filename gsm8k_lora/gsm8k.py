"""GSM8K's answer format: pure functions, no I/O.

A GSM8K answer is a worked solution, one reasoning step a line, with calculator notes such as
`<<48/2=24>>`, and a last line `#### 72`. Rows from the wild break this in many ways, so parsing
returns None instead of raising, and the caller counts what it skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The gold number after the final marker: digits with optional sign, thousands commas and decimals.
_FINAL_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)\s*\.?\s*$")


@dataclass(frozen=True)
class GoldAnswer:
    solution: str  # the reasoning lines, without the final marker
    final: str  # the final number, normalised (no commas, no trailing ".0")
    num_steps: int  # reasoning lines before the final marker


def normalize_number(text: str) -> str:
    """'1,000' -> '1000', '18.0' -> '18', '-0' -> '0', '0.50' -> '0.5'."""
    text = text.replace(",", "").strip()
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def parse_answer(answer: str | None) -> GoldAnswer | None:
    """Split a GSM8K answer into its reasoning and final number, or None if it has no `#### N`."""
    if not isinstance(answer, str):
        return None
    head, sep, tail = answer.strip().rpartition("####")
    if not sep:
        return None
    match = _FINAL_RE.search("####" + tail)
    if match is None:
        return None
    solution = head.rstrip()
    steps = [line for line in solution.splitlines() if line.strip()]
    return GoldAnswer(solution=solution, final=normalize_number(match.group(1)), num_steps=len(steps))


def row_problem(row: dict) -> str | None:
    """Why a raw row cannot be used (a short reason), or None if it is a valid GSM8K row."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        return "empty question"
    if parse_answer(row.get("answer")) is None:
        return "answer without a final '#### <number>' line"
    return None
