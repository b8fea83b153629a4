"""The real-model section of `make bench`: SmolLM2-135M-Instruct on real GSM8K rows, on this machine.

- LoRA training: real tokens/s of the package's preset for a real model on a CPU (`trainer=cpu_real`, one
  example a micro-batch) against TRL's plain `SFTConfig` defaults and against packs of 4 examples (the tiny
  model's `cpu_smoke` batching), on the same real rows, in one process (`training.run_variant`);
- generation: batched against one question at a time on real test questions (`generation.bench_eval`);
- the machine's measured float32 matmul rate, so training FLOP/s can be stated as a share of it.

FLOPs per trained token (LoRA, frozen base): forward 2N plus backward 2N (activation gradients only; the
frozen weights get none), so 4N, where N counts the parameters that do matmuls (a tied LM head once, the
input-embedding lookup none), plus attention 6 x layers x s x d for a causal sequence of mean length s
(QK^T and AV: 2 s d forward per layer on average, twice that backward). LoRA's own matmuls (r=8) add under 1%.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gsm8k_lora.benchmarks.generation import bench_eval
from gsm8k_lora.benchmarks.training import run_variant, variants
from gsm8k_lora.config import Config, compose
from gsm8k_lora.data.loading import build_splits
from gsm8k_lora.errors import ModelLoadError
from gsm8k_lora.model.loading import load
from gsm8k_lora.model.sources import resolve

GSM8K_DIR = Path(__file__).resolve().parents[3] / "shared" / "gsm8k"  # beside the project


def matmul_gflops(size: int = 2048, reps: int = 20) -> float:
    """float32 matmul throughput of this machine with torch's threads, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def matmul_params(model: torch.nn.Module) -> int:
    """N of the FLOPs formula: the weights of the Linear layers, each tensor once (a tied LM head shares the
    embedding's tensor and counts once, as the head's matmul); the embedding lookup and norms do no matmul."""
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(weights.values())


def flops_per_token(model, mean_tokens: float) -> float:
    cfg = model.config
    return 4 * matmul_params(model) + 6 * cfg.num_hidden_layers * mean_tokens * cfg.hidden_size


def real_model_config(overrides: list[str]) -> Config:
    """The config `make real` runs, with these overrides."""
    return compose(["experiment=real_cpu", *overrides])


def bench_real(steps: int, questions: int, gsm8k_dir: Path = GSM8K_DIR, cache_dir: str | None = None) -> dict:
    """The real-model figures, or {"real_skipped": why} where the model or the data cannot be had."""
    if not (gsm8k_dir / "train.jsonl").exists():
        return {"real_skipped": f"no GSM8K at {gsm8k_dir}"}
    cfg = real_model_config(["data=local", f"data.path={gsm8k_dir}"])
    try:
        weights = resolve(cfg.model, cache_dir)
    except ModelLoadError as err:
        return {"real_skipped": str(err)}
    model_dir = weights.path
    splits = build_splits(cfg.data)
    per_step = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps
    rows = splits.train.select(range(per_step * steps)).to_list()
    # TRL's defaults, trainer=cpu_real (one example a micro-batch) and the tiny model's cpu_smoke preset (packs
    # of 4 examples, one flat sequence each) at the same 16 examples a step
    packs = real_model_config(["data=local", f"data.path={gsm8k_dir}", "trainer=cpu_smoke",
                               f"trainer.gradient_accumulation_steps={per_step // 4}",
                               f"trainer.learning_rate={cfg.trainer.learning_rate}"])
    runs = {**variants(cfg, steps), "packs_of_4": variants(packs, steps)["package_default"]}
    results = {name: run_variant(name, make_args, cfg, model_dir, rows, steps) for name, make_args in runs.items()}
    base, ours, packed = results["trl_defaults"], results["package_default"], results["packs_of_4"]
    model, tokenizer = load(cfg.model, cache_dir, resolved=weights)
    rate = matmul_gflops()
    mean_tokens = ours["real_tokens"] / len(rows)
    per_token = flops_per_token(model, mean_tokens)
    out = {
        "real_model": cfg.model.name_or_path, "real_weights": weights.description,
        "real_train_rows_per_step": per_step, "real_train_mean_tokens_per_row": mean_tokens,
        "real_train_tokens_per_s_trl_defaults": base["real_tokens_per_s"],
        "real_train_tokens_per_s_cpu_real": ours["real_tokens_per_s"],
        "real_train_tokens_per_s_packs_of_4": packed["real_tokens_per_s"],
        "real_train_speedup_x": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
        "real_train_one_example_over_packs_of_4_x": ours["real_tokens_per_s"] / packed["real_tokens_per_s"],
        "real_matmul_gflops": rate, "real_flops_per_token_g": per_token / 1e9,
        "real_train_share_of_matmul_rate": ours["real_tokens_per_s"] * per_token / (rate * 1e9),
        "real_train_variants": [base, ours, packed],
    }
    test = [row["question"] for row in splits.test.select(range(questions)).to_list()]
    model.config.use_cache = True
    gen = bench_eval(model, tokenizer, test, cfg.eval, batch_size=questions, max_new_tokens=256)
    out.update({f"real_{key}": value for key, value in gen.items()})
    return out
