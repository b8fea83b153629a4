"""CUDA-only paths: bf16, 4-bit QLoRA, the GPU preset offline, the answer engines. Skipped without a GPU."""

import json

import pytest

from tests.conftest import requires_cuda, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow, requires_cuda]


def test_qlora_bf16_run_on_the_tiny_model(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    proc = run_cli("train", "experiment=smoke", "logger=none", "model.load_in_4bit=true", "model.dtype=bfloat16",
                   "trainer.use_cpu=false", "trainer.bf16=true", "trainer.max_steps=20", "eval.limit=16",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert json.loads((tmp_path / "environment.json").read_text())["gpu_count"] >= 1


def test_the_gpu_preset_trains_offline_and_runs_no_hub_kernel(tmp_path, tiny_model_dir):
    """trainer=default (bf16, TF32, fused AdamW, 2 loader workers) on the tiny model, offline as conftest sets it: the
    run whose first CUDA step died fetching a Hub kernel; every answer engine then answers in bf16."""
    proc = run_cli("train", "experiment=smoke", "trainer=default", "logger=none", "model.dtype=auto",
                   "trainer.max_steps=20", "trainer.eval_steps=10", "trainer.save_steps=10", "eval.limit=16",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["model_weights"]["hub_kernels"] == {"use_kernels": False, "pinned": {}}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tokens_seen"] > 0 and metrics["train_loss_last"] < metrics["train_loss_first"]


@pytest.mark.parametrize("engine", ["padded", "static", "paged"])
def test_every_engine_answers_on_cuda(tmp_path, tiny_model_dir, engine):
    proc = run_cli("evaluate", "experiment=smoke", "logger=none", "eval.limit=16", f"eval.engine={engine}",
                   "model.dtype=bfloat16", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 16
