"""The real-model section of `make bench`: SmolLM2-135M-Instruct on real GSM8K rows, on this machine.

- LoRA training: real tokens/s of the package's preset for a real model on a CPU (`trainer=cpu_real`, one
  example a micro-batch) against TRL's plain `SFTConfig` defaults and against packs of 4 examples (the tiny
  model's `cpu_smoke` batching), on the same real rows, in one process (`training.run_variant`); the same preset
  with bf16 autocast where the CPU has bf16 instructions; and a profile of one step by kind of work;
- generation on real test questions at the batch size `make real` uses: the evaluation's continuous batching
  against `model.generate`'s padded batches at the batch `make real` used with them (32), kept tokens/s, tokens
  computed over kept (at the LM head), the share of the compute ceiling, how many answers are the same, and the
  same path in bfloat16;
- the machine's measured float32 matmul rate (the ceiling's), and which kernels bf16 matmuls ran on.

FLOPs per trained token (LoRA, frozen base): forward 2N plus backward 2N (activation gradients only; the
frozen weights get none), so 4N, where N counts the parameters that do matmuls (a tied LM head once, the
input-embedding lookup none), plus attention 6 x layers x s x d for a causal sequence of mean length s
(QK^T and AV: 2 s d forward per layer on average, twice that backward). LoRA's own matmuls (r=8) add under 1%.
A generated token costs 2N (the ceiling: the matmul rate / 2N tokens/s).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from gsm8k_lora.benchmarks.generation import answer_token_figures, same_answers, timed
from gsm8k_lora.benchmarks.training import bench_settings, run_variant, variants
from gsm8k_lora.config import ENGINES, Config, compose
from gsm8k_lora.data.loading import build_splits
from gsm8k_lora.errors import ModelLoadError
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.model.loading import load
from gsm8k_lora.model.sources import resolve
from gsm8k_lora.preflight import CUDA_ENGINES, cpu_has_bf16
from gsm8k_lora.training.sft import build_sft_config


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


def bench_real(steps: int, questions: int, gsm8k_dir: Path, cache_dir: str | None = None) -> dict:
    """The real-model figures, or {"real_skipped": why} where the model or the data cannot be had."""
    if not (gsm8k_dir / "train.jsonl").exists():
        return {"real_skipped": f"no GSM8K at {gsm8k_dir} (give --gsm8k DIR)"}
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
    bf16 = cpu_has_bf16()
    if bf16:  # the same preset under bf16 autocast: the mixed precision a CPU with bf16 instructions offers
        runs["cpu_real_bf16"] = lambda out: build_sft_config(cfg.trainer, Path(out), **bench_settings(steps), bf16=True)
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
        "real_train_variants": list(results.values()),
        "real_cpu_bf16_instructions": bf16, "real_cpu_kernels": kernels(),
        "real_train_step_profile": profile_step(cfg, model_dir, rows),
    }
    if bf16:
        half = results["cpu_real_bf16"]["real_tokens_per_s"]
        out["real_train_bf16_over_float32_x"] = half / ours["real_tokens_per_s"]
    model.config.use_cache = True
    out.update(bench_generation(model, tokenizer, splits, cfg, questions, rate, bf16))
    return out


def bench_generation(model, tokenizer, splits, cfg: Config, questions: int, rate: float, bf16: bool) -> dict:
    """The evaluation's answers to real test questions (zero-shot, 256 new tokens, `make real`'s batch size) by
    each answer engine (`eval.engine`), in float32, the reference: their speed, and how many questions each answers
    exactly as the default engine does; `padded` at batch 32, the baseline variant; and the default
    engine in bfloat16 where the CPU has the instructions."""
    ecfg = dataclasses.replace(cfg.eval, max_new_tokens=256, dtype="float32")
    prompts = [build_prompt(tokenizer, row["question"], ecfg, [], None)
               for row in splits.test.select(range(questions)).to_list()]
    generate(model, tokenizer, prompts[:2], dataclasses.replace(ecfg, max_new_tokens=4))  # warm-up
    ours = timed(model, tokenizer, prompts, ecfg)
    padded = timed(model, tokenizer, prompts, dataclasses.replace(ecfg, engine="padded", batch_size=32))
    per_token = 2 * matmul_params(model)
    out = {
        "real_generation_questions": questions, "real_generation_batch_size": ecfg.batch_size,
        "real_generation_engine": ecfg.engine, "real_generation_batch_size_padded": 32,
        "real_generation_tokens_per_s": ours["tokens_per_s"],
        "real_generation_tokens_per_s_padded": padded["tokens_per_s"],
        "real_generation_speedup_x": ours["tokens_per_s"] / padded["tokens_per_s"],
        "real_generation_share_of_matmul_rate": ours["tokens_per_s"] * per_token / (rate * 1e9),
        "real_generation_computed_over_kept_x": ours["computed_over_kept_x"],
        "real_generation_computed_over_kept_x_padded": padded["computed_over_kept_x"],
        "real_generation_same_answers_as_padded": same_answers(ours, padded),
        **{f"real_{k}": v for k, v in answer_token_figures(tokenizer, ours["outputs"], 256).items()},
    }
    for engine in (e for e in ENGINES if e not in (ecfg.engine, "padded", *CUDA_ENGINES)):  # at the default's batch
        other = timed(model, tokenizer, prompts, dataclasses.replace(ecfg, engine=engine))
        out.update({f"real_generation_tokens_per_s_{engine}": other["tokens_per_s"],
                    f"real_generation_same_answers_{engine}": same_answers(ours, other)})
    if bf16:
        half = timed(model, tokenizer, prompts, dataclasses.replace(ecfg, dtype="bfloat16"))
        out.update({"real_generation_tokens_per_s_bf16": half["tokens_per_s"],
                    "real_generation_bf16_over_float32_x": half["tokens_per_s"] / ours["tokens_per_s"],
                    "real_generation_bf16_same_answers_as_float32": same_answers(half, ours)})
    return out


KERNEL_PROBE = ("import torch; a = torch.randn(256, 256, dtype=torch.bfloat16); "
                "torch.backends.mkldnn.verbose(1).__enter__(); a @ a; torch.nn.functional.linear(a, a)")


def kernels() -> dict:
    """Which kernels this machine's matmuls run on: ATen's vector level, and the ISA oneDNN reports for a bf16
    matmul (run in a child process: oneDNN's verbose log goes to its standard output)."""
    probe = subprocess.run([sys.executable, "-c", KERNEL_PROBE], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "ONEDNN_VERBOSE": "1"})
    isa = sorted({part.strip() for line in probe.stdout.splitlines() if line.startswith("onednn_verbose")
                  for part in line.split(",") if part.strip().startswith(("brg", "avx", "amx", "gemm"))})
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(), "onednn_bf16_matmul": isa or None}


