"""Scoring graded answers: the intervals and paired tests, self-consistency votes, and the figures of a run."""

import math

import pytest

from gsm8k_lora.evaluation.scoring import (
    eval_metrics,
    holm,
    majority_vote,
    mcnemar_exact,
    mcnemar_power,
    minimum_detectable_difference,
    paired_comparison,
    paired_difference_interval,
    score,
    summarize,
    summary_lines,
    wilson_interval,
)


def gen(completions: list[str], tokens: list[int], cut: int = 0, at_end: bool = False, no_room: bool = False) -> dict:
    """One prompt's generation as `generation.generate` returns it: completions, their token counts, and how the
    model's context bounded them."""
    return {"completions": completions, "generated_tokens": tokens, "prompt_tokens_cut": cut,
            "stopped_at_context_end": [at_end] * len(completions), "prompt_did_not_fit": no_room}


ROWS = [{"id": f"test-{i}", "question": f"What is {i}+1?", "gold": str(i + 1), "num_steps": 1, "problem_type": "x"}
        for i in range(4)]


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, p", [(0, 0, 1.0), (5, 5, 1.0), (10, 0, 2 / 1024), (6, 1, 0.125)])
def test_mcnemar_exact(a, b, p):
    assert mcnemar_exact(a, b) == pytest.approx(p)


