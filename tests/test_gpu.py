"""CUDA-only paths: bf16, 4-bit QLoRA, the Falcon3-shaped benchmark. Skipped without a GPU."""

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


def test_falcon3_shaped_benchmark_quick(tmp_path, tiny_model_dir):
    proc = run_cli("bench", "--quick", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    figures = json.loads(result.read_text())
    for name in ("falcon3_trl_defaults", "falcon3_package_default", "falcon3_qlora"):
        assert figures[name]["real_tokens_per_s"] > 0 and figures[name]["peak_memory_gib"] > 0
    assert figures["falcon3_qlora"]["peak_memory_gib"] < figures["falcon3_package_default"]["peak_memory_gib"]
