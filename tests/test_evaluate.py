"""`evaluate` and its prompts: few-shot examples from the right split, a run evaluated with its own model and
data, its adapter reloaded, and a limit beyond the split."""

import csv
import json

import pytest

from tests.conftest import ROOT, compose, run_cli


@pytest.mark.parametrize("style", ["fewshot", "lm_eval_gsm8k"])
def test_fewshot_examples_reach_the_prompts_from_the_train_split(tiny_model_dir, tmp_path, monkeypatch, style):
    """The path `python -m gsm8k_lora.evaluate` takes (recipe.evaluate -> answers.evaluate -> answers.answer), with the
    prompts read where they go into generation: each holds k worked examples from the source's train split
    (the package's train and validation rows; lm-eval draws from all of it), by content, and of the test
    split only the question under test."""
    from hydra import compose, initialize_config_dir

    from gsm8k_lora import cli, recipe
    from gsm8k_lora.config import register_configs, validate
    from gsm8k_lora.data.loading import build_splits
    from gsm8k_lora.evaluation import answers
    from gsm8k_lora.naming import RunNaming
    from gsm8k_lora.rundir import RunDirectory

    prompts: list[str] = []
    real_generate = answers.generate

    def recording_generate(model, tokenizer, batch, cfg, desc="Generating", limits=None):
        prompts.extend(batch)
        return real_generate(model, tokenizer, batch, cfg, desc, limits)

    monkeypatch.setattr(answers, "generate", recording_generate)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose(config_name="config", overrides=[
            "experiment=smoke", "logger=none", f"eval.prompt={style}", "eval.num_fewshot=3", "eval.limit=4",
            "eval.max_new_tokens=2", "data.num_train=100", "data.num_test=10"])
    recipe.evaluate(*cli.check_evaluation(raw, []), RunDirectory(tmp_path), RunNaming("fewshot", None, "evaluate"))

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





def test_few_shot_examples_never_include_the_questions_under_test():
    """Answering the test split, shots come from GSM8K's whole train split (what lm-eval draws from);
    answering the validation split, only from the training part, never from the validation rows."""
    from gsm8k_lora.data.loading import build_splits, shot_pool

    cfg = compose("data=synthetic", "data.num_train=200", "data.num_test=20", "eval.split=validation")
    splits = build_splits(cfg.data)
    validation = {row["question"] for row in splits.validation}
    on_validation = {row["question"] for row in shot_pool(splits, cfg.eval.split)}
    assert validation and not validation & on_validation
    on_test = {row["question"] for row in shot_pool(splits, "test")}
    assert validation <= on_test and not on_test & {row["question"] for row in splits.test}


def test_evaluating_a_run_keeps_its_model_and_data_when_one_key_of_them_is_overridden(tmp_path):
    from omegaconf import OmegaConf

    from gsm8k_lora.cli import inherit_run_config
    from gsm8k_lora.config import ConfigError
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


@pytest.mark.slow
def test_evaluate_cli_reloads_the_adapter_from_the_run_directory(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    proc = run_cli("evaluate", "experiment=smoke", "logger=none", f"adapter={run_dir}", "eval.limit=30",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"evaluation written to {tmp_path}" in proc.stdout
    again = json.loads((tmp_path / "eval_metrics.json").read_text())
    first = json.loads((run_dir / "eval_metrics.json").read_text())
    # greedy decoding: the reloaded adapter answers as the trained one did
    for key in ("baseline_gsm8k_by_value", "finetuned_gsm8k_by_value",
                "finetuned_answer_format_rate"):
        assert again[key] == first[key]


@pytest.mark.slow
def test_eval_limit_is_an_upper_bound_answering_the_whole_smaller_split(tmp_path):
    """As lm-eval's --limit: a limit beyond the split answers every question, and says so in one line."""
    proc = run_cli("evaluate", "model=tiny", "data=synthetic", "data.num_test=6", "eval.limit=5000", "logger=none",
                   "eval.max_new_tokens=16", f"hydra.run.dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval.limit=5000 but the test split has 6 rows: answering all 6" in proc.stdout
    assert json.loads((tmp_path / "eval_metrics.json").read_text())["baseline_n"] == 6
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_a_sweep_of_evaluations_counts_each_finished_job_done(tmp_path):
    """`evaluate -m`: each job that wrote its figures is done in the sweep's comparison, and the sweep exits 0."""
    proc = run_cli("evaluate", "-m", "model=tiny", "data=synthetic", "data.num_test=6", "eval.limit=2,3", "logger=none",
                   "eval.max_new_tokens=8", f"hydra.sweep.dir={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 2 of 2 jobs done" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [(row["status"], row["n"]) for row in rows] == [("done", "2"), ("done", "3")]