def closed_form_wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval written out, as the package computed it before it used scipy."""
    p, denom = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def closed_form_mcnemar(a: int, b: int) -> float:
    n = a + b
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2**n)


@pytest.mark.parametrize("n", [1, 7, 60, 100, 1319])
def test_scipy_statistics_give_the_figures_the_closed_forms_gave(n):
    """scipy's Wilson interval uses z = 1.95996... where the closed form used 1.96: the same figures to 1e-4 (a
    report shows 0.1 points); the exact McNemar p-values are the same binomial sums."""
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        assert wilson_interval(k, n) == pytest.approx(closed_form_wilson(k, n), abs=1e-4)
    for a in range(0, min(n, 12)):
        for b in range(0, min(n, 12)):
            assert mcnemar_exact(a, b) == pytest.approx(closed_form_mcnemar(a, b), rel=1e-9)


def test_paired_comparison_counts_discordant_pairs():
    pair = paired_comparison([True, False, False, True], [True, True, True, False])
    assert (pair["only_finetuned_correct"], pair["only_baseline_correct"], pair["difference"]) == (2, 1, 0.25)


@pytest.mark.parametrize("preds, vote", [(["3", "4", "4"], "4"), (["3", None, "4"], "3"), ([None, None], None)])
def test_majority_vote(preds, vote):
    assert majority_vote(preds) == vote


def test_self_consistency_on_fixed_completions():
    # golds are 1, 2, 3, 4
    gens = [gen(["#### 2", "#### 1", "#### 1"], [3, 3, 3]),   # first wrong, vote right
            gen(["#### 9", "#### 9", "#### 2"], [3, 3, 3]),   # vote wrong, pass right
            gen(["#### 3", "#### 3", "#### 3"], [3, 3, 3]),   # all right
            gen(["none", "none", "none"], [1, 1, 1])]         # no answer
    records = score(ROWS, gens, "finetuned")
    m = summarize(records, "finetuned")
    assert m["finetuned_gsm8k_by_value"] == 0.25
    assert m["finetuned_gsm8k_maj@3"] == 0.5
    assert m["finetuned_gsm8k_pass@3"] == 0.75
    assert m["finetuned_answer_format_rate"] == 0.75


def test_metrics_compare_baseline_and_finetuned_on_the_same_questions():
    base = score(ROWS, [gen(["4"], [1])] * 4, "baseline")
    tuned = score(ROWS, [gen([f"#### {i + 1}"], [4]) for i in range(4)], "finetuned")
    m = eval_metrics({"baseline": base, "finetuned": tuned})
    assert m["baseline_gsm8k_by_value"] == 0.25 and m["finetuned_gsm8k_by_value"] == 1.0
    assert m["baseline_gsm8k_by_value_strict"] == 0.0 and m["paired_by_value_only_finetuned_correct"] == 3
    assert m["paired_by_value_difference"] == 0.75 and m["paired_by_value_strict_mcnemar_p"] == pytest.approx(0.125)


# --- a sweep's ranking: several settings against the best -------------------------------------------------------
def test_holm_adjusts_as_the_textbook_does():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> kept from falling: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.4, 0.9]) == pytest.approx([0.8, 0.9]) and holm([]) == []


def simulate_pairs(rng, n: int, discordance: float, difference: float) -> tuple[int, int]:
    """Discordant counts (only a right, only b right) of n paired questions with these true rates."""
    only_a = only_b = 0
    for _ in range(n):
        u = rng.random()
        if u < (discordance + difference) / 2:
            only_a += 1
        elif u < discordance:
            only_b += 1
    return only_a, only_b


def test_the_paired_interval_covers_the_true_difference_95_times_in_100():
    import random

    rng = random.Random(0)
    draws = [simulate_pairs(rng, 200, 0.20, 0.05) for _ in range(1000)]
    covered = sum(low <= 0.05 <= high for low, high in (paired_difference_interval(a, b, 200) for a, b in draws))
    assert 0.93 <= covered / 1000 <= 0.97
    low, high = paired_difference_interval(0, 0, 24)  # no answer differs on 24 questions: still wide, not a point
    assert low == pytest.approx(-high) and high > 0.05


def test_the_exact_mcnemar_power_is_what_simulated_sweeps_find():
    import random

    n, discordance, alpha = 300, 0.20, 0.05
    detectable = minimum_detectable_difference(n, discordance, alpha)
    rng = random.Random(1)
    found = sum(mcnemar_exact(*simulate_pairs(rng, n, discordance, detectable)) <= alpha for _ in range(1000))
    assert 0.76 <= found / 1000 <= 0.84  # 80% power, within the simulation's own noise
    assert mcnemar_power(n, discordance, 0.0, alpha) <= alpha  # no difference: rejected at most alpha of the time
    # the rejection region is the test's own: every question discordant (m = 31), the split is rejected exactly
    # where mcnemar_exact says p <= alpha
    rejected = [b for b in range(32) if mcnemar_exact(b, 31 - b) <= alpha]
    assert mcnemar_power(31, 1.0, 0.0, alpha) == pytest.approx(sum(math.comb(31, b) for b in rejected) / 2 ** 31)


def test_no_detectable_difference_where_answers_never_differ():
    assert minimum_detectable_difference(1319, 0.0, 0.05) is None
    assert minimum_detectable_difference(24, 0.05, 0.05) is None  # about one differing answer: nothing findable


def test_answers_the_context_bounded_are_counted_per_model_and_shown():
    """A prompt cut at its start (lm-eval's rule) is still answered; an answer stopped at the context's end is
    truncated; a prompt that left no room has no answer: wrong, and still one of the n questions compared."""
    base = score(ROWS, [gen(["#### 1"], [3], cut=412), gen(["So 3 +"], [7], at_end=True), gen([""], [0], no_room=True),
                        gen(["#### 4"], [3])], "baseline", max_new_tokens=256)
    tuned = score(ROWS, [gen(["#### 1"], [3], cut=412), gen(["#### 2"], [3]), gen([""], [0], no_room=True),
                         gen(["#### 4"], [3])], "finetuned", max_new_tokens=256)
    assert [r["error_category"] for r in base] == [None, "truncated", "prompt_did_not_fit", None]
    m = eval_metrics({"baseline": base, "finetuned": tuned})
    assert (m["baseline_n"], m["baseline_gsm8k_by_value"], m["finetuned_gsm8k_by_value"]) == (4, 0.5, 0.75)
    assert (m["baseline_prompts_cut"], m["baseline_answers_stopped_at_context_end"],
            m["baseline_prompts_not_fitting"]) == (1, 1, 1)
    assert (m["finetuned_prompts_cut"], m["finetuned_answers_stopped_at_context_end"],
            m["finetuned_prompts_not_fitting"]) == (1, 0, 1)
    [line] = [line for line in summary_lines(m, "a protocol") if "context" in line]
    assert "prompts cut at the start (lm-eval's rule) baseline 1 -> fine-tuned 1" in line
    assert "answers stopped at the context's end baseline 1 -> fine-tuned 0" in line
    assert "prompts that left no room (not answered) baseline 1 -> fine-tuned 1" in line
    fit = eval_metrics({"baseline": score(ROWS, [gen(["#### 1"], [3])] * 4, "baseline", max_new_tokens=256)})
    [line] = [line for line in summary_lines(fit, "a protocol") if "context" in line]
    assert line == "  context: every prompt and answer fit the model's positions (none cut or stopped there)"
