"""Benchmarks on a Falcon3-1B-shaped model: the real architecture config, random weights, nothing
downloaded.

On any machine: the base weights' memory in bf16 and in 4-bit NF4, as `model=falcon3_1b_qlora` loads
them. On a CUDA machine also LoRA tokens/s, model FLOPs utilisation and peak
memory for TRL's plain defaults, this package's default and QLoRA, and the time to answer 1,319
GSM8K-length prompts. The test suite runs the same code on the CPU with a scaled-down shape.

MFU = 4 * N * real tokens/s / peak bf16 FLOP/s, where N counts only the parameters that do a matmul:
every Linear layer's weight, the LM head included (tied or not, counted once), but not the input
embedding (a table lookup, 0.27 B parameters in Falcon3-1B) nor the norms (elementwise). 4N per trained
token is LoRA with a frozen base: 2N forward + 2N for the activation gradients, no weight gradients;
recompute, attention scores and the adapters themselves are not counted.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gsm8k_lora.benchmarks.generation import generate_padded, timed
from gsm8k_lora.benchmarks.real import matmul_params
from gsm8k_lora.benchmarks.training import (
    bench_settings,
    device_config,
    gsm8k_like_rows,
    run_variant,
    synchronize,
    variants,
)
from gsm8k_lora.config import Config, compose
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.model.loading import load_model, weight_memory
from gsm8k_lora.preflight import four_bit_problem
from gsm8k_lora.training.sft import build_sft_config

# tiiuae/Falcon3-1B-Instruct's config.json (see shared FACTS): LlamaForCausalLM.
FALCON3_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=18, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=131072, max_position_embeddings=8192,
                  rope_theta=1000042.0, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=11)
# Dense bf16 peak of each GPU (vendor data sheets), for MFU.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_shaped(out_dir: Path, tokenizer_dir: Path, arch: dict) -> Path:
    """A randomly initialised model of `arch`, saved in bf16 with the tiny model's tokenizer (its ids
    fit any larger vocabulary)."""
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**arch), dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def _meta_model(arch: dict):
    with torch.device("meta"):  # shapes only, no memory
        return LlamaForCausalLM(LlamaConfig(**arch))


def param_count(arch: dict) -> int:
    return sum(p.numel() for p in _meta_model(arch).parameters())


def matmul_param_count(arch: dict) -> int:
    """N of the MFU formula (`real.matmul_params`) for this architecture."""
    return matmul_params(_meta_model(arch))


def compose_qlora() -> Config:
    return compose(["model=falcon3_1b_qlora"])


def weight_memory_4bit(model_dir: Path, cfg: Config) -> dict:
    """Base-weight memory as `model=falcon3_1b_qlora` loads the model (`cfg`, with this directory): bf16, and
    4-bit NF4 with double quantisation."""
    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(model_dir))
    model = load_model(str(model_dir), model_cfg)
    m = weight_memory(model, torch.bfloat16)
    del model
    return {"qlora_weights_gib_bf16": m["weights_gib_unquantised"], "qlora_weights_gib_4bit": m["weights_gib"],
            "qlora_weight_memory_saving": 1 - m["weights_gib"] / m["weights_gib_unquantised"]}


def bench_generation(model_dir: Path, cfg: Config, n_prompts: int, max_new_tokens: int, batch_size: int) -> dict:
    """Answers to GSM8K-length prompts: the evaluation's continuous batching against `model.generate`'s padded
    batches. Random weights rarely stop early, so nearly every row runs to the limit: the worst case for
    continuous batching, whose gain is rows that stop early."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, use_kernels=False).to(device())
    cfg = dataclasses.replace(cfg.eval, batch_size=batch_size, max_new_tokens=max_new_tokens)
    prompts = [build_prompt(tokenizer, r["question"], cfg, [], None) for r in gsm8k_like_rows(n_prompts, seed=3)]
    generate(model, tokenizer, prompts[:batch_size], dataclasses.replace(cfg, max_new_tokens=8))  # warm-up
    out = {"gen_prompts": n_prompts, "gen_max_new_tokens": max_new_tokens, "gen_batch_size": batch_size,
           "gen_note": "random weights rarely stop early: close to max_new_tokens per prompt (worst case)"}
    for name, path in (("", generate), ("_padded", generate_padded)):
        synchronize()
        result = timed(path, model, tokenizer, prompts, cfg)
        synchronize()
        out.update({f"gen_seconds{name}": result["seconds"], f"gen_tokens{name}": result["kept_tokens"],
                    f"gen_tokens_per_s{name}": result["tokens_per_s"]})
    out["gen_speedup_over_padded_x"] = out["gen_tokens_per_s"] / out["gen_tokens_per_s_padded"]
    return out


def bench_falcon3(tiny_dir: Path, steps: int, quick: bool, arch: dict = FALCON3_1B,
                  cfg: Config | None = None, training: bool | None = None, prompts: int | None = None) -> dict:
    """Weight memory everywhere; training and generation figures where `training` (default: on CUDA).
    `cfg`: the run config to train with (default: this device's, `training.device_config`). Training variants:
    TRL's defaults, the package's preset (padding-free, fused AdamW), the same padded, the same with the unfused
    optimizer, and QLoRA where bitsandbytes can load 4-bit weights here."""
    cuda = torch.cuda.is_available()
    training = cuda if training is None else training
    n_matmul = matmul_param_count(arch)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(name) if cuda else None
    out: dict = {"falcon3_device": name, "falcon3_params": param_count(arch), "falcon3_matmul_params": n_matmul,
                 "peak_bf16_tflops": peak}
    no_4bit = four_bit_problem(use_cpu=not cuda)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_shaped(Path(tmp) / "falcon3-shaped", tiny_dir, arch)
        cfg = cfg or device_config(cuda)
        if no_4bit is None:
            out.update(weight_memory_4bit(model_dir, compose_qlora()))
        else:
            out["qlora_skipped"] = f"model.load_in_4bit {no_4bit}"
        if not training:
            return out
        settings = bench_settings(steps)
        runs = {variant: (make_args, False) for variant, make_args in variants(cfg, steps).items()}
        runs["padded"] = (lambda o: build_sft_config(cfg.trainer, Path(o), **settings, padding_free=False), False)
        runs["unfused_optimizer"] = (lambda o: build_sft_config(cfg.trainer, Path(o), **settings, optim="adamw_torch"),
                                     False)
        if no_4bit is None:
            runs["qlora"] = (runs["package_default"][0], True)
        rows = gsm8k_like_rows(64 * steps)
        for variant, (make_args, four_bit) in runs.items():
            result = run_variant(variant, make_args, cfg, str(model_dir), rows, steps, load_in_4bit=four_bit)
            tflops = 4 * n_matmul * result["real_tokens_per_s"] / 1e12  # see the module docstring
            result.update(model_tflops=tflops, mfu=tflops / peak if peak else None)
            out[f"falcon3_{variant}"] = result
            if cuda:
                torch.cuda.empty_cache()
        n = prompts or (64 if quick else 1319)
        out.update(bench_generation(model_dir, cfg, n, 64 if quick else 256, 128))
    return out
