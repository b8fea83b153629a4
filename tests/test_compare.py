"""`compare`: a sweep's jobs ranked, the best one marked, failed jobs never chosen."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from gsm8k_lora.figures import HEADLINE
from tests.conftest import run_cli


def fake_job(sweep: Path, job: int, lr: str, status: str, loss: float | None, accuracy: float | None) -> None:
    job_dir = sweep / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"trainer.learning_rate={lr}"]))
    (job_dir / f"{status}.json").write_text(json.dumps({"error": "RuntimeError: boom"} if status == "failed" else {}))
    (job_dir / "metrics.json").write_text(json.dumps({"eval_loss_best": loss, "train_runtime_s": 10.0}))
    if accuracy is not None:
        (job_dir / "eval_metrics.json").write_text(json.dumps({f"finetuned_{HEADLINE.figure}": accuracy,
                                                               f"baseline_{HEADLINE.figure}": 0.1}))


@pytest.mark.parametrize("jobs, best", [
    # highest fine-tuned accuracy wins (not the lowest loss, job 0); on a tie the lower loss; a failed job never
    ([("1e-4", "done", 0.80, 0.30), ("2e-4", "done", 1.20, 0.50), ("5e-4", "done", 0.90, 0.50),
      ("1e-3", "failed", 0.50, 0.90)], "2"),
    # without evaluation, the lowest validation loss
    ([("1e-4", "done", 1.10, None), ("2e-4", "done", 0.95, None), ("5e-4", "done", 1.30, None)], "1"),
])
def test_compare_ranks_runs_and_marks_the_best(tmp_path, jobs, best):
    for number, job in enumerate(jobs):
        fake_job(tmp_path, number, *job)
    proc = run_cli("compare", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"best: {best} (" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [r["job"] for r in rows] == [str(n) for n in range(len(jobs))]
    assert [r["job"] for r in rows if r["best"] == "True"] == [best]
    table = (tmp_path / "comparison.md").read_text()
    assert f"| **{best} (best)** |" in table and table.count("(best)") == 1
