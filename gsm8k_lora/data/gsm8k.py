"""What the package knows of GSM8K's format, written once: pure functions, no I/O.

A GSM8K answer is a worked solution, one reasoning step a line, with calculator notes such as
`<<48/2=24>>`, and a last line `#### 72`. Everything that reads that format uses this module:
- the `#### N` rule (`FINAL_ANSWER`): the gold parse, the by-value strict grade, the stop once an
  answer line is complete, and the bench's count of tokens needed;
- numbers as values (`to_value`, `normalize_number`): `1,000` = `1000`, `18.00` = `$18` = `18`, `1/2` = `0.5`;
- where a model starts a turn it should not have written (`NEW_TURN_TEXT`, `TURN_MARKERS`).
lm-eval's own `gsm8k` patterns are lm-eval's, copied verbatim beside its rules in `evaluation/grading.py`.
Rows from the wild break the format in many ways, so parsing returns None instead of raising, and
the caller counts what it skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# A number as answers write it: sign, `$`, thousands commas, decimals, a fraction, or a bare `.5`.
NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+"
NUMBER_RE = re.compile(NUMBER)
# The final answer: `####`, any spacing, a number (group 1).
FINAL_ANSWER = re.compile(r"####\s*(" + NUMBER + ")")

# Text a model writes when it starts a new turn of its own: a next question in the few-shot format, or a
# turn marker typed out. Generation stops at these; grading ignores what follows any marker below.
NEW_TURN_TEXT = ("Question:", "<|user|>", "\n\nQ:")
# The same, plus chat templates' special turn tokens (which generation stops at by token id).
TURN_MARKERS = NEW_TURN_TEXT + ("<|im_end|>", "<|im_start|>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class GoldAnswer:
    solution: str  # the reasoning lines, without the final marker
    final: str  # the final number, normalised (no commas, no trailing ".0")
    num_steps: int  # reasoning lines before the final marker


def to_value(text: str | None) -> Fraction | None:
    """'$1,000.50' -> 1000.5, '1/2' -> 1/2, '018' -> 18; None if it is not a number."""
    if text is None:
        return None
    cleaned = re.sub(r"[\s$,%]", "", str(text)).rstrip(".")
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den))
        return Fraction(Decimal(cleaned))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def format_value(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    as_decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(as_decimal) == value:
        return format(as_decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def normalize_number(text: str | None) -> str | None:
    """'1,000' -> '1000', '18.0' -> '18', '-0' -> '0', '0.50' -> '0.5', '$18' -> '18'; None if not a number."""
    value = to_value(text)
    return None if value is None else format_value(value)


def same_number(pred: str | None, gold: str | None) -> bool:
    a, b = to_value(pred), to_value(gold)
    return a is not None and b is not None and a == b


def cut_at_new_turn(completion: str, markers: tuple[str, ...] = TURN_MARKERS) -> str:
    """The completion up to the first turn it should not have written."""
    cut = len(completion)
    for marker in markers:
        index = completion.find(marker)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def final_answer(text: str) -> re.Match | None:
    """The first `#### N` in `text`."""
    return FINAL_ANSWER.search(text)


def answer_line_complete(text: str) -> bool:
    """A `#### N` line has ended (a newline follows its number): nothing after it is part of the answer."""
    return any(re.match(r"\s*\n", text[m.end():]) for m in FINAL_ANSWER.finditer(text))


def parse_answer(answer: str | None) -> GoldAnswer | None:
    """Split a GSM8K answer into its reasoning and final number, or None if it has no `#### N` last line."""
    if not isinstance(answer, str):
        return None
    head, sep, tail = answer.strip().rpartition("####")
    if not sep:
        return None
    match = FINAL_ANSWER.match(sep + tail)
    if match is None or not re.fullmatch(r"\s*\.?\s*", tail[match.end() - len(sep):]):
        return None
    solution = head.rstrip()
    steps = [line for line in solution.splitlines() if line.strip()]
    return GoldAnswer(solution=solution, final=normalize_number(match.group(1)), num_steps=len(steps))


def format_answer(solution: str, final: int | str) -> str:
    """A GSM8K answer field: the worked solution, then the final `#### N` line."""
    return f"{solution}\n#### {final}"


def gold_number(answer: str) -> str | None:
    """GSM8K's answer field (with `#### N`) or a bare number, normalised."""
    parsed = parse_answer(answer)
    return parsed.final if parsed else normalize_number(answer.strip())


def row_problem(row: dict) -> str | None:
    """Why a raw row cannot be used (a short reason), or None if it is a valid GSM8K row."""
    question, answer = row.get("question"), row.get("answer")
    for name, value in (("question", question), ("answer", answer)):
        if value is not None and not isinstance(value, str):
            return f"{name} not text"
    if question is None or not question.strip():
        return "empty question"
    if parse_answer(answer) is None:
        return "answer without a final '#### <number>' line"
    return None
