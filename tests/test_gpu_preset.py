"""The preset users run first (`trainer=default`, one CUDA GPU) runs here on the CPU, on the tiny model, with only
its device-bound flags flipped (bf16, tf32, the fused optimizer): its batching, padding-free collation,
evaluation and save cadence, best-checkpoint selection and early stopping have all run before a GPU sees them."""

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

DEVICE_BOUND = {"bf16": False, "tf32": None, "optim": "adamw_torch"}


@pytest.fixture(scope="module")
def gpu_preset_run(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("gpu_preset") / "run"
    # 300 synthetic rows: 270 train, 17 batches of 16 an epoch, 3 epochs = 51 steps, so the preset's every-50-steps
    # evaluation and checkpoint happen once, besides those at the start and at the end
    proc = run_cli("train", "model=tiny", "data=synthetic", "data.num_train=300", "data.num_test=10", "trainer=default",
                   *(f"trainer.{k}={'null' if v is None else str(v).lower()}" for k, v in DEVICE_BOUND.items()),
                   "logger=none", "eval.limit=4", "eval.max_new_tokens=16", f"hydra.run.dir={run_dir}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_only_the_device_bound_flags_differ_from_the_preset_file(gpu_preset_run):
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml"))
    ran = OmegaConf.to_container(OmegaConf.load(gpu_preset_run / "config.yaml"))["trainer"]
    differ = {k: ran[k] for k in ran if ran[k] != preset[k]}
    assert differ == DEVICE_BOUND


def test_the_preset_ran_its_evaluation_logging_and_save_cadence(gpu_preset_run):
    history = json.loads((gpu_preset_run / "log_history.json").read_text())["log_history"]
    metrics = json.loads((gpu_preset_run / "metrics.json").read_text())
    assert metrics["steps"] == metrics["max_steps"] == 51 and metrics["stop_reason"] == "completed"
    evaluated = {row["step"]: row["eval_loss"] for row in history if "eval_loss" in row}
    assert list(evaluated) == [0, 50, 51]  # eval_on_start, every 50 steps, and the last step
    assert [row["step"] for row in history if "loss" in row][:2] == [1, 10]  # logging_first_step, then every 10
    for step in (50, 51):  # save_steps=50, and the last step
        assert (gpu_preset_run / "checkpoints" / f"checkpoint-{step}" / ".complete").exists()
    # early stopping on: the checkpoint with the lowest validation loss is tracked and loaded at the end
    best = min((loss, step) for step, loss in evaluated.items() if step)[1]
    assert metrics["best_checkpoint"].endswith(f"checkpoint-{best}")
    assert json.loads((gpu_preset_run / "eval_metrics.json").read_text())["finetuned_n"] == 4
