"""Run records and Weights & Biases, kept at the edge of the pipeline.

W&B never needs an account here: with no API key configured the run logs offline (files that
`wandb sync` uploads later), and any failure to start falls back to offline with one line saying so.
No key or token is ever written: the run directory holds the resolved config, not the environment.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import netrc
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from gsm8k_lora.config import LoggerConfig

PACKAGES = ("gsm8k_lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "hydra-core", "wandb",
            "bitsandbytes")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
    }


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and always without them): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def write_json(path: Path, data: dict) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: LoggerConfig) -> str:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_wandb_key() else "offline"


def start_wandb(cfg: LoggerConfig, run_dir: Path, name: str, config: dict):
    """Start a W&B run (or None when logging is off); fall back to offline if online fails."""
    if cfg.backend != "wandb":
        return None
    import wandb

    mode = resolve_mode(cfg)
    kwargs = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), name=name,
                  config=config, dir=str(run_dir), reinit="finish_previous",
                  settings=wandb.Settings(init_timeout=cfg.init_timeout_s, quiet=True))
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as err:  # bad key, no network, server error: the training result must not depend on W&B
        if mode != "online":
            raise
        print(f"W&B online start failed ({type(err).__name__}); logging offline instead", file=sys.stderr)
        mode = "offline"
        run = wandb.init(mode=mode, **kwargs)
    if mode == "offline":
        print(f"W&B is logging offline to {run.dir}; upload later with: wandb sync {Path(run.dir).parent}")
    link = run.url if mode == "online" else f"offline: wandb sync {Path(run.dir).parent}"
    (run_dir / "wandb_run.txt").write_text(f"{link}\n", encoding="utf-8")
    return run


def finish_wandb(run, exit_code: int = 0) -> None:
    # Hydra runs multirun jobs in one process: an unfinished run would swallow the next job's logs.
    if run is not None:
        run.finish(exit_code=exit_code)
