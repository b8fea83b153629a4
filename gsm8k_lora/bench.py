"""Benchmarks: `python -m gsm8k_lora.bench [--quick] [--adapter RUN_DIR]` (or `make bench`).

Speed is measured as a ratio of two variants in the same process on the same inputs, because
these machines are noisy. Writes `outputs/bench/<time>.json` and prints a table.

Figures on any machine (tiny model; CPU unless a GPU is present):
- questions/s with batched generation against one question at a time (target >= 5x);
- generated tokens per question against the tokens needed to reach the final answer (target <= 1.2x),
  measured on the completions that hold a `#### N` answer (none from the base tiny model: use --adapter);
- padding efficiency (real / computed tokens) over a GSM8K-size epoch, default against TRL's plain
  defaults (target >= 0.95), and real tokens/s of the two in the same run (target >= 1.5x).
- the base-weight memory of a Falcon3-1B-shaped model in bf16 and in 4-bit (full mode);
on a CUDA machine also the Falcon3-1B-shaped training and generation figures of `bench_falcon3.py`;
and, where the real GSM8K and SmolLM2-135M-Instruct can be had (`bench_real.py`, full mode): real-model LoRA
training tokens/s of `trainer=cpu_real` against TRL's plain defaults, their FLOP/s as a share of this machine's
measured float32 matmul rate, and batched generation on real test questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from datetime import datetime
from pathlib import Path

import torch

from gsm8k_lora import tracking
from gsm8k_lora.config import EvalConfig, ModelConfig
from gsm8k_lora.generation import build_prompt, generate
from gsm8k_lora.grading import STRICT_RE

NO_ANSWER = "n/a: the model wrote no #### answer"


def needed_tokens(tokenizer, completion: str, ended: bool) -> int | None:
    """Tokens a completion needed to give its final answer: through the `#### N` number, plus the one
    token that ended generation (EOS or stop) if it ended. None without a complete `#### N`: with no
    answer there is nothing it needed, and a number cut off by the token limit may be incomplete."""
    match = STRICT_RE.search(completion)
    if match is None or (not ended and match.end() == len(completion)):
        return None
    return len(tokenizer(completion[: match.end()], add_special_tokens=False).input_ids) + (1 if ended else 0)


def answer_token_figures(tokenizer, outputs: list[dict], max_new_tokens: int) -> dict:
    """Generated against needed tokens over the rows whose first completion holds a `#### N` answer.
    A row that used all `max_new_tokens` was cut off; one that stopped before did end (EOS or stop)."""
    generated = needed = rows = 0
    for out in outputs:
        count = out["generated_tokens"][0]
        need = needed_tokens(tokenizer, out["completions"][0], ended=count < max_new_tokens)
        if need is not None:
            generated, needed, rows = generated + count, needed + need, rows + 1
    return {"eval_needed_measured_rows": rows,
            "eval_needed_tokens_per_question": needed / rows if rows else None,
            "eval_generated_over_needed_x": generated / needed if rows else None}


def time_generation(model, tokenizer, prompts: list[str], cfg: EvalConfig) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, cfg, desc=f"batch size {cfg.batch_size}")
    return time.perf_counter() - start, out


def bench_eval(model, tokenizer, questions: list[str], batch_size: int, max_new_tokens: int) -> dict:
    """Generation speed of `model` (the base model, or one with a trained adapter), and its tokens
    generated against those needed to reach the final answer."""
    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    prompts = [build_prompt(tokenizer, q, cfg, [], None) for q in questions]
    generate(model, tokenizer, prompts[:2], dataclasses.replace(cfg, max_new_tokens=4))  # warm-up
    single_s, _ = time_generation(model, tokenizer, prompts, dataclasses.replace(cfg, batch_size=1))
    batched_s, out = time_generation(model, tokenizer, prompts, cfg)
    return {
        "eval_questions": len(prompts),
        "eval_batch_size": batch_size,
        "eval_single_questions_per_s": len(prompts) / single_s,
        "eval_batched_questions_per_s": len(prompts) / batched_s,
        "eval_batched_speedup_x": single_s / batched_s,
        "eval_generated_tokens_per_question": sum(o["generated_tokens"][0] for o in out) / len(prompts),
        **answer_token_figures(tokenizer, out, max_new_tokens),
    }


TARGETS = {"eval_batched_speedup_x": (">=", 5.0), "eval_generated_over_needed_x": ("<=", 1.2),
           "train_padding_efficiency_default": (">=", 0.95), "train_speedup_x": (">=", 1.5),
           "real_train_speedup_x": (">=", 1.5), "real_train_share_of_matmul_rate": (">=", 0.5),
           "real_eval_batched_speedup_x": (">=", 5.0), "real_eval_generated_over_needed_x": ("<=", 1.2)}
# What each figure stands beside (see the sources before comparing: each has its own setup).
REFERENCES = {
    "train_speedup_x": "HF blog (packing with FA2): padding-free ~1.4x on OrcaMath vs padded; Unsloth 2.74x (A100)",
    "eval_batched_speedup_x": "HF generate at large batch: about half of vLLM's throughput",
    "falcon3_package_default": "NeMo AutoModel LoRA on one H100: ~41% MFU (Llama3-8B, seq 4096)",
    "qlora_weight_memory_saving": "NF4 weights are 0.5 byte/param plus constants; embedding and LM head stay bf16",
    "gen_seconds": "lm-eval + vLLM: 8-shot gsm8k_cot, 1.5B model, H100: ~18 s for 1,319 questions",
}


def print_table(results: dict) -> None:
    print(f"{'figure':42s} {'value':>12s}  target")
    for key, value in results.items():
        if key.startswith("falcon3_") and isinstance(value, dict):  # one Falcon3-shaped training variant
            mfu = "n/a" if value["mfu"] is None else f"{value['mfu']:.1%}"
            peak = "n/a" if value["peak_memory_gib"] is None else f"{value['peak_memory_gib']:.1f} GiB"
            print(f"{key:42s} {value['real_tokens_per_s']:10.0f} tok/s, MFU {mfu}, peak {peak}  "
                  f"[{REFERENCES.get(key, '')}]")
        elif key in ("train_variants", "real_train_variants"):
            for v in value:
                print(f"  {v['variant']:40s} {v['real_tokens_per_s']:10.0f} real tok/s, "
                      f"{v['padding_efficiency']:.3f} of computed tokens real "
                      f"({v['timed_steps']} steps timed after 1 warm-up)")
        elif key.startswith(("eval_", "real_eval_")) and value is None:  # a figure of #### answers; there were none
            print(f"{key:42s} {NO_ANSWER}")
        elif isinstance(value, float):
            target = TARGETS.get(key)
            mark = ""
            if target:
                ok = value >= target[1] if target[0] == ">=" else value <= target[1]
                mark = f"{target[0]} {target[1]}  {'met' if ok else 'NOT met'}"
            ref = f"  [{REFERENCES[key]}]" if key in REFERENCES else ""
            print(f"{key:42s} {value:12.3f}  {mark}{ref}")
        elif key not in ("environment",):
            print(f"{key:42s} {value!s:>12s}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few questions only (the test suite uses this)")
    parser.add_argument("--adapter", help="a run directory or adapter to benchmark instead of the base tiny model")
    parser.add_argument("--out", default="outputs/bench", help="where the JSON result goes")
    parser.add_argument("--skip-real", action="store_true", help="leave out the real-model section (SmolLM2-135M)")
    parser.add_argument("--real-steps", type=int, default=3, help="optimizer steps per real-model training variant")
    parser.add_argument("--real-questions", type=int, default=8, help="real test questions for generation speed")
    args = parser.parse_args(argv)

    from gsm8k_lora import synthetic
    from gsm8k_lora.model import load

    torch.manual_seed(0)
    model, tokenizer = load(ModelConfig(name_or_path="builtin:tiny"))
    if args.adapter:
        from peft import PeftModel

        from gsm8k_lora.evaluate import resolve_adapter

        model = PeftModel.from_pretrained(model, resolve_adapter(args.adapter))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    n = 8 if args.quick else 64
    questions = [row["question"] for row in synthetic.generate(n, seed=123)]
    results = {"mode": "quick" if args.quick else "full", "model": "tiny" + ("+adapter" if args.adapter else ""),
               **bench_eval(model, tokenizer, questions, batch_size=min(32, n), max_new_tokens=128)}
    from gsm8k_lora.bench_train import bench_training, default_trainer_config
    from gsm8k_lora.sources import resolve

    tiny_dir = resolve(ModelConfig(name_or_path="builtin:tiny")).path
    cuda = torch.cuda.is_available()
    results.update(bench_training(tiny_dir, default_trainer_config(cuda), steps=3 if args.quick else 20,
                                  epoch_rows=400 if args.quick else 6726))
    if cuda or not args.quick:  # on a CPU, the weight memory only
        from gsm8k_lora.bench_falcon3 import bench_falcon3
        from gsm8k_lora.config import ConfigError

        try:
            results.update(bench_falcon3(Path(tiny_dir), steps=5 if args.quick else 30, quick=args.quick))
        except ConfigError as err:  # no bitsandbytes for this device: the other figures still stand
            results["falcon3_skipped"] = str(err)
    if not (args.quick or args.skip_real):
        from gsm8k_lora.bench_real import bench_real

        results.update(bench_real(args.real_steps, args.real_questions))
    results["environment"] = tracking.environment()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    tracking.write_json(path, results)
    print_table(results)
    print(f"written: {path}")
    return results


if __name__ == "__main__":
    main()
