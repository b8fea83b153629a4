"""Runs survive interruption, bad input and unreachable services, and lose nothing."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gsm8k_lora.training.resilience import MARKER, CheckpointGuard, RunStopped, oom_message, resume_checkpoint
from tests.conftest import OFFLINE_ENV, ROOT, compose, run_cli, write_jsonl

SHORT = ["experiment=smoke", "logger=none", "trainer.max_steps=12", "trainer.save_steps=4", "trainer.eval_steps=4",
         "trainer.logging_steps=2", "eval.enabled=false", "report.enabled=false", "data.num_train=300"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gsm8k_lora.train", *SHORT, f"hydra.run.dir={run_dir}", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **OFFLINE_ENV})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_a_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("*")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = run_cli("train", *SHORT, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_steps_and_loss(tmp_path, reference):
    proc = start(tmp_path)
    wait_for(tmp_path / "checkpoints" / "checkpoint-4" / MARKER, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "metrics.json").exists()
    resumed = run_cli("train", *SHORT, f"hydra.run.dir={tmp_path}", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "checkpoint-" in resumed.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == reference["steps"] == 12
    # same optimizer, scheduler, RNG and data order: the same numbers as the run never interrupted
    assert metrics["train_loss_last"] == pytest.approx(reference["train_loss_last"], rel=1e-5)
    assert metrics["eval_loss_last"] == pytest.approx(reference["eval_loss_last"], rel=1e-5)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir):
    proc = start(tmp_path)
    wait_for_a_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143
    assert "stopped by SIGTERM" in err and "trainer.resume=auto" in err and f"hydra.run.dir={tmp_path}" in err
    step = int(err.split("at step ")[1].split(",")[0])
    assert (tmp_path / "checkpoints" / f"checkpoint-{step}" / MARKER).exists()
    assert "SIGTERM" in json.loads((tmp_path / "failed.json").read_text())["error"]
    resumed = run_cli("train", *SHORT, f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0 and f"checkpoint-{step}" in resumed.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 12
    assert (tmp_path / "done.json").exists() and not (tmp_path / "failed.json").exists()


def test_resume_skips_half_written_checkpoints(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if complete:
            (folder / MARKER).write_text(str(step))
    assert resume_checkpoint("auto", tmp_path) == str(tmp_path / "checkpoint-8")
    assert resume_checkpoint("never", tmp_path) is None
    assert resume_checkpoint("auto", tmp_path / "none") is None
    with pytest.raises(RunStopped, match="not a checkpoint directory"):
        resume_checkpoint(str(tmp_path / "nope"), tmp_path)


class _State:
    global_step = 10


@pytest.mark.parametrize("logs", [{"loss": math.nan}, {"loss": math.inf}, {"eval_loss": math.nan}])
def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, logs):
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / MARKER).write_text("8")
    guard = CheckpointGuard(tmp_path, main_process=True)
    guard.on_log(None, _State(), None, logs={"loss": 1.0})  # finite: nothing happens
    with pytest.raises(RunStopped, match=r"became (nan|inf) at step 10; the last good checkpoint is .*checkpoint-8"):
        guard.on_log(None, _State(), None, logs=logs)


def test_sft_config_lets_a_nan_reach_the_logs(tmp_path):
    from gsm8k_lora.training.sft import build_sft_config

    assert build_sft_config(compose("experiment=smoke").trainer, tmp_path, "x").logging_nan_inf_filter is False


def test_oom_message_names_the_settings_that_reduce_memory():
    cfg = compose("trainer=default", "trainer.per_device_train_batch_size=16", "trainer.gradient_accumulation_steps=1")
    message = oom_message(cfg)
    assert "per_device_train_batch_size=8" in message and "gradient_accumulation_steps=2" in message
    assert "gradient_checkpointing=true" in message and "falcon3_1b_qlora" in message and "\n" not in message


def test_unreachable_wandb_falls_back_to_offline(tmp_path, capsys, monkeypatch):
    from gsm8k_lora import tracking
    from gsm8k_lora.naming import RunNaming

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed port on this machine
    tracker = tracking.start(compose("logger=wandb", "logger.init_timeout_s=10").logger, tmp_path,
                             RunNaming("x", None, "train"), {"a": 1})
    try:
        assert tracker.run.offline
        tracker.run.log({"loss": 1.0})
    finally:
        tracker.finish()
    out = capsys.readouterr()
    assert "logging offline instead" in out.err and "wandb sync" in out.out
    assert "0" * 40 not in (tmp_path / "wandb_run.json").read_text()


def test_malformed_json_line_is_reported_with_file_and_line(tmp_path):
    data_dir = tmp_path / "data"
    write_jsonl(data_dir / "train.jsonl", [{"question": "q", "answer": "a\n#### 1"}] * 20)
    with (data_dir / "train.jsonl").open("a") as handle:
        handle.write("{not json\n")
    proc = run_cli("train", "experiment=smoke", "logger=none", "data=local", f"data.path={data_dir}",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=180)
    assert proc.returncode == 1 and "train.jsonl:21: malformed JSON" in proc.stderr
    assert not (tmp_path / "run").exists()  # the run never began: it leaves no directory behind


def test_a_wandb_failure_mid_run_turns_wandb_off_instead_of_ending_training(capsys):
    from gsm8k_lora.tracking import safe_wandb_callback

    class Broken:
        def log(self, *args, **kwargs):
            raise ConnectionError("wandb service went away")

    class State:
        is_world_process_zero, global_step = True, 3

    callback = safe_wandb_callback()
    callback._initialized, callback._wandb = True, Broken()
    callback.on_log(None, State(), None, logs={"loss": 1.0})  # must not raise
    callback.on_log(None, State(), None, logs={"loss": 0.9})  # and stays quiet once off
    assert callback.failed
    assert capsys.readouterr().err.count("training goes on without W&B") == 1


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once_in_one_line(tmp_path, tiny_model_dir):
    proc = start(tmp_path)
    wait_for_a_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)  # within the same step: the first asked for a checkpoint after it
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    said = "\n".join(line for line in lines if "it/s]" not in line)[-3000:]  # without progress bars
    assert proc.returncode == 143, said
    assert "Traceback" not in err and lines[-1].startswith("stopped at once; checkpoints in"), said
    assert "stopped at once" in json.loads((tmp_path / "failed.json").read_text())["error"]


@pytest.mark.slow
def test_interrupting_an_evaluation_ends_in_one_line(tmp_path, tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "gsm8k_lora.evaluate", "model=tiny", "data=synthetic",
                             "logger=none", "eval.limit=200", "eval.batch_size=1", "eval.max_new_tokens=128",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **OFFLINE_ENV})
    time.sleep(1)
    deadline = time.time() + 300
    while not (tmp_path / "environment.json").exists():  # written once the model is loaded
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(2)  # answering questions
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped: interrupted")
    assert not (tmp_path / "eval_metrics.json").exists()