CATEGORIES = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
              ("attention", ("scaled_dot_product",)), ("dropout RNG", ("bernoulli",)),
              ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul")))


def profile_step(cfg: Config, model_dir: str, rows: list[dict]) -> dict:
    """Where one optimizer step of `trainer=cpu_real` spends its time, as shares of its wall time: matmuls,
    attention, the LoRA dropout's random masks, the optimizer, other tensor ops, and the rest (Python, data)."""
    profiler = StepProfile(step=2)
    run_variant("profile", lambda out: build_sft_config(cfg.trainer, Path(out), **bench_settings(3)), cfg, model_dir,
                rows[: 3 * cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps], 3,
                callbacks=[profiler])
    return profiler.shares


class StepProfile(TrainerCallback):
    def __init__(self, step: int):
        self.step, self.shares = step, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step:
            return
        self.profile.__exit__(None, None, None)
        wall = (time.perf_counter() - self.start) * 1e6  # microseconds, as the profiler's
        spent = dict.fromkeys([name for name, _ in CATEGORIES] + ["other tensor ops"], 0.0)
        for event in self.profile.key_averages():
            name = event.key.lower()
            kind = next((k for k, keys in CATEGORIES if any(key.lower() in name for key in keys)), "other tensor ops")
            spent[kind] += event.self_cpu_time_total
        total = sum(spent.values())
        self.shares = {"step_s": wall / 1e6, **{k: v / wall for k, v in spent.items()},
                       "python and data": max(0.0, 1 - total / wall)}
