"""A real architecture with random weights: Falcon3-1B-Instruct's shape, for speed and memory at the size users run,
where its weights cannot be had (nothing is downloaded). `model.name_or_path=builtin:falcon3_1b_shape` (the recipe,
`experiment=falcon3_shape`) and the bench use it. Its answers mean nothing: random weights never write an answer.

The tokenizer is the tiny model's (its ids fit any larger vocabulary; a chat template, a pad token distinct from
EOS). It splits real GSM8K text into more tokens than Falcon3's own 131k-vocabulary tokenizer does, so a row
trains on more tokens here than with Falcon3: the timing errs on the slow side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from gsm8k_lora.config import BUILTIN_FALCON3_SHAPE
from gsm8k_lora.model import cache, tiny

BUILD_VERSION = 1  # bump when the build below changes, so old caches are not reused
MARKER = "gsm8k_lora_shaped.json"
# tiiuae/Falcon3-1B-Instruct's config.json (see shared FACTS): LlamaForCausalLM.
FALCON3_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=18, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=131072, max_position_embeddings=8192,
                  rope_theta=1000042.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def build(out_dir: Path, tokenizer_dir: Path, arch: dict = FALCON3_1B, seed: int = 0) -> Path:
    """Random weights of `arch` (seeded, made on the GPU where there is one), saved in bf16 with the tokenizer of
    `tokenizer_dir`, whose EOS and pad ids the config takes."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**arch, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps({"version": BUILD_VERSION, "seed": seed, "arch": arch}) + "\n")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def ensure(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached Falcon3-shaped model directory, built first if missing (3.4 GB)."""
    target = cache.root(cache_dir) / f"falcon3-1b-shape-v{BUILD_VERSION}"
    if (target / MARKER).exists():
        return target
    print(f"model: building {BUILTIN_FALCON3_SHAPE} (random weights, once; cached in {target})")
    return cache.build_once(target, MARKER, lambda staging: build(staging, tiny.ensure(0, cache_dir)))
