"""Grade generated GSM8K answers: extract a final number, compare it with the gold by value.

The public API: `grade(completion, gold) -> Grade`, `extract_strict`, `extract_flexible`,
`same_number`. Pure functions, no model.

- strict: the number after the first `#### ` (lm-evaluation-harness's strict-match).
- flexible (the headline): the first `#### N`; else the last explicit final statement ("the answer
  is N", "Answer: N", `\\boxed{N}`, markdown bold allowed); else the last number in the text.
- Text after a hallucinated next turn ("Question:", a new user turn) is not part of the answer.
- Numbers compare by value: commas, `$`, `%`, units and trailing periods are ignored; 18 == 18.0
  == 018; 1/2 == 0.5; -0 == 0. A completion with no number is wrong, never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# Where the model starts a new turn it should not have written.
TURN_MARKERS = ("Question:", "<|user|>", "<|im_end|>", "<|im_start|>", "</s>", "\n\nQ:", "<|endoftext|>")

_NUM = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+"
NUMBER_RE = re.compile(_NUM)
STRICT_RE = re.compile(r"####\s*(" + _NUM + ")")
EXPLICIT_RES = (
    re.compile(r"\\boxed\{\s*(" + _NUM + r")"),
    re.compile(r"(?:final answer|the answer)\s*(?:is|=|:)\s*(?:equal to\s*)?(" + _NUM + ")", re.IGNORECASE),
    re.compile(r"(?:^|\n)\s*answer\s*:\s*(" + _NUM + ")", re.IGNORECASE),
)


@dataclass(frozen=True)
class Grade:
    pred: str | None  # the extracted answer (flexible), normalised, or None
    correct: bool  # flexible: the headline
    pred_strict: str | None
    correct_strict: bool
    explicit: bool  # the answer came from `####` or a final statement, not the last-number fallback


def cut_at_new_turn(completion: str, markers: tuple[str, ...] = TURN_MARKERS) -> str:
    cut = len(completion)
    for marker in markers:
        index = completion.find(marker)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


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


def _normalise(text: str | None) -> str | None:
    value = to_value(text)
    return None if value is None else format_value(value)


def extract_strict(completion: str) -> str | None:
    match = STRICT_RE.search(cut_at_new_turn(completion))
    return _normalise(match.group(1)) if match else None


def extract_explicit(completion: str) -> str | None:
    """`#### N`, else the last explicit final statement; None if the completion states no answer."""
    text = cut_at_new_turn(completion)
    strict = extract_strict(text)
    if strict is not None:
        return strict
    plain = text.replace("**", "").replace("__", "")
    hits = [(m.start(), m.group(1)) for pattern in EXPLICIT_RES for m in pattern.finditer(plain)]
    return _normalise(max(hits)[1]) if hits else None


def extract_flexible(completion: str) -> str | None:
    explicit = extract_explicit(completion)
    if explicit is not None:
        return explicit
    numbers = NUMBER_RE.findall(cut_at_new_turn(completion))
    return _normalise(numbers[-1]) if numbers else None


def same_number(pred: str | None, gold: str | None) -> bool:
    a, b = to_value(pred), to_value(gold)
    return a is not None and b is not None and a == b


def gold_number(answer: str) -> str | None:
    """GSM8K's answer field (with `#### N`) or a bare number."""
    from gsm8k_lora.gsm8k import parse_answer

    parsed = parse_answer(answer)
    return parsed.final if parsed else _normalise(answer.strip())


def grade(completion: str, gold: str) -> Grade:
    pred, strict = extract_flexible(completion), extract_strict(completion)
    return Grade(pred=pred, correct=same_number(pred, gold), pred_strict=strict,
                 correct_strict=same_number(strict, gold), explicit=extract_explicit(completion) is not None)
