"""The report of a run: built from the run directory's files, with plots that read alone."""

import json

import pytest

from gsm8k_lora.evaluation.scoring import accuracy_by_steps
from gsm8k_lora.reporting import plots
from tests.conftest import run_cli


def test_a_run_without_results_is_said_to_have_none_before_anything_else(tmp_path):
    (tmp_path / "failed.json").write_text(json.dumps({"error": "DataError: train.jsonl:3: malformed JSON"}))
    proc = run_cli("report", str(tmp_path), timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"error: {tmp_path} holds no results to report: it failed: DataError: train.jsonl:3: malformed JSON"


def test_accuracy_by_steps_shows_both_models_with_their_intervals():
    def records(right: list[bool]) -> list[dict]:
        return [{"num_steps": 2 + i % 2, "correct": ok} for i, ok in enumerate(right)]

    figure = plots.accuracy_by_steps({"baseline": accuracy_by_steps(records([False, True, False, False])),
                                      "finetuned": accuracy_by_steps(records([True, True, False, True]))})
    (ax,) = figure.axes
    assert "baseline and fine-tuned" in ax.get_title() and "95% intervals" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "finetuned"]
    heights = [[bar.get_height() for bar in container] for container in ax.containers if hasattr(container, "patches")]
    assert heights == [[0.0, 0.5], [0.5, 1.0]]  # by steps 2, 3: baseline 0/2, 1/2; fine-tuned 1/2, 2/2
    assert sum(1 for container in ax.containers if hasattr(container, "lines")) == 2  # an error bar set per model


def test_the_report_counts_the_answers_the_model_s_context_bounded():
    from gsm8k_lora.reporting.report import context_rows

    ev = {"baseline_n": 7, "baseline_prompts_cut": 7, "baseline_answers_stopped_at_context_end": 0,
          "baseline_prompts_not_fitting": 0, "finetuned_n": 7, "finetuned_prompts_cut": 6,
          "finetuned_answers_stopped_at_context_end": 2, "finetuned_prompts_not_fitting": 1}
    rows = context_rows(ev)
    assert rows[1] == ("| model | prompts cut at the start (lm-eval's rule) | answers stopped at the context's end | "
                       "prompts that left no room (not answered) |")
    assert rows[3:] == ["| baseline | 7 | 0 | 0 |", "| finetuned | 6 | 2 | 1 |"]
    assert context_rows({"finetuned_n": 7})[3:] == ["| finetuned | n/a | n/a | n/a |"]  # a run made before they were


@pytest.mark.slow
def test_report_states_the_figures_of_the_metrics_files(smoke_run):
    run_dir, proc = smoke_run
    report = (run_dir / "report.md").read_text()
    m = json.loads((run_dir / "metrics.json").read_text())
    ev = json.loads((run_dir / "eval_metrics.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())["log_history"]
    for key in ("train_loss_first", "train_loss_last", "eval_loss_best", "eval_token_accuracy_last"):
        assert f"{m[key]:.4f}" in report, key
    assert f"{m['eval_loss_decrease_pct']:.1f}%" in report
    assert f"{m['rows_train']} train / {m['rows_validation']} validation / {m['rows_test']} test" in report
    # one row per accuracy, naming its extraction rule and n, both models with their 95% intervals
    assert "Protocol: zero-shot (the training prompt)" in report
    assert "- Trainer: lr 0.002, max_steps 40 (40 of 40 steps run)" in report
    for label, rule in (("by-value (the headline)", "gsm8k_by_value"), ("by-value strict", "gsm8k_by_value_strict"),
                        ("lm-eval strict-match", "gsm8k_strict_match"),
                        ("lm-eval flexible-extract", "gsm8k_flexible_extract")):
        (row,) = [line for line in report.splitlines() if line.startswith(f"| {label} |")]
        cells = [cell.strip() for cell in row.strip().strip("|").split(" | ")]
        assert len(cells) == 6 and cells[1] and cells[2] == "30", row
        for cell, name in zip(cells[3:5], ("baseline", "finetuned"), strict=True):
            key = f"{name}_{rule}"
            assert cell == f"{ev[key]:.1%} [{ev[key + '_ci95_low']:.1%}, {ev[key + '_ci95_high']:.1%}]", row
    assert f"p={ev['paired_by_value_mcnemar_p']:.3g}" in report
    for name in ("baseline", "finetuned"):  # how many answers the model's context bounded
        counts = (ev[f"{name}_{count}"] for count in ("prompts_cut", "answers_stopped_at_context_end",
                                                      "prompts_not_fitting"))
        assert f"| {name} | " + " | ".join(str(c) for c in counts) + " |" in report
    # the learning-curve line, from the validation losses: in 40 steps evaluated every 20, the last quarter
    # holds one evaluation, so the reading spans the last two (steps 20 to 40: half of the steps)
    (_, before), (_, last) = [(row["step"], row["eval_loss"]) for row in history if "eval_loss" in row][-2:]
    change = 100 * (last - before) / before
    verb = "fell" if change < -0.5 else ("rose" if change > 0.5 else "changed")  # within +-0.5%: a plateau
    (line,) = [line for line in report.splitlines() if line.startswith("- Validation loss")]
    assert line.startswith(f"- Validation loss {verb} ") and "over the last 50% of steps" in line
    assert f"{abs(change):.1f}%" in line
    assert "It is not GSM8K accuracy" in report and "a CPU run, no GPU-hours" in report
    assert (run_dir / "accuracy_by_steps.png").stat().st_size > 0
    # the CLI rewrites the same report from the files alone
    before = report
    proc = run_cli("report", str(run_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report.md").read_text() == before
