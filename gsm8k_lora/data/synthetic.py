"""A seeded generator of GSM8K-format word problems, so the pipeline runs with no dataset download.

Each row has `question`, `answer` (worked solution with `<<a*b=c>>` calculator notes and a final
`#### N`) and `problem_type`. The same seed always gives the same rows. Problems are easy on purpose:
the point is a realistic format and length spread, not a benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gsm8k_lora.data.gsm8k import format_answer

NAMES = ["Janet", "Tom", "Aisha", "Luis", "Mei", "Omar", "Sara", "Ivan", "Nina", "Kofi", "Priya", "Ben"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells"]
PROBLEM_TYPES = ("one_step", "multi_step", "rates_time", "money_change")


def _calc(a: int, op: str, b: int) -> tuple[int, str]:
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return value, f"{a}{op}{b}=<<{a}{op}{b}={value}>>{value}"


def _one_step(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        total, work = _calc(a, "+", b)
        q = f"{name} has {a} {item}. A friend gives {name} {b} more. How many {item} does {name} have now?"
        return q, [f"{name} has {work} {item}."], total
    a = a + b
    total, work = _calc(a, "-", b)
    q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    return q, [f"{name} has {work} {item} left."], total


def _multi_step(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per_box, extra, lost = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20), rng.randint(1, 9)
    packed, w1 = _calc(boxes, "*", per_box)
    more, w2 = _calc(packed, "+", extra)
    total, w3 = _calc(more, "-", lost)
    q = (f"{name} buys {boxes} boxes of {item} with {per_box} in each box, then finds {extra} more "
         f"and loses {lost}. How many {item} does {name} have?")
    return q, [f"The boxes hold {w1} {item}.", f"With the ones found, {name} has {w2}.",
               f"After losing some, {name} has {w3} {item}."], total


def _rates_time(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    speed, hours, minutes = rng.randint(3, 15), rng.randint(2, 8), rng.choice([30, 60, 90, 120])
    per_hour = rng.randint(2, 6)
    pages, w1 = _calc(speed, "*", hours)
    total_minutes, w2 = _calc(hours, "*", minutes)
    rest, w3 = _calc(pages, "+", per_hour)
    q = (f"{name} reads {speed} pages an hour for {hours} hours, taking a {minutes}-minute break after "
         f"each hour, and then reads {per_hour} more pages. How many pages does {name} read in all?")
    return q, [f"In {hours} hours {name} reads {w1} pages.",
               f"The breaks take {w2} minutes, which adds no pages.", f"In all {name} reads {w3} pages."], rest


def _money_change(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    cost, w1 = _calc(count, "*", price)
    paid = (cost // 10 + 1) * 10 + rng.choice([0, 10, 20])
    change, w2 = _calc(paid, "-", cost)
    q = (f"{name} buys {count} {item} at ${price} each and pays with ${paid}. "
         f"How much change, in dollars, does {name} get?")
    return q, [f"The {item} cost {w1} dollars.", f"The change is {w2} dollars."], change


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, list[str], int]]] = {
    "one_step": _one_step,
    "multi_step": _multi_step,
    "rates_time": _rates_time,
    "money_change": _money_change,
}


def generate(n: int, seed: int) -> list[dict]:
    """`n` GSM8K-format rows, categories in turn, deterministic for a given seed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = PROBLEM_TYPES[i % len(PROBLEM_TYPES)]
        question, steps, final = _GENERATORS[kind](rng)
        answer = format_answer("\n".join(steps), final)
        rows.append({"question": question, "answer": answer, "problem_type": kind})
    return rows
