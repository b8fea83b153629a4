import pytest

from gsm8k_lora.data.gsm8k import GoldAnswer, normalize_number, parse_answer, row_problem
from gsm8k_lora.data.synthetic import PROBLEM_TYPES, generate


@pytest.mark.parametrize("answer, final, steps, solution", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72", "72", 2,
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72."),
    ("It costs $1,000 in total.\n#### 1,000", "1000", 1, "It costs $1,000 in total."),
    ("#### -5", "-5", 0, ""),
    ("Half is 0.50.\n#### 0.50", "0.5", 1, "Half is 0.50."),
    ("x\n####  18.0 ", "18", 1, "x"),
    ("a\n#### 3\nb\n#### 4", "4", 3, "a\n#### 3\nb"),  # the last marker is the final answer
    ("Total: $\n#### $12", "12", 1, "Total: $"),
])
def test_parse_answer_valid(answer, final, steps, solution):
    assert parse_answer(answer) == GoldAnswer(solution=solution, final=final, num_steps=steps)


@pytest.mark.parametrize("answer", [None, "", "no marker at all 72", "#### ", "#### seventy", "#### 7 apples", 42])
def test_parse_answer_rejects_malformed(answer):
    assert parse_answer(answer) is None


@pytest.mark.parametrize("raw, norm", [("1,000", "1000"), ("18.0", "18"), ("-0", "0"), ("0.250", "0.25"), ("7", "7")])
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


@pytest.mark.parametrize("row, problem", [
    ({"question": "Q?", "answer": "a\n#### 1"}, None),
    ({"question": "  ", "answer": "a\n#### 1"}, "empty question"),
    ({"answer": "a\n#### 1"}, "empty question"),
    ({"question": "Q?", "answer": "a"}, "answer without a final '#### <number>' line"),
])
def test_row_problem(row, problem):
    assert row_problem(row) == problem


def test_synthetic_rows_are_valid_seeded_and_categorised():
    rows = generate(40, seed=3)
    assert rows == generate(40, seed=3)
    assert rows != generate(40, seed=4)
    assert {r["problem_type"] for r in rows} == set(PROBLEM_TYPES)
    for row in rows:
        gold = parse_answer(row["answer"])
        assert gold is not None and row_problem(row) is None
        assert "<<" in row["answer"] and ">>" in row["answer"]
    multi = [parse_answer(r["answer"]).num_steps for r in rows if r["problem_type"] == "multi_step"]
    assert min(multi) == 3


def test_synthetic_calculator_notes_are_correct_arithmetic():
    import re

    for row in generate(100, seed=0):
        for a, op, b, c in re.findall(r"<<(\d+)([-+*/])(\d+)=(-?\d+)>>", row["answer"]):
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c
