"""A full tiny run through the real entry point, as `make demo` runs it, then what a user would check."""

import json
import math

import pytest
import torch

from tests.conftest import SECRETS, load_tiny
from tests.wandb_offline import history, read_run

pytestmark = pytest.mark.slow


def test_run_prints_the_loss_falling_and_the_run_directory(smoke_run):
    run_dir, proc = smoke_run
    assert "train loss: first" in proc.stdout and f"run directory: {run_dir}" in proc.stdout
    # the terminal shows the job: no raw trainer log dicts, no W&B banner beside the package's own line
    said = proc.stdout + proc.stderr
    assert "{'loss'" not in said and "{'eval_loss'" not in said and "wandb:" not in said
    # it ends with what the run did to the answers: the format first, then accuracy, said to be noise or not
    last = proc.stdout.strip().splitlines()
    start = next(i for i, line in enumerate(last) if line.startswith("GSM8K, 30 test questions, zero-shot"))
    assert last[start + 1].startswith("  answer format (states a final answer): baseline ")
    assert last[start + 2].startswith("  accuracy, by-value (the headline): baseline ")
    assert "significant (McNemar p=" in last[start + 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["eval_loss_last"] < metrics["eval_loss_first"]
    assert f"{metrics['train_loss_first']:.4f}" in proc.stdout


def test_run_directory_is_complete(smoke_run):
    run_dir, _ = smoke_run
    for name in ("config.yaml", "environment.json", "metrics.json", "log_history.json", "loss.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "merged/config.json", "wandb_run.json", ".hydra/overrides.yaml"):
        assert (run_dir / name).exists(), name
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["trl"] and env["packages"]["transformers"] and "experiment=smoke" in env["command"]
    assert "lora:" in (run_dir / "config.yaml").read_text()


def test_metrics_are_the_figures_of_the_log_history(smoke_run):
    run_dir, _ = smoke_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())["log_history"]
    # read straight from the Trainer's records, not through the package's own summaries
    train = [row["loss"] for row in history if "loss" in row]
    val = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row]
    assert all(math.isfinite(v) for v in train) and [step for step, _ in val] == [0, 20, 40]  # eval_steps=20
    assert metrics["train_loss_first"] == train[0] and metrics["train_loss_last"] == train[-1]
    assert metrics["eval_loss_first"] == val[0][1] and metrics["eval_loss_last"] == val[-1][1]
    assert metrics["eval_loss_best"] == min(v for _, v in val)
    assert math.isclose(metrics["eval_loss_decrease_pct"], 100 * (val[0][1] - val[-1][1]) / val[0][1])
    assert metrics["steps"] == 40 and metrics["stop_reason"] == "completed"
    assert metrics["rows_train"] == 1080 and metrics["rows_validation"] == 120 and metrics["rows_test"] == 100
    assert metrics["tokens_seen"] > 40 * 16 * 20
    assert 0 < metrics["eval_token_accuracy_last"] <= 1
    assert not any(key.startswith("accuracy") or key == "gsm8k_accuracy" for key in metrics)
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    # generated-answer accuracy on the validation sample at every evaluation, beside the loss
    accuracy = [(row["step"], row["eval_gsm8k_by_value"]) for row in history if "eval_gsm8k_by_value" in row]
    assert [step for step, _ in accuracy] == [step for step, _ in val]
    assert metrics["eval_gsm8k_by_value_best"] == max(v for _, v in accuracy)
    answer_format = [row["eval_answer_format_rate"] for row in history if "eval_answer_format_rate" in row]
    assert answer_format[-1] > answer_format[0]


def test_adapter_reloads_and_reproduces_the_trained_model(smoke_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = smoke_run
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    ids = tok("Tom has 3 apples and buys 4 more.", return_tensors="pt").input_ids
    base, _ = load_tiny()
    base.eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        tuned_logits = tuned(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()(ids).logits
    assert torch.allclose(tuned_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)


def test_wandb_offline_run_holds_config_and_summary_and_no_secret(smoke_run):
    run_dir, _ = smoke_run
    logged = read_run(run_dir)
    # named by the user's own overrides, the experiment (shared by every run of it) aside
    assert logged["name"] == ("trainer.max_steps=40 trainer.save_merged=true eval.limit=30 eval.during_training=true "
                              "eval.during_training_limit=20") and logged["job_type"] == "train"
    assert logged["config"]["lora"]["r"] == 8 and logged["config"]["trainer"]["max_steps"] == 40
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert logged["summary"]["results/eval_loss_best"] == pytest.approx(metrics["eval_loss_best"])
    assert logged["summary"]["train_token_accuracy_last"] == pytest.approx(metrics["train_token_accuracy_last"])
    assert {"train/loss", "eval/loss", "train/mean_token_accuracy"} <= history(run_dir).keys()  # the live curves
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    assert logged["summary"]["results/finetuned_gsm8k_by_value"] == evaluated["finetuned_gsm8k_by_value"]
    (adapter,) = [a for a in logged["artifacts"] if a["type"] == "model"]  # a single run's own adapter
    assert adapter["name"] == f"adapter-{json.loads((run_dir / 'wandb_run.json').read_text())['id']}"
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            content = path.read_bytes()
            for secret in SECRETS.values():
                assert secret.encode() not in content, f"{secret[:6]}... written to {path}"


def test_evaluation_answers_the_same_questions_with_baseline_and_finetuned(smoke_run):
    run_dir, proc = smoke_run
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    by_model = {m: [r for r in records if r["model"] == m] for m in ("baseline", "finetuned")}
    assert [r["id"] for r in by_model["baseline"]] == [r["id"] for r in by_model["finetuned"]]
    assert len(by_model["finetuned"]) == 30 and all(r["id"].startswith("test-") for r in records)
    for name, recs in by_model.items():
        assert metrics[f"{name}_gsm8k_by_value"] == sum(r["correct"] for r in recs) / 30
        assert metrics[f"{name}_gsm8k_by_value_strict"] == sum(r["by_value_strict_correct"] for r in recs) / 30
        key = f"{name}_gsm8k_by_value"
        assert metrics[f"{key}_ci95_low"] <= metrics[key] <= metrics[f"{key}_ci95_high"]
    # what the demo shows: fine-tuning taught the answer format the base model lacks
    assert metrics["finetuned_answer_format_rate"] > metrics["baseline_answer_format_rate"]
    assert 0 <= metrics["paired_by_value_mcnemar_p"] <= 1
    assert "GSM8K, 30 test questions" in proc.stdout
    # each answer says why it is wrong, and what kind of problem it was (the synthetic generator's)
    for record in records:
        assert (record["error_category"] is None) == record["correct"]
        assert record["problem_type"] in ("one_step", "multi_step", "rates_time", "money_change")
        assert "category" not in record
