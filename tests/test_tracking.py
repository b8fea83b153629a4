"""W&B: offline when no key is configured or the server does not answer, and a failure mid-run never ends
training. What a run and a sweep send is read back from the offline files in test_train and test_sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, compose

WANDB_START = """
import sys
from pathlib import Path
from gsm8k_lora import tracking
from gsm8k_lora.config import compose
from gsm8k_lora.naming import RunNaming
cfg = compose(["logger=wandb", "logger.project=offline-check"]).logger
print("mode:", tracking.resolve_mode(cfg))
if sys.argv[1:]:
    tracking.start(cfg, Path(sys.argv[1]), RunNaming("offline-check", None, "train"), {"lora": {"r": 8}}).finish()
"""


def without_wandb_setup(home: Path) -> dict:
    """The environment of a machine where W&B was never set up: no key, no netrc, no W&B variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "XDG_CONFIG_HOME")}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "NETRC": str(home / ".netrc")}


def test_wandb_logs_offline_and_prints_the_sync_command_when_no_key_is_configured(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = without_wandb_setup(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", WANDB_START, str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mode: offline" in proc.stdout and "online start failed" not in proc.stderr
    (offline,) = run_dir.glob("wandb/offline-run-*")
    assert f"upload later with: wandb sync {offline}" in proc.stdout
    assert json.loads((run_dir / "wandb_run.json").read_text())["sync"] == f"wandb sync {offline}"
    assert list(offline.glob("run-*.wandb"))
    # the same machine with a key in its netrc logs online: the offline choice above was made for lack of one
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)  # a netrc others can read is refused
    proc = subprocess.run([sys.executable, "-c", WANDB_START], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "mode: online" in proc.stdout, proc.stderr[-2000:]


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


def test_the_summary_run_aliases_the_best_adapter_by_logging_the_same_contents(tmp_path):
    """Offline W&B can neither use nor link an artifact; the summary run logs the best job's adapter again, under
    the same name: the same contents are the same version, which gets the alias `best` when synced."""
    import random

    from gsm8k_lora import tracking
    from gsm8k_lora.naming import RunNaming
    from gsm8k_lora.reporting.compare import compare
    from tests.test_compare import fake_job, planted

    better, worse = planted(300, 0.30, 0.30, 0.40, random.Random(0))
    sweep, cfg = tmp_path / "sweep", compose("logger=wandb").logger
    for job, (lr, verdicts) in enumerate((("1e-4", worse), ("2e-4", better))):
        job_dir = sweep / str(job)
        fake_job(sweep, job, lr, "done", 1.0, None, verdicts=verdicts)
        (job_dir / "adapter").mkdir()
        (job_dir / "adapter" / "adapter_model.safetensors").write_bytes(random.Random(job).randbytes(4096))
        tracker = tracking.start(cfg, job_dir, RunNaming(f"lr={lr}", "lr sweep 2026-12-07 10:00", "train"), {})
        tracker.adapter(job_dir / "adapter", job_dir, {"base_model": "builtin:tiny", "trainer_seed": 42})
        tracker.finish()
    comparison = compare(sweep)
    tracking.log_sweep_summary(cfg, sweep, {"name": "lr sweep", "group": "lr sweep 2026-12-07 10:00"}, comparison, [])
    (aliased,) = adapters(sweep)
    (best,) = adapters(sweep / "1")
    assert "best" in aliased["aliases"] and "best" not in best["aliases"]
    assert (aliased["name"], aliased["digest"], aliased["metadata"]) == (best["name"], best["digest"],
                                                                         best["metadata"])
    assert best["name"] == "adapter-lr-sweep-2026-12-07-10-00"
    assert adapters(sweep / "0")[0]["digest"] != best["digest"]
    # logger.log_adapter=false: no adapter, so no alias either
    (sweep / "wandb").rename(tmp_path / "first-summary")
    off = compose("logger=wandb", "logger.log_adapter=false").logger
    tracking.log_sweep_summary(off, sweep, {"name": "lr sweep", "group": "lr sweep 2026-12-07 10:00"}, comparison, [])
    assert adapters(sweep) == []


def adapters(directory: Path) -> list[dict]:
    """The adapters an offline run logged (W&B keeps its tables as artifacts too)."""
    from tests.wandb_offline import read_run

    return [a for a in read_run(directory)["artifacts"] if a["type"] == "model"]
