"""Grade generated GSM8K answers two ways, reported side by side.

lm-evaluation-harness's own `gsm8k` figures, computed exactly as lm-eval 0.4.13 computes them (its task YAML
`lm_eval/tasks/gsm8k/gsm8k.yaml`, `RegexFilter` in `lm_eval/filters/extraction.py`, `exact_match_hf_evaluate` in
`lm_eval/api/metrics.py`): a regex filter on the raw completion, then an exact string match against GSM8K's `answer`
field after both pass lm-eval's ignore-regexes.
- `lm_eval_strict_match`: the first `#### N`, with exactly one space and no `$` (`####18`, `#### $18` do not count).
- `lm_eval_flexible_extract`: the last number-like run (two or more of `$0-9.,`, or digits); a stray `..` counts.
- Strings, not values: `18.00`, `1,000.00` or a trailing `...` are wrong; `$18`, `1,000` and one trailing `.` are
  forgiven. No match gives lm-eval's "[invalid]", which never matches. Text after a stop sequence is not cut
  here: lm-eval cut it while generating (`protocols.lm_eval_truncate`).

The package's by-value rule (`grade`, `extract_by_value_strict`, `extract_by_value`; numbers compared by
`gsm8k.same_number`): a fairer reading of answers such as `18.00` or `$18`. Not lm-eval's rule, so not lm-eval's
names.
- by-value strict: the number after the first `####` (any spacing, `$` allowed).
- by-value flexible (the headline): the first `#### N`; else the last explicit final statement ("the answer is N",
  "Answer: N", `\\boxed{N}`, markdown bold allowed); else the last number in the text.
- Text after a hallucinated next turn ("Question:", a new user turn) is not part of the answer.
- Numbers compare by value: commas, `$`, `%`, units and trailing periods are ignored; 18 == 18.0 == 018;
  1/2 == 0.5; -0 == 0. A completion with no number is wrong, never an error.

Pure functions, no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from gsm8k_lora.data.gsm8k import FINAL_ANSWER, NUMBER, NUMBER_RE, cut_at_new_turn, normalize_number, same_number
from gsm8k_lora.figures import GRADED

# Explicit final statements, for answers without a `#### N` line.
EXPLICIT_RES = (
    re.compile(r"\\boxed\{\s*(" + NUMBER + r")"),
    re.compile(r"(?:final answer|the answer)\s*(?:is|=|:)\s*(?:equal to\s*)?(" + NUMBER + ")", re.IGNORECASE),
    re.compile(r"(?:^|\n)\s*answer\s*:\s*(" + NUMBER + ")", re.IGNORECASE),
)

# lm-eval's `gsm8k` task, copied verbatim from its YAML (task version 3.0): the two filters' patterns, the
# filters' fallback, and exact_match's `regexes_to_ignore`, which it applies in this order to both strings.
LM_EVAL_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
LM_EVAL_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_FALLBACK = "[invalid]"
LM_EVAL_REGEXES_TO_IGNORE = (",", r"\$", "(?s).*#### ", r"\.$")


class LmEvalVerdict(NamedTuple):
    extracted: str  # what lm-eval's filter kept, as lm-eval logs it; "[invalid]" when its regex found nothing
    exact_match: bool


@dataclass(frozen=True)
class Grade:
    pred: str | None  # by-value: the extracted answer, normalised, or None
    correct: bool  # by-value: the headline
    by_value_strict_pred: str | None  # by-value strict: the number after `####`
    by_value_strict_correct: bool
    explicit: bool  # the answer came from `####` or a final statement, not the last-number fallback
    lm_eval_strict: LmEvalVerdict  # lm-eval's strict-match
    lm_eval_flexible: LmEvalVerdict  # lm-eval's flexible-extract

    def fields(self) -> dict:
        """The graded answer's fields (`figures.GRADED`), as predictions.jsonl and the grade CLI hold them."""
        return dict(zip(GRADED, (self.pred, self.correct, self.by_value_strict_pred, self.by_value_strict_correct,
                                 self.explicit, *self.lm_eval_strict, *self.lm_eval_flexible), strict=True))


