"""Is the Hugging Face hub reachable? Asked once per process by everything that may fetch from it
(models, datasets); when it is not, the hub clients are switched offline so no later lookup retries."""

from __future__ import annotations

import os
import sys

import datasets.config
import httpx
from huggingface_hub import constants


def _go_offline() -> None:
    # huggingface_hub and datasets read HF_HUB_OFFLINE once, at import: set their constants too, so
    # every later lookup goes straight to the local cache instead of retrying the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


_HUB_STATE: dict[str, bool] = {}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Asked once per process. Unreachable: say so in one line and switch the hub clients offline,
    so each later lookup fails (or hits the local cache) at once instead of retrying for ~40 s."""
    if "reachable" in _HUB_STATE:
        return _HUB_STATE["reachable"]
    reachable = not constants.HF_HUB_OFFLINE
    if reachable:
        try:
            httpx.head(constants.ENDPOINT, timeout=timeout_s)
        except httpx.HTTPError:
            reachable = False
            print(f"hub: {constants.ENDPOINT} is unreachable; using local files and caches only", file=sys.stderr)
            _go_offline()
    _HUB_STATE["reachable"] = reachable
    return reachable


