"""The package's by-value grading, rule by rule (lm-eval's own rules: test_lm_eval_parity.py)."""

import pytest

from gsm8k_lora.data.gsm8k import gold_number, same_number
from gsm8k_lora.evaluation.grading import extract_by_value, extract_by_value_strict, grade


@pytest.mark.parametrize("completion, strict", [
    ("So 3+4=7.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### $12.50", "12.5"),
    ("#### 5\n#### 6", "5"),                       # the first marker, as lm-evaluation-harness
    ("####18", "18"),                               # by value: no space needed (lm-eval's strict-match needs one)
    ("#### $18", "18"),
    ("#### 18.00", "18"),
    ("The answer is 7.", None),
    ("", None),
])
def test_strict(completion, strict):
    assert extract_by_value_strict(completion) == strict


@pytest.mark.parametrize("completion, pred", [
    ("Work 2+2=4.\n#### 4\nMore text 99", "4"),          # the #### line wins over later numbers
    ("3 boxes of 4 is 12. The answer is 12.", "12"),
    ("First 5, then 6. The final answer is: $1,250.", "1250"),
    ("Answer: 42", "42"),
    ("We get \\boxed{18}.", "18"),
    ("The answer is **18**.", "18"),                    # markdown bold
    ("the answer is 7, not 8 as I first thought", "7"),  # explicit statement beats the last number
    ("He has 5 apples and buys 3 more, so 8 apples", "8"),  # last number fallback
    ("It costs 25% more: 30 dollars.", "30"),
    ("Half of it: 1/2", "0.5"),
    ("No number here.", None),
    ("So 10 apples.\nQuestion: Tom has 99 pears", "10"),  # hallucinated next turn is ignored
    ("So 10 apples.<|user|>\n#### 99", "10"),
    ("It is -0", "0"),
])
def test_flexible(completion, pred):
    assert extract_by_value(completion) == pred


@pytest.mark.parametrize("a, b, same", [
    ("18", "18.0", True), ("018", "18", True), ("1,000", "1000", True), ("$5", "5", True),
    ("0.5", "1/2", True), ("-0", "0", True), ("50%", "50", True), ("7.", "7", True),
    ("18", "19", False), (None, "1", False), ("abc", "abc", False), ("1/0", "1", False),
])
def test_same_number_compares_by_value(a, b, same):
    assert same_number(a, b) is same


def test_grade_reports_both_extractions_and_never_raises():
    g = grade("I think 6. The answer is 7.", "7")
    assert (g.pred, g.correct, g.explicit) == ("7", True, True)
    assert (g.by_value_strict_pred, g.by_value_strict_correct) == (None, False)
    assert (g.lm_eval_strict, g.lm_eval_flexible) == (("[invalid]", False), ("7.", True))
    g = grade("blah 3 blah", "4")
    assert (g.pred, g.correct, g.explicit) == ("3", False, False)
    g = grade("", "4")
    assert (g.pred, g.correct, g.by_value_strict_pred) == (None, False, None)


@pytest.mark.parametrize("answer, gold", [("a\n#### 1,000", "1000"), ("72", "72"), (" 3.50 ", "3.5")])
def test_gold_from_gsm8k_answer_or_bare_number(answer, gold):
    assert gold_number(answer) == gold


@pytest.mark.parametrize("completion", ["#### 18.00", "####18", "#### $18", "The answer is 18.00",
                                        "#### 18\n\nQuestion: 4"])
def test_by_value_reads_answers_that_lm_eval_string_match_rejects(completion):
    g = grade(completion, "18")
    assert g.correct
    assert not (g.lm_eval_strict.exact_match and g.lm_eval_flexible.exact_match)
