"""Sweeps: a real multirun on the tiny model, read back as the W&B dashboard gets it (wandb's own reader of the
offline run files), compared locally, run again, run side by side, and with a job that fails."""

import csv
import json
from datetime import datetime

import pytest
import yaml

from gsm8k_lora import tracking
from tests.conftest import ROOT, run_cli, write_jsonl
from tests.wandb_offline import history, read_run

pytestmark = pytest.mark.slow
TINY = ["experiment=smoke", "trainer.max_steps=6", "trainer.eval_steps=3", "trainer.save_steps=3",
        "trainer.logging_steps=3", "eval.limit=6", "eval.max_new_tokens=48", "data.num_train=120", "data.num_test=10"]
# The README's form: the command line's values replace the sweep file's (its lr 1e-3,2e-3 in the smoke experiment);
# the file's epochs (1, 2) stay.
ASKED = ["trainer.learning_rate=1e-3,3e-3"]


def sweep(sweep_dir, *extra, name="lr_epochs"):
    return run_cli("train", "-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", name, *TINY,
                   f"hydra.sweep.dir={sweep_dir}", *extra)


def jobs(sweep_dir):
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, tiny_model_dir):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "smoke"
    proc = sweep(sweep_dir, *ASKED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


def test_each_job_trains_what_was_asked(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    trained = set()
    for job in jobs(sweep_dir):
        trainer = yaml.safe_load((job / "config.yaml").read_text())["trainer"]  # what SFTConfig was given
        trained.add((trainer["num_train_epochs"], trainer["learning_rate"]))
    assert trained == {(1, 1e-3), (1, 3e-3), (2, 1e-3), (2, 3e-3)}


def test_a_comma_list_for_a_grid_key_is_refused_with_the_form_that_works(tmp_path):
    proc = sweep(tmp_path / "sweep", "grid.learning_rates=1e-3,3e-3")
    assert proc.returncode == 2 and not (tmp_path / "sweep").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert "grid.learning_rates=1e-3,3e-3 is invalid" in line and "trainer.learning_rate=1e-3,3e-3" in line


def test_each_run_reads_well_on_the_dashboard(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    group = json.loads((sweep_dir / "sweep.json").read_text())["group"]
    assert group.startswith("lr_epochs ") and datetime.strptime(group.removeprefix("lr_epochs "), "%Y-%m-%d %H:%M")
    names = set()
    for job in jobs(sweep_dir):
        run = read_run(job)
        trainer = yaml.safe_load((job / "config.yaml").read_text())["trainer"]
        assert run["name"] == f"epochs={trainer['num_train_epochs']:g} lr={trainer['learning_rate']}"
        assert (run["group"], run["job_type"]) == (group, "train") and {"smoke", "tiny"} <= set(run["tags"])
        names.add(run["name"])
        config = run["config"]
        # the resolved config once, the identifying settings flat beside it, no copy of the TrainingArguments
        assert config["trainer"]["learning_rate"] == config["lr"] == trainer["learning_rate"]
        assert {"epochs", "lora_r", "lora_alpha", "lora_dropout", "model", "data", "rows_train", "eval_prompt",
                "eval_n", "seed"} <= config.keys()
        assert (config["model"], config["rows_train"], config["eval_n"]) == ("tiny", 108, 6)
        assert not {"adam_beta1", "report_to", "project", "per_device_train_batch_size"} & config.keys()
        assert len(config) < 30
        # the headline figures as metrics in their own section, and in the summary; no text, no local path
        evaluated = json.loads((job / "eval_metrics.json").read_text())
        logged = history(job)
        for key in ("finetuned_gsm8k_by_value", "finetuned_gsm8k_by_value_ci95_low", "baseline_gsm8k_strict_match",
                    "paired_by_value_mcnemar_p"):
            assert logged[f"results/{key}"] == [evaluated[key]] == [run["summary"][f"results/{key}"]]
            assert key not in run["summary"]  # one key a figure
        assert "results/eval_loss_best" in logged and "train/loss" in logged
        assert not [k for k, v in run["summary"].items() if isinstance(v, str) and not k.startswith("_")]
    assert len(names) == 4


def test_the_sweep_ends_with_a_summary_run_the_local_comparison_matches(smoke_sweep):
    sweep_dir, proc = smoke_sweep
    summary = read_run(sweep_dir)
    group = json.loads((sweep_dir / "sweep.json").read_text())["group"]
    assert (summary["job_type"], summary["group"]) == ("sweep_summary", group)
    table = summary["tables"]["sweep/jobs"]
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    assert len(table["data"]) == len(rows) == 4
    assert table["columns"] == list(rows[0].keys())[:-1]  # the same columns, the CSV's best flag aside
    for logged, local in zip(table["data"], rows, strict=True):
        cells = dict(zip(table["columns"], logged, strict=True))
        job = sweep_dir / local["job"]
        evaluated = json.loads((job / "eval_metrics.json").read_text())
        assert cells["finetuned"] == pytest.approx(float(local["finetuned"])) == evaluated["finetuned_gsm8k_by_value"]
        assert cells["finetuned_ci95_high"] == evaluated["finetuned_gsm8k_by_value_ci95_high"]
        assert cells["lr"] == local["lr"]
        assert cells["wandb_run"] == json.loads((job / "wandb_run.json").read_text())["id"]
    assert {"sweep/accuracy_grid", "sweep/val_loss_curves"} <= summary["images"]
    report = (sweep_dir / "report.md").read_text()
    for name in ("accuracy_grid", "val_loss_curves"):  # linked where drawn
        assert (sweep_dir / f"{name}.png").exists() and f"]({name}.png)" in report
    assert "sweep: 4 of 4 jobs done" in proc.stdout


def test_the_dashboard_view_spec_reads_back_with_the_librarys_own_model(smoke_sweep):
    pytest.importorskip("wandb_workspaces")
    sweep_dir, proc = smoke_sweep
    assert f"W&B view written to {sweep_dir / 'wandb_view.json'}" in proc.stdout and "--save-view" in proc.stdout
    view = tracking.read_view(sweep_dir / "wandb_view.json")
    group = json.loads((sweep_dir / "sweep.json").read_text())["group"]
    (section,) = view.sections
    kinds = [type(panel).__name__ for panel in section.panels]
    assert kinds == ["ParallelCoordinatesPlot", "ScatterPlot", "WeavePanelSummaryTable", "LinePlot"]
    axes = [column.metric for column in section.panels[0].columns]
    assert [getattr(a, "name", a) for a in axes] == ["epochs", "lr", "lora_r", "results/finetuned_gsm8k_by_value"]
    assert section.panels[2].table_name == "sweep/jobs"
    assert group in str(view.runset_settings.filters)


def test_the_baseline_is_generated_once_for_the_whole_sweep(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    sources = [json.loads((job / "eval_metrics.json").read_text())["baseline_source"] for job in jobs(sweep_dir)]
    assert sources.count("generated") == 1 and len(set(sources) - {"generated"}) == 1
    baselines = [[line for line in (job / "predictions.jsonl").read_text().splitlines() if '"baseline"' in line]
                 for job in jobs(sweep_dir)]
    assert all(b == baselines[0] for b in baselines)  # reused: the same graded answers, byte for byte


def test_running_the_sweep_again_skips_completed_jobs(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    before = {p: p.stat().st_mtime for p in sweep_dir.glob("*/metrics.json")}
    proc = sweep(sweep_dir, *ASKED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipping") == 4
    assert before == {p: p.stat().st_mtime for p in sweep_dir.glob("*/metrics.json")}


def test_jobs_run_side_by_side_under_the_parallel_sweep(tmp_path, tiny_model_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = sweep(tmp_path / "parallel", "logger=none", "trainer.num_train_epochs=1", name="parallel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads((job / "done.json").read_text()) for job in jobs(tmp_path / "parallel")]
    assert len(done) == 2 and done[0]["pid"] != done[1]["pid"]
    (first, second) = sorted(done, key=lambda d: d["started"])
    assert second["started"] < first["finished"]  # the second began before the first ended


def test_a_failing_job_is_one_line_the_others_go_on_and_the_sweep_says_which(tmp_path, tiny_model_dir):
    good, bad = tmp_path / "good", tmp_path / "bad"
    row = {"question": "What is 2 plus 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}
    write_jsonl(good / "train.jsonl", [row] * 40)
    write_jsonl(bad / "train.jsonl", [row] * 40)
    with (bad / "train.jsonl").open("a") as handle:
        handle.write("{not json\n")
    sweep_dir = tmp_path / "faulty"
    local = [a for a in TINY if not a.startswith("data.")] + ["logger=none", "eval.enabled=false", "data=local"]
    proc = run_cli("train", "-m", *local, f"data.path={good},{bad}", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "job 1 failed: error: " in proc.stderr and "train.jsonl:41: malformed JSON" in proc.stderr
    assert (sweep_dir / "0" / "done.json").exists() and (sweep_dir / "1" / "failed.json").exists()
    report = (sweep_dir / "report.md").read_text()
    assert "- job 1 (failed): DataError" in report
    assert not (sweep_dir / "accuracy_grid.png").exists() and "accuracy_grid.png" not in report  # nothing to draw
    proc = run_cli("compare", str(sweep_dir), timeout=120)
    assert proc.returncode == 0 and "job 1 failed: DataError" in proc.stdout
    # running the sweep again runs only the failed job (which fails again) and skips the done one
    proc = run_cli("train", "-m", *local, f"data.path={good},{bad}", f"hydra.sweep.dir={sweep_dir}")
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
