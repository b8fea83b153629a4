"""Evaluation pieces: statistics, prompts, self-consistency, the grade CLI."""

import json
import math

import pytest

from gsm8k_lora.evaluation.scoring import (
    eval_metrics,
    majority_vote,
    mcnemar_exact,
    paired_comparison,
    score,
    summarize,
    wilson_interval,
)
from tests.conftest import ROOT, compose, run_cli, write_jsonl

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
    gens = [{"completions": ["#### 2", "#### 1", "#### 1"], "generated_tokens": [3, 3, 3]},   # first wrong, vote right
            {"completions": ["#### 9", "#### 9", "#### 2"], "generated_tokens": [3, 3, 3]},   # vote wrong, pass right
            {"completions": ["#### 3", "#### 3", "#### 3"], "generated_tokens": [3, 3, 3]},   # all right
            {"completions": ["none", "none", "none"], "generated_tokens": [1, 1, 1]}]         # no answer
    records = score(ROWS, gens, "finetuned")
    m = summarize(records, "finetuned")
    assert m["finetuned_gsm8k_by_value"] == 0.25
    assert m["finetuned_gsm8k_maj@3"] == 0.5
    assert m["finetuned_gsm8k_pass@3"] == 0.75
    assert m["finetuned_answer_format_rate"] == 0.75


def test_metrics_compare_baseline_and_finetuned_on_the_same_questions():
    base = score(ROWS, [{"completions": ["4"], "generated_tokens": [1]}] * 4, "baseline")
    tuned = score(ROWS, [{"completions": [f"#### {i + 1}"], "generated_tokens": [4]} for i in range(4)], "finetuned")
    m = eval_metrics({"baseline": base, "finetuned": tuned})
    assert m["baseline_gsm8k_by_value"] == 0.25 and m["finetuned_gsm8k_by_value"] == 1.0
    assert m["baseline_gsm8k_by_value_strict"] == 0.0 and m["paired_by_value_only_finetuned_correct"] == 3
    assert m["paired_by_value_difference"] == 0.75 and m["paired_by_value_strict_mcnemar_p"] == pytest.approx(0.125)


@pytest.mark.parametrize("style", ["fewshot", "lm_eval_gsm8k"])
def test_fewshot_examples_reach_the_prompts_from_the_train_split(tiny_model_dir, tmp_path, monkeypatch, style):
    """The path `python -m gsm8k_lora.evaluate` takes (standalone.run -> answers.evaluate -> answers.answer), with the
    prompts read where they go into generation: each holds k worked examples from the source's train split
    (the package's train and validation rows; lm-eval draws from all of it), by content, and of the test
    split only the question under test."""
    from hydra import compose, initialize_config_dir

    from gsm8k_lora import evaluate
    from gsm8k_lora.config import register_configs, validate
    from gsm8k_lora.data.loading import build_splits
    from gsm8k_lora.evaluation import answers, standalone
    from gsm8k_lora.naming import RunNaming

    prompts: list[str] = []
    real_generate = answers.generate

    def recording_generate(model, tokenizer, batch, cfg, desc="Generating"):
        prompts.extend(batch)
        return real_generate(model, tokenizer, batch, cfg, desc)

    monkeypatch.setattr(answers, "generate", recording_generate)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose(config_name="config", overrides=[
            "experiment=smoke", "logger=none", f"eval.prompt={style}", "eval.num_fewshot=3", "eval.limit=4",
            "eval.max_new_tokens=2", "data.num_train=100", "data.num_test=10"])
    standalone.run(*evaluate.checked_config(raw, []), tmp_path, RunNaming("fewshot", None, "evaluate"))

    splits = build_splits(validate(raw).data)  # the same seeded data, built again here
    train_source, test = splits.train.to_list() + splits.validation.to_list(), splits.test.to_list()
    assert len(prompts) == 4
    for prompt, asked in zip(prompts, test, strict=False):  # prompts in the order of the test rows
        shots = [r for r in train_source if r["question"] in prompt and r["answer"] in prompt]
        assert len(shots) == 3, "each prompt holds 3 worked examples from the train split"
        assert [r["question"] in prompt for r in test] == [r["id"] == asked["id"] for r in test]
        assert prompt.endswith("<|assistant|>\n")
        if style == "lm_eval_gsm8k":
            assert prompt.count("Question: ") == 4 and prompt.rstrip().endswith("Answer:\n<|assistant|>")


def test_grade_cli_on_a_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"completion": "so 5\n#### 5", "answer": "2+3=5\n#### 5"},
        {"completion": "The answer is 7.", "answer": "8"},
        {"completion": "nothing", "answer": "#### 1,000"},
        {"completion": "She pays\n#### $18", "answer": "9*2=18\n#### 18"},  # lm-eval's strict-match: no `$`
    ])
    proc = run_cli("grade", str(path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["pred"], r["correct"]) for r in rows] == [("5", True), ("7", False), (None, False), ("18", True)]
    assert [r["lm_eval_strict_correct"] for r in rows] == [True, False, False, False]
    assert [r["lm_eval_flexible_correct"] for r in rows] == [True, False, False, True]
    assert ("by-value 2/4" in proc.stderr and "lm-eval strict-match 1/4" in proc.stderr
            and "lm-eval flexible-extract 2/4" in proc.stderr), proc.stderr


def test_grade_cli_rejects_rows_without_answer(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"completion": "5"}])
    proc = run_cli("grade", str(path), timeout=120)
    assert proc.returncode == 1 and "needs both 'completion' and 'answer'" in proc.stderr


def test_few_shot_examples_never_include_the_questions_under_test():
    """Answering the test split, shots come from GSM8K's whole train split (what lm-eval draws from);
    answering the validation split, only from the training part, never from the validation rows."""
    from gsm8k_lora.data.loading import build_splits
    from gsm8k_lora.evaluation.answers import shot_pool

    cfg = compose("data=synthetic", "data.num_train=200", "data.num_test=20", "eval.split=validation")
    splits = build_splits(cfg.data)
    validation = {row["question"] for row in splits.validation}
    on_validation = {row["question"] for row in shot_pool(splits, cfg.eval)}
    assert validation and not validation & on_validation
    on_test = {row["question"] for row in shot_pool(splits, compose("eval.split=test").eval)}
    assert validation <= on_test and not on_test & {row["question"] for row in splits.test}


def test_evaluating_a_run_keeps_its_model_and_data_when_one_key_of_them_is_overridden(tmp_path):
    from omegaconf import OmegaConf

    from gsm8k_lora.config import ConfigError
    from gsm8k_lora.evaluate import inherit_run_config
    from tests.test_config import compose_cfg

    run = compose_cfg("model=tiny", "data=synthetic", "data.system_prompt=Be brief.", "eval.prompt=fewshot")
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(run))
    for adapter in (tmp_path / "adapter", tmp_path / "checkpoints" / "checkpoint-4"):
        overrides = [f"adapter={adapter}", "model.dtype=bfloat16", "data.num_test=7"]
        merged = inherit_run_config(compose_cfg(*overrides), overrides)
        assert merged.model.name_or_path == "builtin:tiny" and merged.model.dtype == "bfloat16"
        assert (merged.data.source, merged.data.system_prompt, merged.data.num_test) == ("synthetic", "Be brief.", 7)
        assert merged.eval.prompt == "fewshot"
    overrides = [f"adapter={tmp_path}", "model=falcon3_1b_instruct"]
    with pytest.raises(ConfigError, match="model.name_or_path='tiiuae/Falcon3-1B-Instruct' is invalid"):
        inherit_run_config(compose_cfg(*overrides), overrides)
