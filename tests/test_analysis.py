"""The computed readings of the report, on inputs with known answers."""

import pytest

from gsm8k_lora.evaluation.diagnosis import arithmetic_slips, error_category, evaluate_expression
from gsm8k_lora.evaluation.scoring import accuracy_by_steps
from gsm8k_lora.reporting.analysis import cost_usd, next_steps, read_learning_curve


def curve(values, step=10):
    return [(i * step, v) for i, v in enumerate(values)]


@pytest.mark.parametrize("train, val, label", [
    ([2.0, 1.5, 1.2, 1.0, 0.9], [2.0, 1.6, 1.3, 1.1, 1.0], "still_improving"),
    ([2.0, 1.5, 1.2, 1.0, 0.99], [2.0, 1.6, 1.3, 1.300, 1.301], "plateaued"),
    ([2.0, 1.5, 1.0, 0.6, 0.4], [2.0, 1.5, 1.2, 1.3, 1.45], "overfitting"),
    ([2.0, 1.5, 1.2, 1.3, 1.5], [2.0, 1.5, 1.2, 1.3, 1.45], "rising"),
    ([2.0], [2.0], "too_short"),
])
def test_learning_curve_classes(train, val, label):
    assert read_learning_curve(curve(train), curve(val)).label == label


def test_learning_curve_figure_is_the_relative_change_over_the_window():
    val = curve([2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 0.99, 0.97])
    reading = read_learning_curve(val, val, tail_fraction=0.2)  # steps 80..100: 1.0 -> 0.97
    assert reading.val_change_pct == pytest.approx(-3.0)
    assert reading.window_pct == pytest.approx(20.0)
    assert "fell 3.0% over the last 20% of steps" in reading.sentence


@pytest.mark.parametrize("expr, value", [("48/2", 24), ("3*(4+1)", 15), ("10-2-3", 5), ("1,000*2", 2000),
                                         ("7 x 6", 42), ("2+", None), ("1/0", None)])
def test_evaluate_expression(expr, value):
    assert evaluate_expression(expr) == value


@pytest.mark.parametrize("completion, slips", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.", []),
    ("The boxes hold 8*6=<<8*8=48>>48 pens.", ["8*8=48"]),
    ("So 3 + 4 = 8 apples.", ["3 + 4=8"]),
    ("It costs 12 * 3 = $36 in all.", []),
    ("No calculations here, 5 apples.", []),
])
def test_arithmetic_slips(completion, slips):
    assert arithmetic_slips(completion) == slips


def record(completion, pred, correct=False, explicit=True, tokens=20):
    return {"completion": completion, "pred": pred, "correct": correct, "explicit_answer": explicit,
            "generated_tokens": tokens, "hit_token_limit": tokens >= 128}


@pytest.mark.parametrize("rec, category", [
    (record("2+2=<<2+2=4>>4\n#### 4", "4", correct=True), None),
    (record("Tom has many apples and", "5", explicit=False, tokens=128), "truncated"),
    (record("I am not sure.", None, explicit=False), "no_final_answer"),
    (record("He has 5 and 3 so 8", "8", explicit=False), "no_final_answer"),
    (record("2*3=<<2*3=7>>7\n#### 7", "7"), "arithmetic_slip"),
    (record("2*3=<<2*3=6>>6\n#### 6", "6"), "wrong_plan"),
])
def test_error_categories(rec, category):
    assert error_category(rec) == category


def test_runs_written_before_records_said_so_are_read_by_the_token_limit():
    old = {"completion": "Tom has many apples and", "pred": "5", "correct": False, "explicit_answer": False,
           "generated_tokens": 128}
    assert error_category(old, max_new_tokens=128) == "truncated" and error_category(old, 256) == "no_final_answer"


def test_cost_arithmetic():
    assert cost_usd(3600, 1, 2.5) == (1.0, 2.5)
    hours, cost = cost_usd(1800, 8, 3.0)
    assert hours == pytest.approx(4.0) and cost == pytest.approx(12.0)
    assert cost_usd(100, 0, 2.5) == (0.0, 0.0)


def test_accuracy_by_steps_groups_and_counts():
    recs = [{"num_steps": 2, "correct": True}, {"num_steps": 2, "correct": False}, {"num_steps": 5, "correct": True}]
    (two, five) = accuracy_by_steps(recs)
    assert two[:3] == (2, 2, 0.5) and five[:3] == (5, 1, 1.0)
    assert two[3] == pytest.approx(0.0945, abs=1e-4) and two[4] == pytest.approx(0.9055, abs=1e-4)  # Wilson, 1 of 2


def test_next_steps_follow_from_the_figures():
    improving = read_learning_curve(curve([2, 1.5, 1.0]), curve([2, 1.5, 1.0]))
    tips = next_steps(improving, early_stopped=False, evaluation={"paired_by_value_difference": 0.1,
                                                                  "paired_by_value_mcnemar_p": 0.01,
                                                                  "finetuned_gsm8k_by_value": 0.5,
                                                                  "finetuned_gsm8k_maj@8": 0.56})
    assert any("more epochs" in t for t in tips) and any("self-consistency" in t for t in tips)
    overfit = read_learning_curve(curve([2.0, 1.5, 1.0, 0.6, 0.4]), curve([2.0, 1.5, 1.2, 1.3, 1.45]))
    assert any("fewer epochs" in t for t in next_steps(overfit, True, {}))
    loops = {"finetuned_repetition_loop_rate": 0.17, "baseline_repetition_loop_rate": 0.06}
    assert any("repetition loops more often (17% against 6%" in t for t in next_steps(improving, False, loops))
    same = {"finetuned_repetition_loop_rate": 0.07, "baseline_repetition_loop_rate": 0.06}
    assert not any("repetition" in t for t in next_steps(improving, False, same))