def lm_eval_regex_filter(completion: str, pattern: re.Pattern, group_select: int) -> str:
    """lm-eval's RegexFilter on one response: the `group_select`-th hit of `findall`, stripped, or the fallback."""
    hits = pattern.findall(completion)
    if not hits:
        return LM_EVAL_FALLBACK
    hit = hits[group_select]
    if isinstance(hit, tuple):  # a pattern with several groups: lm-eval keeps the first group that matched
        hit = next((group for group in hit if group), LM_EVAL_FALLBACK)
    return hit.strip()


def _lm_eval_normalise(text: str) -> str:
    for pattern in LM_EVAL_REGEXES_TO_IGNORE:
        # lm-eval stores each step's result in a numpy string array, which drops trailing NUL characters.
        text = re.sub(pattern, "", text).rstrip("\x00")
    return text.lower()  # ignore_case: true; ignore_punctuation: false


def lm_eval_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match with the `gsm8k` task's options, on one pair. The reference is GSM8K's whole
    `answer` field (its `doc_to_target`); a bare gold number gives the same verdict, since the ignore-regexes
    cut the field down to what follows its last `#### ` and GSM8K's final answers are all integers."""
    return _lm_eval_normalise(prediction) == _lm_eval_normalise(reference)


def lm_eval_strict_match(completion: str, answer: str) -> LmEvalVerdict:
    """lm-eval `gsm8k`'s strict-match: the first `#### N` (regex filter, group_select 0, take_first)."""
    extracted = lm_eval_regex_filter(completion, LM_EVAL_STRICT_RE, group_select=0)
    return LmEvalVerdict(extracted, lm_eval_exact_match(extracted, answer))


def lm_eval_flexible_extract(completion: str, answer: str) -> LmEvalVerdict:
    """lm-eval `gsm8k`'s flexible-extract: the last number-like run (regex filter, group_select -1, take_first)."""
    extracted = lm_eval_regex_filter(completion, LM_EVAL_FLEXIBLE_RE, group_select=-1)
    return LmEvalVerdict(extracted, lm_eval_exact_match(extracted, answer))


def extract_by_value_strict(completion: str) -> str | None:
    match = FINAL_ANSWER.search(cut_at_new_turn(completion))
    return normalize_number(match.group(1)) if match else None


def extract_explicit(completion: str) -> str | None:
    """`#### N`, else the last explicit final statement; None if the completion states no answer."""
    text = cut_at_new_turn(completion)
    strict = extract_by_value_strict(text)
    if strict is not None:
        return strict
    plain = text.replace("**", "").replace("__", "")
    hits = [(m.start(), m.group(1)) for pattern in EXPLICIT_RES for m in pattern.finditer(plain)]
    return normalize_number(max(hits)[1]) if hits else None


def extract_by_value(completion: str) -> str | None:
    explicit = extract_explicit(completion)
    if explicit is not None:
        return explicit
    numbers = NUMBER_RE.findall(cut_at_new_turn(completion))
    return normalize_number(numbers[-1]) if numbers else None


def grade(completion: str, gold: str) -> Grade:
    """Every rule on one completion. `gold` is the gold number (`gsm8k.gold_number` of GSM8K's answer field)."""
    pred, strict = extract_by_value(completion), extract_by_value_strict(completion)
    return Grade(pred=pred, correct=same_number(pred, gold), by_value_strict_pred=strict,
                 by_value_strict_correct=same_number(strict, gold), explicit=extract_explicit(completion) is not None,
                 lm_eval_strict=lm_eval_strict_match(completion, gold),
                 lm_eval_flexible=lm_eval_flexible_extract(completion, gold))


# A completion that ends by repeating one piece of text (`<<16*3= <<16*3= <<16*3= ...`) at least 4 times.
_LOOP_RE = re.compile(r"(\S.{2,79}?)(?:\s*\1){3,}\s*$", re.DOTALL)


def repetition_loop(completion: str) -> bool:
    """Stuck in a loop: the text ends in 4+ repeats of one 3-80 character piece (only the tail is read)."""
    return bool(_LOOP_RE.search(completion[-800:]))
