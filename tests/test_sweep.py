"""Sweeps: a real 2x2 multirun on the tiny model, compared, re-run, and one failing job."""

import csv
import json

import pytest
import yaml

from tests.conftest import ROOT, run_cli
from tests.wandb_offline import run_contents

pytestmark = pytest.mark.slow
TINY = ["experiment=smoke", "trainer.max_steps=6", "trainer.eval_steps=3", "trainer.save_steps=3",
        "trainer.logging_steps=3", "eval.limit=6", "eval.max_new_tokens=48", "data.num_train=120", "data.num_test=10"]


def sweep(sweep_dir, *extra, name="lr_epochs"):
    return run_cli("train", "-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", name, *TINY,
                   f"hydra.sweep.dir={sweep_dir}", *extra)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, tiny_model_dir):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "2026-01-01_00-00-00_smoke"
    proc = sweep(sweep_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


def test_smoke_grid_gives_four_runs_and_a_comparison_matching_them(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    jobs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    swept = {tuple(o for o in yaml.safe_load((j / ".hydra/overrides.yaml").read_text())
                   if o.startswith(("trainer.num_train_epochs", "trainer.learning_rate"))) for j in jobs}
    assert len(swept) == 4
    proc = run_cli("compare", str(sweep_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    assert len(rows) == 4 and sum(r["best"] == "True" for r in rows) == 1
    for row in rows:
        metrics = json.loads((sweep_dir / row["job"] / "metrics.json").read_text())
        evaluated = json.loads((sweep_dir / row["job"] / "eval_metrics.json").read_text())
        assert float(row["eval_loss_best"]) == pytest.approx(metrics["eval_loss_best"])
        assert float(row["finetuned_acc"]) == pytest.approx(evaluated["finetuned_gsm8k_by_value"])
        assert float(row["baseline_acc"]) == pytest.approx(evaluated["baseline_gsm8k_by_value"])
        assert row["protocol"] == "zero_shot_cot" and int(row["n"]) == evaluated["finetuned_n"]
        assert "trainer.learning_rate=" in row["overrides"] and "experiment=smoke" not in row["overrides"]
    for name in ("comparison.md", "accuracy_grid.png", "val_loss_curves.png"):
        assert (sweep_dir / name).stat().st_size > 0


def test_every_run_of_the_sweep_shares_a_wandb_group_and_is_named_by_its_overrides(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    names = set()
    for job in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        logged = run_contents(run_file)
        assert logged["group"] == sweep_dir.name
        assert "trainer.learning_rate=" in logged["name"]
        names.add(logged["name"])
        assert logged["summary"]["eval_loss_best"] == pytest.approx(
            json.loads((job / "metrics.json").read_text())["eval_loss_best"])
    assert len(names) == 4


def test_running_the_sweep_again_skips_completed_jobs(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    before = {p: p.stat().st_mtime for p in sweep_dir.glob("*/metrics.json")}
    proc = sweep(sweep_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipping") == 4
    assert before == {p: p.stat().st_mtime for p in sweep_dir.glob("*/metrics.json")}


def test_a_failing_job_does_not_stop_the_others_and_is_listed(tmp_path, tiny_model_dir):
    sweep_dir = tmp_path / "faulty"
    proc = run_cli("train", "-m", *TINY, "logger=none", "lora.r=0,4", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode != 0  # Hydra reports the failed job at the end
    assert (sweep_dir / "1" / "done.json").exists() and (sweep_dir / "1" / "metrics.json").exists()
    failure = json.loads((sweep_dir / "0" / "failed.json").read_text())
    assert "lora.r=0 is invalid" in failure["error"]
    proc = run_cli("compare", str(sweep_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["job"]: r for r in csv.DictReader((sweep_dir / "comparison.csv").open())}
    assert len(rows) == 2
    assert rows["0"]["status"] == "failed" and "lora.r=0" in rows["0"]["error"]
    assert rows["1"]["status"] == "done" and rows["1"]["best"] == "True"
    # re-running the sweep re-runs only the failed job (which fails again) and skips the done one
    proc = run_cli("train", "-m", *TINY, "logger=none", "lora.r=0,4", f"hydra.sweep.dir={sweep_dir}")
    assert proc.stdout.count("skipping") == 1


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, tiny_model_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = sweep(tmp_path / "optuna", "logger=none", "hydra.sweeper.n_trials=2", name="optuna")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"trainer.learning_rate", "lora.r", "trainer.num_train_epochs"}
    values = [json.loads((tmp_path / "optuna" / j / "done.json").read_text())["value"] for j in ("0", "1")]
    assert result["best_value"] == max(values)
    assert all(json.loads((tmp_path / "optuna" / j / "eval_metrics.json").read_text())["finetuned_n"] == 6
               for j in ("0", "1"))


def test_slurm_sweep_file_composes_with_the_launcher():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli("train", "--config-dir", str(ROOT / "sweeps"), "--config-name", "slurm", "--cfg", "hydra",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["gpus_per_node"] == 1


def test_sweep_report_compares_the_runs(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    proc = run_cli("report", str(sweep_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (sweep_dir / "report.md").read_text()
    assert report.count("| 0 |") + report.count("**0") >= 1 and "(best)" in report
    assert report.count("- job ") == 4
