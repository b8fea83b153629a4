"""The training callbacks at work in real (tiny) runs: early stopping on validation loss, the best checkpoint
chosen by generated GSM8K accuracy during training, and the self-consistency figures that run ends with."""

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from gsm8k_lora.figures import HEADLINE
from tests.conftest import run_cli

# Small enough for seconds per step on 2 CPU cores; every run writes no report and logs nowhere.
TINY = ["experiment=smoke", "logger=none", "report.enabled=false", "data.num_train=200", "data.num_test=20"]
GENERATED = f"eval_{HEADLINE.figure}"  # GSM8K accuracy of generated answers on the validation sample, each evaluation


def evaluations(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in history if key in row]


@pytest.mark.slow
def test_early_stopping_ends_the_run_when_validation_loss_stops_improving(tmp_path, tiny_model_dir):
    # a learning rate far too high: validation loss rises from the first steps, so patience runs out
    proc = run_cli("train", *TINY, "eval.enabled=false", "trainer.learning_rate=0.5", "trainer.max_steps=20",
                   "trainer.logging_steps=1", "trainer.eval_steps=1", "trainer.save_steps=1",
                   "trainer.early_stopping_patience=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    history = json.loads((tmp_path / "log_history.json").read_text())["log_history"]
    # where patience 2 must stop: at the second evaluation in a row without a lower eval_loss than the best
    # so far (the evaluation before training is a reference point the Trainer does not count)
    best, waited, expected = None, 0, None
    for step, loss in evaluations(history, "eval_loss"):
        if step == 0:
            continue
        best, waited = (loss, 0) if best is None or loss < best else (best, waited + 1)
        if waited == 2:
            expected = step
            break
    assert expected is not None and expected < 20
    assert metrics["stop_reason"] == "early_stopping" and metrics["steps"] == expected < metrics["max_steps"] == 20
    assert f"stop: early_stopping at step {expected}" in proc.stdout


@pytest.fixture(scope="module")
def accuracy_selected_run(tmp_path_factory, tiny_model_dir):
    """Best checkpoint chosen by GSM8K accuracy on a validation sample; the test questions answered 3 times."""
    run_dir = tmp_path_factory.mktemp("best_by_accuracy") / "run"
    proc = run_cli("train", *TINY, "trainer.max_steps=6", "trainer.logging_steps=2", "trainer.eval_steps=2",
                   "trainer.save_steps=2", "trainer.save_total_limit=1", "eval.during_training=true",
                   "eval.during_training_limit=6", f"trainer.metric_for_best_model={GENERATED}",
                   "eval.num_samples=3", "eval.temperature=1.0", "eval.limit=8", "eval.max_new_tokens=32",
                   "eval.compare_baseline=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.slow
def test_best_checkpoint_is_chosen_by_generated_accuracy(accuracy_selected_run):
    run_dir, _ = accuracy_selected_run
    history = json.loads((run_dir / "log_history.json").read_text())["log_history"]
    accuracy, loss = evaluations(history, GENERATED), evaluations(history, "eval_loss")
    assert [step for step, _ in accuracy] == [step for step, _ in loss] == [0, 2, 4, 6]  # beside every loss
    # the Trainer keeps the first saved step with the highest accuracy (a later tie is not better)
    saved = [(step, value) for step, value in accuracy if step > 0]
    by_accuracy = next(step for step, value in saved if value == max(v for _, v in saved))
    by_loss = min((value, step) for step, value in loss if step > 0)[1]
    assert by_accuracy != by_loss, "this run cannot tell the two metrics apart; change its settings"
    best = Path(json.loads((run_dir / "metrics.json").read_text())["best_checkpoint"])
    assert best.name == f"checkpoint-{by_accuracy}" and best.is_dir()  # kept despite save_total_limit=1
    # the report (written again from the run's files) says how many rows each validation figure used
    proc = run_cli("report", str(run_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GSM8K accuracy during training on 6 validation questions" in (run_dir / "report.md").read_text()


@pytest.mark.slow
def test_self_consistency_figures_agree_with_the_samples(accuracy_selected_run):
    run_dir, proc = accuracy_selected_run
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(len(r["samples"]) == len(r["sample_preds"]) == 3 for r in records)
    assert all(r["samples"][0] == r["completion"] for r in records)  # the graded answer is the first sample
    assert any(len(set(r["samples"])) > 1 for r in records), "sampling at temperature 1 gave identical samples"

    def right(pred, gold) -> bool:
        return pred is not None and Fraction(pred) == Fraction(gold)

    majority = [Counter(p for p in r["sample_preds"] if p is not None).most_common(1) for r in records]
    maj = sum(bool(m) and right(m[0][0], r["gold"]) for m, r in zip(majority, records, strict=True)) / 8
    passed = sum(any(right(p, r["gold"]) for p in r["sample_preds"]) for r in records) / 8
    first = sum(r["correct"] for r in records) / 8
    assert metrics["finetuned_gsm8k_maj@3"] == maj and metrics["finetuned_gsm8k_pass@3"] == passed
    assert metrics[f"finetuned_{HEADLINE.figure}"] == first
    # by definition: one of the samples is right whenever the vote, or the first sample, is right
    assert passed >= maj >= 0 and passed >= first
    # shown where people look, with intervals, named as sampled: the terminal and the report's table
    low, high = metrics["finetuned_gsm8k_maj@3_ci95_low"], metrics["finetuned_gsm8k_maj@3_ci95_high"]
    assert low <= maj <= high
    assert "3 samples at temperature 1.0 (maj@3, pass@3)" in proc.stdout
    assert f"maj@3, by-value (the headline): fine-tuned {maj:.1%} [{low:.1%}, {high:.1%}]" in proc.stdout
    assert "pass@3, by-value: fine-tuned" in proc.stdout and "the first sample alone" in proc.stdout
    assert run_cli("report", str(run_dir), timeout=120).returncode == 0
    report = (run_dir / "report.md").read_text()
    assert "| maj@3 (the headline) |" in report and "| pass@3 |" in report
    assert f"{maj:.1%} [{low:.1%}, {high:.1%}]" in report














