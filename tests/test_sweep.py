"""Sweeps: a real multirun on the tiny model (2 learning rates x 2 seeds), read back as the W&B dashboard gets it
(wandb's own reader of the offline run files), compared locally, run again, run side by side, and with a job that
fails."""

import csv
import hashlib
import json
import shutil
import statistics
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
# one epoch, no longer swept; each setting with two seeds (make sweep SEEDS=2).
ASKED = ["trainer.learning_rate=1e-3,3e-3", "trainer.num_train_epochs=1", "grid.seeds=2"]


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
    trained, split = set(), set()
    for job in jobs(sweep_dir):
        config = yaml.safe_load((job / "config.yaml").read_text())
        trainer = config["trainer"]  # what SFTConfig was given
        trained.add((trainer["num_train_epochs"], trainer["learning_rate"], trainer["seed"]))
        split.add((config["data"]["split_seed"], config["data"]["synthetic_seed"]))
    assert trained == {(1, 1e-3, 42), (1, 1e-3, 43), (1, 3e-3, 42), (1, 3e-3, 43)}
    assert len(split) == 1  # the seeds vary training only: every job answers the same questions
    questions = [[json.loads(line)["id"] for line in (job / "predictions.jsonl").read_text().splitlines()]
                 for job in jobs(sweep_dir)]
    assert all(q == questions[0] for q in questions)


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
        assert run["name"] == f"lr={trainer['learning_rate']} seed={trainer['seed']}"
        assert (run["group"], run["job_type"]) == (group, "train") and {"smoke", "tiny"} <= set(run["tags"])
        names.add(run["name"])
        config = run["config"]
        assert config["setting"] == f"lr={trainer['learning_rate']}"  # a setting's seeds share it: W&B groups by it
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
    assert len(table["data"]) == len(rows) == 2 + 4  # a row per setting, then the per-seed rows
    assert table["columns"] == list(rows[0].keys())
    for logged, local in zip(table["data"], rows, strict=True):
        cells = dict(zip(table["columns"], logged, strict=True))
        assert (cells["level"], cells["setting"], cells["lr"]) == (local["level"], local["setting"], local["lr"])
        assert cells["finetuned"] == pytest.approx(float(local["finetuned"]))
        seeds = [sweep_dir / number for number in local["job"].split()]
        evaluated = [json.loads((job / "eval_metrics.json").read_text()) for job in seeds]
        assert cells["finetuned"] == pytest.approx(statistics.mean(e["finetuned_gsm8k_by_value"] for e in evaluated))
        if local["level"] == "job":
            (job,) = seeds
            assert cells["finetuned_ci95_high"] == evaluated[0]["finetuned_gsm8k_by_value_ci95_high"]
            assert cells["wandb_run"] == json.loads((job / "wandb_run.json").read_text())["id"]
        else:
            assert (cells["seeds"], cells["seed"]) == (2, "42 43")
            assert cells["finetuned_std"] == pytest.approx(statistics.stdev(e["finetuned_gsm8k_by_value"]
                                                                            for e in evaluated))
    assert {"sweep/accuracy_grid", "sweep/val_loss_curves"} <= summary["images"]
    report = (sweep_dir / "report.md").read_text()
    for name in ("accuracy_grid", "val_loss_curves"):  # linked where drawn
        assert (sweep_dir / f"{name}.png").exists() and f"]({name}.png)" in report
    assert "sweep: 4 of 4 jobs done" in proc.stdout


def test_the_report_and_the_summary_run_say_what_the_ranking_allows(smoke_sweep):
    sweep_dir, _ = smoke_sweep
    report, summary = (sweep_dir / "report.md").read_text(), read_run(sweep_dir)
    accuracy = {label: statistics.mean(json.loads((sweep_dir / str(job) / "eval_metrics.json").read_text())
                                       ["finetuned_gsm8k_by_value"] for job in numbers)
                for label, numbers in (("lr=0.001", (0, 1)), ("lr=0.003", (2, 3)))}
    if accuracy["lr=0.001"] == accuracy["lr=0.003"]:  # the tiny model often answers nothing right: a tie
        assert "**No single best:** lr=0.001, lr=0.003 tie" in report and "(best)" not in report
        assert "not distinguishable: they tie" in report
    else:
        best, second = sorted(accuracy, key=accuracy.get, reverse=True)
        assert f"**Best:** {best}" in report and f"distinguishable from the runner-up {second}" in report
    assert "**Smallest detectable difference:**" in report and "**Seeds:** 2 per setting" in report
    assert summary["notes"].splitlines()[0] in report  # the summary run's notes: the same sentences
    assert summary["summary"]["sweep/seeds"] == 2 and summary["summary"]["sweep/settings"] == 2


