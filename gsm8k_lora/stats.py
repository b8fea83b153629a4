"""Statistics for accuracy figures: Wilson intervals, exact McNemar, majority vote. Pure functions."""

from __future__ import annotations

import math
from collections import Counter


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; well-behaved at 0 and 1, unlike the normal one."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (binomial with p=1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(base: list[bool], tuned: list[bool]) -> dict:
    """How two models answering the same questions differ: counts, difference and McNemar p."""
    assert len(base) == len(tuned), "paired comparison needs the same questions"
    only_tuned = sum(t and not b for b, t in zip(base, tuned, strict=True))
    only_base = sum(b and not t for b, t in zip(base, tuned, strict=True))
    n = len(base)
    return {
        "n": n,
        "difference": (sum(tuned) - sum(base)) / n if n else 0.0,
        "only_finetuned_correct": only_tuned,
        "only_baseline_correct": only_base,
        "mcnemar_p": mcnemar_exact(only_tuned, only_base),
    }


def majority_vote(preds: list[str | None]) -> str | None:
    """The most common extracted answer (first seen wins a tie); None when no sample has one."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(p for p in preds if p is not None and votes[p] == best)
