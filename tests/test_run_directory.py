"""A run directory holds one run: one process works in it at a time; a rerun continues it only with the same
training settings, never trains past its end, goes straight to evaluation once its training is written, and
starts afresh only when asked; a run that never began leaves nothing behind."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gsm8k_lora.config import compose_raw
from gsm8k_lora.rundir import RunDirectory, training_differences
from tests.conftest import OFFLINE_ENV, ROOT, run_cli

RUN = ["experiment=smoke", "logger=none", "report.enabled=false", "trainer.max_steps=4", "trainer.save_steps=4",
       "trainer.eval_steps=4", "trainer.logging_steps=2", "eval.limit=4", "eval.max_new_tokens=16",
       "data.num_train=120", "data.num_test=10"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def snapshot(run_dir: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "log_history.json").read_text())["log_history"]


@pytest.mark.slow
def test_a_rerun_with_other_training_settings_is_refused_and_touches_nothing(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)
    proc = run_cli("train", *RUN, f"hydra.run.dir={run_dir}", "trainer.learning_rate=1e-3", "lora.r=4")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "trainer.learning_rate 0.002 -> 0.001" in line and "lora.r 8 -> 4" in line
    assert "new hydra.run.dir" in line and "trainer.resume=never" in line
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_rerun_of_a_completed_run_is_skipped_and_says_how_to_run_it_again(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    proc = run_cli("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping" in proc.stdout and "add trainer.resume=never" in proc.stdout


@pytest.mark.slow
def test_a_run_stopped_after_training_answers_without_training_again(finished_run, tmp_path):
    """Killed while answering: its adapter and metrics.json are written, done.json is not. The rerun may change
    how it is evaluated (eval.*), and trains nothing."""
    run_dir = copy_of(finished_run, tmp_path)
    for name in ("done.json", "eval_metrics.json", "predictions.jsonl"):
        (run_dir / name).unlink()
    trained = history(run_dir)
    proc = run_cli("train", *RUN, f"hydra.run.dir={run_dir}", "eval.limit=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training finished earlier, at step 4" in proc.stdout
    assert history(run_dir) == trained
    assert json.loads((run_dir / "eval_metrics.json").read_text())["finetuned_n"] == 6


@pytest.mark.slow
def test_a_run_whose_last_checkpoint_is_its_end_is_not_trained_past_it(finished_run, tmp_path):
    """Killed after its last checkpoint, before its adapter and metrics were written: the Trainer resumed from
    that checkpoint would train a step past max_steps."""
    run_dir = copy_of(finished_run, tmp_path)
    shutil.rmtree(run_dir / "adapter")
    for name in ("done.json", "metrics.json", "eval_metrics.json", "predictions.jsonl"):
        (run_dir / name).unlink()
    proc = run_cli("train", *RUN, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training had finished at" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["stop_reason"] == "completed"
    timings = ("baseline_answer_s", "finetuned_answer_s", "baseline_source", "baseline_answer_processes")
    original = {k: v for k, v in json.loads((finished_run / "eval_metrics.json").read_text()).items()
                if k not in timings}
    again = json.loads((run_dir / "eval_metrics.json").read_text())
    assert again.pop("baseline_source") != "generated"  # reused from the cache: same base, same questions
    assert "baseline_answer_s" not in again and "baseline_answer_processes" not in again  # not answered here
    assert {k: v for k, v in again.items() if k not in timings} == original  # the same trained weights


@pytest.mark.slow
def test_resume_never_starts_the_directory_afresh(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    proc = run_cli("train", *RUN, f"hydra.run.dir={run_dir}", "trainer.learning_rate=1e-3", "trainer.resume=never")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "afresh" in proc.stdout and "resuming" not in proc.stdout
    rates = [row["learning_rate"] for row in history(run_dir) if "learning_rate" in row]
    assert rates and max(rates) <= 1e-3  # every logged step trained at the new rate, none at 2e-3


@pytest.mark.slow
def test_a_second_process_in_the_same_run_directory_is_refused_at_once(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gsm8k_lora.train", *RUN, "trainer.max_steps=30",
                              f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, **OFFLINE_ENV})
    deadline = time.time() + 120
    while not (run_dir / ".lock.json").exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = run_cli("train", *RUN, "eval.limit=5", f"hydra.run.dir={run_dir}", timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {run_dir} is in use by pid {first.pid} on {socket.gethostname()}, started ")
    assert first.poll() is None  # refused while the first still works
    assert "eval.limit=5" not in (run_dir / ".hydra" / "overrides.yaml").read_text()  # it touched nothing
    assert first.wait(timeout=300) == 0 and (run_dir / "done.json").exists() and not (run_dir / ".lock.json").exists()


def resolved(*overrides: str) -> dict:
    """The resolved config a run directory's config.yaml holds, as train compares it on a rerun."""
    return OmegaConf.to_container(compose_raw(["experiment=smoke", *overrides]), resolve=True)


def test_only_settings_that_shape_training_must_match_on_a_rerun():
    old = resolved()
    assert training_differences(old, resolved("eval.limit=3", "logger=none", "report.enabled=false")) == []
    assert training_differences(old, resolved("trainer.learning_rate=0.5")) == [
        f"trainer.learning_rate {old['trainer']['learning_rate']!r} -> 0.5"]
    # accuracy during training can choose the best checkpoint: an eval.* key that must match
    assert [d.split()[0] for d in training_differences(old, resolved("eval.during_training_limit=3"))] == [
        "eval.during_training_limit"]
    # a key only one config has (written by another version of the package) is not compared
    newer = {**old, "trainer": {**old["trainer"], "new_setting": 1}}
    assert training_differences(old, newer) == []


def test_a_directory_this_process_made_that_holds_no_run_is_removed_and_one_holding_a_run_is_kept(tmp_path):
    empty = RunDirectory(tmp_path / "empty")  # made by this process, after the object
    (empty.path / ".hydra").mkdir(parents=True)
    (empty.path / "failed.json").write_text("{}")
    assert empty.discard_if_empty() and not empty.path.exists()
    run = RunDirectory(tmp_path / "run")
    (run.path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run.path / "checkpoints" / "checkpoint-2" / ".complete").write_text("2")
    assert not run.discard_if_empty() and run.path.exists()
    (tmp_path / "earlier").mkdir()  # there before: another run's, kept whatever it holds
    assert not RunDirectory(tmp_path / "earlier").discard_if_empty() and (tmp_path / "earlier").exists()
