"""Shared fixtures: offline environment, the tiny model (built once), and a runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# One model cache for the whole suite (and between local runs): the tiny model is built once.
CACHE = Path(os.environ.get("GSM8K_LORA_TEST_CACHE", ROOT / ".cache" / "models"))

OFFLINE_ENV = {
    "GSM8K_LORA_CACHE": str(CACHE),
    # the baseline answers' cache: this session's own, so no test reads answers an earlier session generated
    "GSM8K_LORA_BASELINE_CACHE": tempfile.mkdtemp(prefix="gsm8k_lora-baselines-"),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
# Under pytest-xdist (`make test`), the cores are shared out between the workers and the processes they start,
# so two workers on two cores do not each run two threads and wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    OFFLINE_ENV["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    torch.set_num_threads(int(OFFLINE_ENV["OMP_NUM_THREADS"]))
os.environ.update(OFFLINE_ENV)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from gsm8k_lora.model import tiny as tiny_model

    return tiny_model.ensure(0, CACHE)


def run_cli(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run `python -m gsm8k_lora.<module> args` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", f"gsm8k_lora.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **OFFLINE_ENV, **(env or {})})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def compose(*overrides: str):
    """The validated config `python -m gsm8k_lora.train *overrides` runs: tests build from what users run."""
    from gsm8k_lora.config import compose as compose_config

    return compose_config(overrides)


def model_config(**values):
    """The default model config (conf/model/falcon3_1b_instruct.yaml) with these fields replaced."""
    import dataclasses

    return dataclasses.replace(compose().model, **values)
