"""Evaluation pieces: statistics, prompts, self-consistency, the grade CLI."""

import json

import pytest

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.evaluate import eval_metrics, pick_shots, score, summarize
from gsm8k_lora.generation import build_prompt
from gsm8k_lora.stats import majority_vote, mcnemar_exact, paired_comparison, wilson_interval
from tests.conftest import run_cli, write_jsonl

ROWS = [{"id": f"test-{i}", "question": f"What is {i}+1?", "gold": str(i + 1), "num_steps": 1, "category": "x"}
        for i in range(4)]


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, p", [(0, 0, 1.0), (5, 5, 1.0), (10, 0, 2 / 1024), (6, 1, 0.125)])
def test_mcnemar_exact(a, b, p):
    assert mcnemar_exact(a, b) == pytest.approx(p)


def test_paired_comparison_counts_discordant_pairs():
    pair = paired_comparison([True, False, False, True], [True, True, True, False])
    assert (pair["only_finetuned_correct"], pair["only_baseline_correct"], pair["difference"]) == (2, 1, 0.25)


@pytest.mark.parametrize("preds, vote", [(["3", "4", "4"], "4"), (["3", None, "4"], "3"), ([None, None], None)])
def test_majority_vote(preds, vote):
    assert majority_vote(preds) == vote


def test_self_consistency_on_fixed_completions():
    # golds are 1, 2, 3, 4
    gens = [{"completions": ["#### 2", "#### 1", "#### 1"], "generated_tokens": [3, 3, 3]},   # first wrong, vote right
            {"completions": ["#### 9", "#### 9", "#### 2"], "generated_tokens": [3, 3, 3]},   # vote wrong, pass right
            {"completions": ["#### 3", "#### 3", "#### 3"], "generated_tokens": [3, 3, 3]},   # all right
            {"completions": ["none", "none", "none"], "generated_tokens": [1, 1, 1]}]         # no answer
    records = score(ROWS, gens, "finetuned")
    m = summarize(records, "finetuned")
    assert m["finetuned_gsm8k_accuracy_flexible"] == 0.25
    assert m["finetuned_gsm8k_maj@3"] == 0.5
    assert m["finetuned_gsm8k_pass@3"] == 0.75
    assert m["finetuned_answer_format_rate"] == 0.75


def test_metrics_compare_baseline_and_finetuned_on_the_same_questions():
    base = score(ROWS, [{"completions": ["4"], "generated_tokens": [1]}] * 4, "baseline")
    tuned = score(ROWS, [{"completions": [f"#### {i + 1}"], "generated_tokens": [4]} for i in range(4)], "finetuned")
    m = eval_metrics({"baseline": base, "finetuned": tuned})
    assert m["baseline_gsm8k_accuracy_flexible"] == 0.25 and m["finetuned_gsm8k_accuracy_flexible"] == 1.0
    assert m["baseline_gsm8k_accuracy_strict"] == 0.0 and m["paired_flexible_only_finetuned_correct"] == 3
    assert m["paired_flexible_difference"] == 0.75 and m["paired_strict_mcnemar_p"] == pytest.approx(0.125)


@pytest.mark.parametrize("style", ["fewshot", "lm_eval_gsm8k"])
def test_fewshot_prompts_come_from_train_and_never_contain_the_test_question(tiny_model_dir, style):
    from transformers import AutoTokenizer

    from gsm8k_lora.data import DataConfig, build_splits

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = build_splits(DataConfig(source="synthetic", num_train=100, num_test=20))
    cfg = EvalConfig(prompt=style, num_fewshot=3)
    shots = pick_shots(splits.train.to_list(), cfg)
    assert len(shots) == 3 and all(s["id"].startswith("train-") for s in shots)
    test_questions = set(splits.test["question"])
    for row in splits.test.to_list():
        prompt = build_prompt(tok, row["question"], cfg, shots, None)
        assert prompt.count(row["question"]) == 1 and prompt.endswith("<|assistant|>\n")
        assert sum(q in prompt for q in test_questions) == prompt.count(row["question"])
        assert all(s["answer"] in prompt for s in shots)
        if style == "lm_eval_gsm8k":
            assert prompt.count("Question: ") == 4 and prompt.rstrip().endswith("Answer:\n<|assistant|>")


def test_grade_cli_on_a_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"completion": "so 5\n#### 5", "answer": "2+3=5\n#### 5"},
        {"completion": "The answer is 7.", "answer": "8"},
        {"completion": "nothing", "answer": "#### 1,000"},
    ])
    proc = run_cli("grade", str(path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["pred"], r["correct"]) for r in rows] == [("5", True), ("7", False), (None, False)]
    assert "flexible 1/3" in proc.stderr and "strict 1/3" in proc.stderr


def test_grade_cli_rejects_rows_without_answer(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"completion": "5"}])
    proc = run_cli("grade", str(path), timeout=120)
    assert proc.returncode == 1 and "needs both 'completion' and 'answer'" in proc.stderr


def test_needed_tokens_stop_at_the_answer_line(tiny_model_dir):
    from transformers import AutoTokenizer

    from gsm8k_lora.bench import needed_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = "Tom has 2+3=<<2+3=5>>5 apples.\n#### 5"
    n = len(tok(answer, add_special_tokens=False).input_ids)
    assert needed_tokens(tok, answer + "\nThen more text that was not needed", True) == n
    plain = len(tok("no final line", add_special_tokens=False).input_ids)
    assert needed_tokens(tok, "no final line", True) == plain + 1


@pytest.mark.slow
def test_bench_quick_mode_writes_its_figures(tmp_path, tiny_model_dir):
    proc = run_cli("bench", "--quick", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("*.json")
    figures = json.loads(result.read_text())
    for key in ("eval_batched_speedup_x", "eval_generated_over_needed_x", "eval_single_questions_per_s",
                "train_speedup_x", "train_padding_efficiency_default", "train_padding_efficiency_trl_defaults"):
        assert figures[key] > 0
    assert {v["variant"] for v in figures["train_variants"]} == {"trl_defaults", "package_default"}
    assert "eval_batched_speedup_x" in proc.stdout


@pytest.mark.parametrize("strategy, expected", [("padding_free", 1.0), ("random", None), ("group_by_length", None)])
def test_epoch_padding_efficiency(strategy, expected):
    from gsm8k_lora.bench_train import epoch_padding_efficiency

    lengths = [10, 200, 12, 190, 11, 205, 9, 198] * 50
    value = epoch_padding_efficiency(lengths, 4, strategy)
    if expected is not None:
        assert value == expected
    else:
        assert 0 < value <= 1
    assert epoch_padding_efficiency(lengths, 4, "group_by_length") > epoch_padding_efficiency(lengths, 4, "random")
