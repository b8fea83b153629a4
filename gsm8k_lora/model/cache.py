"""Where the package keeps what it builds or converts once (the built-in tiny model, GGUF weights turned into a
model directory), and how it builds them so that two processes never see half a build."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` (the `cache_dir` setting), else $GSM8K_LORA_CACHE, else ~/.cache/gsm8k_lora."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("GSM8K_LORA_CACHE", Path.home() / ".cache" / "gsm8k_lora"))


def build_once(target: Path, marker: str, make: Callable[[Path], None]) -> Path:
    """`target`, made by `make(staging)` in a sibling folder that is then renamed (atomic: a half-built
    directory is never seen under `target`). `make` writes `marker` last; a concurrent build that got
    there first wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        make(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
