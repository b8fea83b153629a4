"""CUDA-only benchmark on a Falcon3-1B-shaped model: the real architecture config, random weights,
nothing downloaded. LoRA tokens/s, model FLOPs utilisation and peak memory for TRL's plain
defaults, this package's default and QLoRA; and the time to answer 1,319 GSM8K-length prompts.

MFU counts 4N FLOPs per trained token (LoRA with a frozen base: 2N forward + 2N activation
gradients, recompute not counted), with N including the 0.27 B-parameter LM head, as NeMo
AutoModel's LoRA figures do.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from gsm8k_lora.bench_train import gsm8k_like_rows, run_variant, variants
from gsm8k_lora.config import EvalConfig, TrainerConfig

# tiiuae/Falcon3-1B-Instruct's config.json (see shared FACTS): LlamaForCausalLM.
FALCON3_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=18, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=131072, max_position_embeddings=8192,
                  rope_theta=1000042.0, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=11)
# Dense bf16 peak of each GPU (vendor data sheets), for MFU.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def build_falcon3_shaped(out_dir: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**FALCON3_1B)).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)  # ids < 754 fit the 131k vocab
    del model
    torch.cuda.empty_cache()
    return out_dir


def param_count() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**FALCON3_1B)).parameters())


def bench_generation(model_dir: Path, n_prompts: int, max_new_tokens: int, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsm8k_lora.generation import build_prompt, generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    prompts = [build_prompt(tokenizer, r["question"], cfg, [], None) for r in gsm8k_like_rows(n_prompts, seed=3)]
    generate(model, tokenizer, prompts[:batch_size], dataclasses.replace(cfg, max_new_tokens=8))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, cfg, desc="Falcon3-shaped generation")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(o["generated_tokens"][0] for o in out)
    return {"gen_prompts": n_prompts, "gen_seconds": seconds, "gen_tokens": tokens,
            "gen_tokens_per_s": tokens / seconds,
            "gen_note": "random weights never stop early: every prompt generates max_new_tokens (worst case)"}


def bench_cuda(tiny_dir: Path, steps: int, quick: bool) -> dict:
    from transformers import BitsAndBytesConfig

    from gsm8k_lora.bench_train import default_trainer_config

    n_params = param_count()
    device = torch.cuda.get_device_name(0)
    peak = peak_tflops(device)
    rows = gsm8k_like_rows(6726)
    out: dict = {"cuda_device": device, "falcon3_params": n_params, "peak_bf16_tflops": peak}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_falcon3_shaped(Path(tmp) / "falcon3-shaped", tiny_dir)
        cfg: TrainerConfig = default_trainer_config(cuda=True)
        runs = variants(cfg)
        runs["qlora"] = {**runs["package_default"]}
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        for name, kwargs in runs.items():
            load = {"quantization_config": quant, "device_map": {"": 0}} if name == "qlora" else None
            result = run_variant(name, kwargs, str(model_dir), rows, steps, cfg.learning_rate, load_kwargs=load)
            tflops = 4 * n_params * result["real_tokens_per_s"] / 1e12
            result.update(model_tflops=tflops, mfu=tflops / peak if peak else None)
            out[f"cuda_{name}"] = result
            torch.cuda.empty_cache()
        out.update(bench_generation(model_dir, 64 if quick else 1319, 64 if quick else 256, 128))
    return out
