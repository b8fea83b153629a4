"""What keeps a paid run from being lost (training/resilience.py, stopping.py): resume after a kill, a stop
by signal at any stage, half-written checkpoints, a loss that is no longer finite, out of memory, a full disk."""

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gsm8k_lora.training.resilience import MARKER, CheckpointGuard, RunStopped, oom_message, resume_checkpoint
from tests.conftest import OFFLINE_ENV, ROOT, compose, run_cli

SHORT = ["experiment=smoke", "logger=none", "trainer.max_steps=12", "trainer.save_steps=4", "trainer.eval_steps=4",
         "trainer.logging_steps=2", "eval.enabled=false", "report.enabled=false", "data.num_train=300"]


def start(run_dir: Path, *extra: str, args: list[str] = SHORT) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gsm8k_lora.train", *args, f"hydra.run.dir={run_dir}", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **OFFLINE_ENV})


class Watched:
    """A process whose stderr is read as it comes (progress bars included), so a test can act on what it says."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.err = proc, ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(64), ""):
            self.err += chunk

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while text not in self.err:
            assert self.proc.poll() is None, self.err[-2000:]
            assert time.time() < deadline, f"{text!r} never said"
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> str:
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return self.err


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
    # the killed process never released its lock: recognised as stale and taken over, saying so
    assert f"took over the lock of {tmp_path} left by pid {proc.pid}" in resumed.stderr
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
    assert "stopped: by SIGTERM" in err and f"hydra.run.dir={tmp_path}" in err
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
    guard = CheckpointGuard(tmp_path)
    guard.on_log(None, _State(), None, logs={"loss": 1.0})  # finite: nothing happens
    with pytest.raises(RunStopped, match=r"became (nan|inf) at step 10; the last good checkpoint is .*checkpoint-8"):
        guard.on_log(None, _State(), None, logs=logs)


def test_sft_config_lets_a_nan_reach_the_logs(tmp_path):
    from gsm8k_lora.training.sft import build_sft_config

    assert build_sft_config(compose("experiment=smoke").trainer, tmp_path, "x").logging_nan_inf_filter is False


def test_oom_message_names_the_settings_that_reduce_memory():
    cfg = compose("trainer=default", "trainer.per_device_train_batch_size=16", "trainer.gradient_accumulation_steps=1")
    message = oom_message(cfg.trainer, cfg.model)
    assert "per_device_train_batch_size=8" in message and "gradient_accumulation_steps=2" in message
    assert "gradient_checkpointing=true" in message and "falcon3_1b_qlora" in message and "\n" not in message








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
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "stopped by SIGINT before the answers were graded; no results were written"
    assert not (tmp_path / "eval_metrics.json").exists()


def said(err: str) -> str:
    """stderr without its progress bars."""
    lines = (line.replace("\x1b[A", "").strip() for line in err.replace("\r", "\n").splitlines())
    return "\n".join(line for line in lines if line and not any(bar in line for bar in ("it/s]", "s/it]", "%|")))


@pytest.mark.slow
def test_a_stop_during_the_validation_loss_comes_within_a_batch_and_saves_the_steps(tmp_path, tiny_model_dir):
    """SIGTERM while the validation loss is computed (a long pass: 600 rows, one a batch) is honoured within a
    batch, not after the pass: the checkpoint it saves has no validation loss for that step."""
    proc = Watched(start(tmp_path, "trainer.per_device_eval_batch_size=1", "data.num_train=6000",
                         "trainer.max_steps=8", "trainer.eval_steps=4"))
    proc.wait_for("Validation loss")
    proc.proc.send_signal(signal.SIGTERM)
    err = said(proc.finish())
    assert proc.proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "stopped: by SIGTERM during the validation loss at step 0" in err.splitlines()[-1]
    checkpoint = tmp_path / "checkpoints" / "checkpoint-0"
    assert (checkpoint / MARKER).exists()
    logged = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert not any("eval_loss" in row for row in logged)  # the pass was cut short, not waited for


@pytest.mark.slow
def test_a_stop_while_answering_keeps_the_training_and_its_resume_only_answers(tmp_path, tiny_model_dir):
    args = [a for a in SHORT if a != "eval.enabled=false"]
    proc = Watched(start(tmp_path, "eval.limit=100", "eval.batch_size=1", "eval.max_new_tokens=128", args=args))
    proc.wait_for("Baseline answers")
    proc.proc.send_signal(signal.SIGTERM)
    err = said(proc.finish())
    assert proc.proc.returncode == 143, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("stopped")]
    assert "while answering the test questions; the training results are kept" in line and "Traceback" not in err
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "eval_metrics.json").exists()
    trained = (tmp_path / "log_history.json").read_text()
    resumed = run_cli("train", *args, "eval.limit=4", "eval.max_new_tokens=16", f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "training finished earlier, at step 12" in resumed.stdout
    assert (tmp_path / "log_history.json").read_text() == trained and (tmp_path / "eval_metrics.json").exists()


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A filesystem of `size` mounted at `path` (tmpfs: root only), or pytest.skip where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({mounted.stderr.strip()}); the file-size-limit test "
                    f"stands in for it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


DISK = ["trainer.save_steps=2", "trainer.eval_steps=2", "trainer.max_steps=12", "trainer.save_total_limit=1"]


@pytest.mark.slow
def test_a_run_that_cannot_fit_is_refused_before_training(tmp_path, tiny_model_dir):
    with small_disk(tmp_path / "disk", "3m") as disk:
        proc = run_cli("train", *SHORT, f"hydra.run.dir={disk / 'run'}", "trainer.save_steps=2",
                       "trainer.eval_steps=2")
        err = said(proc.stderr)
        assert proc.returncode == 74 and "Traceback" not in err, err[-2000:]
        line = err.splitlines()[-1]
        assert line.startswith(f"disk full: not enough disk for this run: {disk / 'run'} has ")
        assert "4 checkpoints of about" in line and "trainer.save_total_limit" in line  # limit 2, +1 written, +best
        assert not (disk / "run").exists()  # nothing trained, nothing left


@pytest.mark.slow
def test_a_disk_that_fills_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir):
    with small_disk(tmp_path / "disk", "8m") as disk:
        run_dir = disk / "run"
        proc = Watched(start(run_dir, *DISK))
        wait_for(run_dir / "checkpoints" / "checkpoint-2" / MARKER, proc.proc)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 300 * 1024))  # another process fills the disk
        err = said(proc.finish())
        assert proc.proc.returncode == 74, err[-3000:]
        (line,) = [line for line in err.splitlines() if line.startswith("disk full:")]
        assert err.splitlines()[-1] == line and "Traceback" not in err
        assert f"no space is left on the disk where {run_dir} is written" in line
        kept = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
        assert len(kept) == 1 and f"{kept[0]}, the last complete one, is kept" in line and "it resumes from" in line
        assert (run_dir / "checkpoints" / kept[0] / MARKER).exists()  # the half-written one is gone
        assert not list(run_dir.rglob("*.tmp")) and (run_dir / "failed.json").stat().st_size > 0
        (disk / "filler").unlink()
        resumed = run_cli("train", *SHORT, *DISK, f"hydra.run.dir={run_dir}")
        assert resumed.returncode == 0 and f"resuming from {run_dir / 'checkpoints' / kept[0]}" in resumed.stdout
        assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_too(tmp_path, tiny_model_dir):
    """Where no filesystem can be mounted: a write-size limit (ulimit -f) stops the first checkpoint's largest
    file, as a full disk would."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    proc = subprocess.run([sys.executable, "-m", "gsm8k_lora.train", *SHORT, *DISK, f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV}, preexec_fn=limit,
                          timeout=300)
    err = said(proc.stderr)
    assert proc.returncode == 74, err[-3000:]
    assert err.splitlines()[-1].startswith("disk full: a file reached the size limit of this process (ulimit -f)")
    assert "no checkpoint was complete yet" in err and "Traceback" not in err and not list(tmp_path.rglob("*.tmp"))