def test_each_adapter_is_an_artifact_and_the_predictions_carry_question_ids(smoke_sweep, tiny_model_dir):
    sweep_dir, _ = smoke_sweep
    group = json.loads((sweep_dir / "sweep.json").read_text())["group"]
    base = hashlib.sha256(f"model.safetensors {sha256(tiny_model_dir / 'model.safetensors')}\n".encode()).hexdigest()
    digests = {}
    for job in jobs(sweep_dir):
        run = read_run(job)
        (artifact,) = [a for a in run["artifacts"] if a["type"] == "model"]  # (W&B keeps tables as artifacts too)
        collection = "adapter-" + group.replace(" ", "-").replace(":", "-")  # one per sweep, a version per job
        assert (artifact["type"], artifact["name"]) == ("model", collection)
        metadata = json.loads(artifact["metadata"])
        assert (metadata["base_model"], metadata["base_model_revision"]) == ("builtin:tiny", None)
        assert metadata["base_weights_sha256"] == base  # the tiny model's weights, hashed here independently
        files = {entry["path"]: entry for entry in artifact["manifest"]["contents"]}
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files.keys()
        assert "training_args.bin" not in files  # a pickle holding local paths stays home
        weights = job / "adapter" / "adapter_model.safetensors"
        assert int(files["adapter_model.safetensors"]["size"]) == weights.stat().st_size
        assert json.loads((job / "wandb_run.json").read_text())["artifact"]["digest"] == artifact["digest"]
        digests[job.name] = artifact["digest"]
        # the predictions table, question by question: the ids the run directory holds
        table = run["tables"]["eval/predictions"]
        ids = [row[table["columns"].index("id")] for row in table["data"]]
        assert ids == [json.loads(line)["id"] for line in (job / "predictions.jsonl").read_text().splitlines()]
    assert len(set(digests.values())) == 4  # four trainings, four versions of the sweep's adapter
    aliased = [a for a in read_run(sweep_dir)["artifacts"] if a["type"] == "model" and "best" in a["aliases"]]
    rows = list(csv.DictReader((sweep_dir / "comparison.csv").open()))
    if any(r["best"] == "best" for r in rows):  # the best job's adapter again: the same digest, one version
        assert [a["digest"] for a in aliased] and aliased[0]["digest"] in digests.values()
    else:  # a tie: no winner, no alias
        assert aliased == []


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    assert [getattr(a, "name", a) for a in axes] == ["lr", "epochs", "lora_r", "results/finetuned_gsm8k_by_value"]
    assert section.panels[2].table_name == "sweep/jobs"
    assert group in str(view.runset_settings.filters)
    assert [getattr(g, "name", g) for g in view.runset_settings.groupby] == ["setting"]  # a setting's seeds as one


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
    """Job 1's model has a config.json that does not match its weights: found when the job loads it."""
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    sweep_dir = tmp_path / "faulty"
    models = f"model.name_or_path={tiny_model_dir},{bad}"
    proc = run_cli("train", "-m", *TINY, "logger=none", "eval.enabled=false", models, f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "job 1 failed: error: " in proc.stderr and "config.json does not match the weights" in proc.stderr
    assert (sweep_dir / "0" / "done.json").exists() and (sweep_dir / "1" / "failed.json").exists()
    report = (sweep_dir / "report.md").read_text()
    assert "- job 1 (failed): ModelLoadError" in report
    assert not (sweep_dir / "accuracy_grid.png").exists() and "accuracy_grid.png" not in report  # nothing to draw
    proc = run_cli("compare", str(sweep_dir), timeout=120)
    assert proc.returncode == 0 and "job 1 failed: ModelLoadError" in proc.stdout
    # running the sweep again runs only the failed job (which fails again) and skips the done one
    proc = run_cli("train", "-m", *TINY, "logger=none", "eval.enabled=false", models, f"hydra.sweep.dir={sweep_dir}")
    assert proc.stdout.count("skipping") == 1


def test_a_broken_data_file_of_one_job_stops_the_sweep_before_any_job_starts(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    row = {"question": "What is 2 plus 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}
    write_jsonl(good / "train.jsonl", [row] * 40)
    write_jsonl(bad / "train.jsonl", [row] * 40)
    with (bad / "train.jsonl").open("a") as handle:
        handle.write("{not json\n")
    sweep_dir = tmp_path / "faulty"
    local = [a for a in TINY if not a.startswith("data.")] + ["logger=none", "data=local"]
    proc = run_cli("train", "-m", *local, f"data.path={good},{bad}", f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {bad / 'train.jsonl'}:41: malformed JSON")
    assert not any(sweep_dir.glob("[0-9]*"))  # no job ran


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
