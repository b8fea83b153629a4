"""What a run ran on: the command as typed, package versions, git commit, device (environment.json); how many
processes ran it is `parallel.py`'s."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

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


def environment(command: str = "") -> dict:
    import torch  # deferred for start-up time: `report` and `compare` read run directories without torch

    cuda = torch.cuda.is_available()
    return {
        "command": command,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
    }
