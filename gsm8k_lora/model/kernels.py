"""Hub kernels (the `kernels` package): this package's decision, never a library default.

transformers 5.25 kernelizes every model it loads unless told otherwise (`use_kernels` unset means on), and on
CUDA its first `model.train()` fetches `kernels-community/rotary` from the Hub at whatever version 2 points to
today and runs that code; offline, the fetch raises and the run dies at its first step. transformers reads its
own switch (`USE_HUB_KERNELS`) from the environment, so the choice is made here, where the model is loaded:
- `model.hub_kernels: {}` (the default): `use_kernels=False`; nothing is fetched from the Hub or run from it.
- `+model.hub_kernels.LAYER=org/repo:KernelLayer@<commit>` (one a layer): exactly these kernels, each pinned to a
  40-hex commit of its Hub repository, for training and inference on CUDA; transformers' own mapping (unpinned
  versions) is not inherited. Offline, each pinned commit must be in the local kernel cache: `missing` says
  which are not, before anything loads (preflight).
The choice changes the numbers, so `environment.json` and the baseline cache's key record it (`describe`).
Cheap to import: the door uses `parse` and `missing` before torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from gsm8k_lora.config import KERNEL_PIN


@dataclass(frozen=True)
class Pin:
    layer: str  # the model's kernelizable layer or function (transformers' name: RMSNorm, rotary_pos_emb, ...)
    repo: str
    kernel_layer: str
    revision: str


def parse(mapping: dict[str, str] | None) -> list[Pin]:
    """The pins of `model.hub_kernels` (their form checked by the config's schema)."""
    return [Pin(layer, m["repo"], m["layer"], m["revision"])
            for layer, spec in (mapping or {}).items() if (m := KERNEL_PIN.match(str(spec)))]


def cache_dir() -> Path:
    """Where the `kernels` package keeps what it fetched (its own rule: KERNELS_CACHE, else the Hub's cache)."""
    return Path(os.environ.get("KERNELS_CACHE") or constants.HF_HUB_CACHE)


def in_cache(pin: Pin) -> bool:
    snapshot = cache_dir() / repo_folder_name(repo_id=pin.repo, repo_type="kernel") / "snapshots" / pin.revision
    return snapshot.is_dir()


def missing(mapping: dict[str, str] | None) -> list[Pin]:
    """The pinned kernels that are not in the local cache (what an offline run cannot load)."""
    return [pin for pin in parse(mapping) if not in_cache(pin)]


def apply(model, mapping: dict[str, str]) -> None:
    """Kernelize `model` (loaded with `use_kernels=False`) with exactly the pinned kernels, for training and
    inference on CUDA. transformers' `KernelConfig` shorthand maps a kernel for the mode the model is in when it
    loads (inference) only, so the library's nested form is built here and handed to the model's own kernelize."""
    from kernels import LayerRepository, Mode  # deferred: only a run that asks for hub kernels needs them
    from transformers import KernelConfig

    nested = {pin.layer: {"cuda": dict.fromkeys((Mode.TRAINING, Mode.INFERENCE), LayerRepository(
        repo_id=pin.repo, layer_name=pin.kernel_layer, revision=pin.revision))} for pin in parse(mapping)}
    model.kernel_config = KernelConfig(kernel_mapping=nested, inherit_mapping=False)
    model.set_use_kernels(True)


def describe(model, mapping: dict[str, str] | None) -> dict:
    """What environment.json and the baseline cache's key record: whether the loaded model runs Hub kernels,
    and which pinned ones."""
    return {"use_kernels": bool(getattr(model, "use_kernels", False)), "pinned": dict(sorted((mapping or {}).items()))}
