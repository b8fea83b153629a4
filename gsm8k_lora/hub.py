"""The Hugging Face hub: asked once per process whether it answers, and what of it is in the local caches.

Cheap to import (no datasets, no transformers): the door of the entry points uses it before anything loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
from huggingface_hub import constants, try_to_load_from_cache

_STATE: dict[str, bool] = {}


def probe(timeout_s: float = 3.0) -> bool:
    """Whether the hub answers, asked once per process. When it does not, this process's hub clients (and
    those of the processes it starts) are switched offline, so each later lookup goes straight to the local
    cache instead of retrying for ~40 s; the caller says so to the user."""
    if "reachable" in _STATE:
        return _STATE["reachable"]
    reachable = not constants.HF_HUB_OFFLINE
    if reachable:
        try:
            httpx.head(constants.ENDPOINT, timeout=timeout_s)
        except httpx.HTTPError:
            reachable = False
    if not reachable:
        _switch_offline()
    _STATE["reachable"] = reachable
    return reachable


def _switch_offline() -> None:
    # huggingface_hub and datasets read HF_HUB_OFFLINE once, at import: the variable serves what is imported
    # later (and child processes), the constants what is imported already.
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def endpoint() -> str:
    return constants.ENDPOINT


def unreachable_note() -> str | None:
    """The line that tells the user a run goes on offline, if the hub was asked and did not answer."""
    if _STATE.get("reachable") is False:
        return f"hub: {endpoint()} does not answer; using local files and caches only"
    return None


def model_in_cache(repo_id: str, revision: str | None = None) -> bool:
    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def dataset_in_cache(repo_id: str) -> bool:
    """A hub dataset that `datasets.load_dataset` can load offline: in the hub's file cache, or prepared in
    datasets' own cache (`org___name`, under datasets' default location, read here without importing it)."""
    hub_copy = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return hub_copy.is_dir() or (datasets_cache / repo_id.replace("/", "___")).is_dir()
