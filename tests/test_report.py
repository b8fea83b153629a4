"""The report of a run: built from the run directory's files, with plots that read alone."""

import json

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
