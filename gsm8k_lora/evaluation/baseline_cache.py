"""The baseline's answers, generated once per distinct set of what they depend on and reused by every run with
the same set: every job of a sweep asks the same questions of the same untouched base model.

The answers depend on the base weights (and how they are loaded: dtype, quantisation, attention kernel,
device), the exact prompts (questions, protocol, shots, system prompt, chat template), the generation
settings (token limit, stops, sampling, batch size, seed) and the libraries that compute them. All of it is
the key; an entry lives under `eval.baseline_cache/<sha256 of the key>/`:
    key.json          the key, written out in full
    generations.json  each question's completions and generated token counts, in question order
Only generations are cached: grading and scoring run again, so a reused baseline gives the same predictions
and figures as a generated one. An entry is written beside, then renamed, under a lock (filelock): jobs side
by side never both write one, a job that asks while another writes it waits and reads it, and a half-written
entry is never read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import try_to_load_from_cache

from gsm8k_lora import parallel
from gsm8k_lora.model import sources

VERSION = 3  # bump when what an entry holds, or how answers are generated, changes
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.json", "*.model", "*.txt", "*.jinja", "*.gguf")


def _files(directory: Path) -> list[list]:
    """Name, size and modification time of a model directory's files (a hub snapshot's names resolve to blobs
    named by their content hash)."""
    found = sorted({p for pattern in WEIGHT_FILES for p in directory.glob(pattern) if p.is_file()})
    return [[p.name, p.resolve().name, p.stat().st_size, p.stat().st_mtime_ns] for p in found]


def _local(path: str, revision: str | None) -> Path:
    """The directory holding the weights `path` names: itself, or a hub id's snapshot in the local cache."""
    local = Path(path)
    if not local.is_dir():
        cached = try_to_load_from_cache(path, "config.json", revision=revision)
        local = Path(cached).parent if isinstance(cached, str) else local
    return local


def weights_identity(path: str, revision: str | None = None, hub_kernels: dict | None = None) -> dict:
    """The base weights `path` (a local directory or a hub id) names, as files, and the Hub kernels pinned to run
    them (`model.hub_kernels`: other kernels, other numbers)."""
    local = _local(path, revision)
    return {"path": path, "revision": revision, "files": _files(local) if local.is_dir() else [],
            "hub_kernels": dict(sorted((hub_kernels or {}).items()))}


TENSOR_FILES = ("*.safetensors", "*.bin", "*.gguf")
_DIGESTS: dict[tuple, str] = {}  # (file, size, mtime) -> sha256: a sweep's jobs, one process, hash the base once


def weights_sha256(path: str, revision: str | None = None) -> str | None:
    """sha256 over the base weights' tensor files, by content (each file's name and sha256, in name order): which
    weights an adapter was trained on, wherever they were loaded from. None where no tensor file is found."""
    local = _local(path, revision)
    found = sorted({p for pattern in TENSOR_FILES for p in local.glob(pattern) if p.is_file()} if local.is_dir()
                   else set())
    if not found:
        return None
    digest = hashlib.sha256()
    for file in found:
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = sources.sha256(file)
        digest.update(f"{file.name} {_DIGESTS[key]}\n".encode())
    return digest.hexdigest()


def loaded_identity(model) -> dict:
    """How the weights sit in memory: each dtype's parameter count (PEFT's k-bit preparation casts some to float32),
    quantisation, attention kernel and device. The adapter's own parameters are left out: disabled, they
    compute nothing, so a PEFT model with its adapter off answers as the bare model."""
    dtypes = Counter()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            dtypes[str(param.dtype).removeprefix("torch.")] += param.numel()
    device = next(model.parameters()).device
    quantization = getattr(model.config, "quantization_config", None)
    return {"dtypes": dict(sorted(dtypes.items())), "attn_implementation": getattr(model.config, "_attn_implementation",
                                                                                   None),
            "quantization": quantization.to_dict() if hasattr(quantization, "to_dict") else quantization,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "use_kernels": bool(getattr(model, "use_kernels", False))}


def key(weights: dict, model, prompts: list[str], rows: list[dict], generation: dict) -> dict:
    versions = {name: md.version(name) for name in ("torch", "transformers")}
    return {"version": VERSION, "weights": weights, "loaded": loaded_identity(model), "libraries": versions,
            "questions": [row["id"] for row in rows],
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "first_prompt": prompts[0] if prompts else None, "generation": generation}


def entry(cache_dir: Path, the_key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(the_key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir / digest[:32]


def fetch(cache_dir: Path, the_key: dict, generate: Callable[[], list[dict]]) -> tuple[list[dict], str]:
    """The generations for `the_key`, and where they came from: `generated`, or the cache entry they were read from.
    In a data-parallel run every process calls it (the answers are generated by all of them, `generate`): rank 0
    alone holds the lock, reads the entry and writes it."""
    target = entry(cache_dir, the_key)
    main = parallel.is_main_process()
    if main:
        cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock") if main else nullcontext():
        def stored() -> list[dict] | None:
            found = target / "generations.json"
            return json.loads(found.read_text(encoding="utf-8")) if found.exists() else None

        generations = parallel.from_main(stored)
        if generations is not None:
            return generations, str(target)
        generations = generate()
        if main:
            _store(cache_dir, target, the_key, generations)
    return generations, "generated"


def _store(cache_dir: Path, target: Path, the_key: dict, generations: list[dict]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=cache_dir))
    try:
        (staging / "key.json").write_text(json.dumps(the_key, indent=1, sort_keys=True, default=str) + "\n",
                                          encoding="utf-8")
        (staging / "generations.json").write_text(json.dumps(generations), encoding="utf-8")
        staging.rename(target)
    except OSError:  # a full disk: the answers stand, the cache does without them
        shutil.rmtree(staging, ignore_errors=True)
