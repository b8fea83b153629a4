"""Benchmarks: `python -m gsm8k_lora.bench [--quick] [--adapter RUN_DIR] [--gsm8k DIR]` (or `make bench`).

Speed is measured as a ratio of two variants in the same process on the same inputs, because
these machines are noisy. Writes `outputs/bench/<time>.json` (rewritten after each measurement, so a bench stopped
from outside keeps what it measured) and prints a table.

Figures on any machine (tiny model; CPU unless a GPU is present):
- generation: the evaluation's continuous batching against `model.generate`'s padded batches (what it used
  before) and against one question at a time, tokens computed over kept, and generated tokens against those
  needed to reach the final answer (measured on completions with a `#### N`: none from the base tiny model, use
  --adapter);
- padding efficiency (real / computed tokens) over a GSM8K-size epoch, default against TRL's plain
  defaults (target >= 0.95), and real tokens/s of the two in the same run (target >= 1.5x);
- the answer pass of 2 processes against 1 (`benchmarks/parallel.py`, full mode; target <= 0.6x the time), and
  whether the two gave the same answers;
- the base-weight memory of a Falcon3-1B-shaped model in bf16 and in 4-bit (full mode);
on a CUDA machine also the Falcon3-1B-shaped training and generation figures of `benchmarks/falcon3.py`;
and, with a local GSM8K (`--gsm8k`) where SmolLM2-135M-Instruct can be had (`benchmarks/real.py`, full mode):
real-model LoRA training tokens/s of `trainer=cpu_real` against TRL's plain defaults and in bf16, their FLOP/s as
a share of this machine's measured float32 matmul rate, a profile of one step, and generation on real test
questions (`real_generation_*`: tokens/s, speed-up over the padded path, share of the compute ceiling, tokens
computed over kept, and in bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from datetime import datetime
from pathlib import Path

import torch
from peft import PeftModel

from gsm8k_lora.benchmarks.falcon3 import LEVERS, bench_falcon3
from gsm8k_lora.benchmarks.generation import NO_ANSWER, bench_eval
from gsm8k_lora.benchmarks.parallel import bench_parallel
from gsm8k_lora.benchmarks.real import bench_real
from gsm8k_lora.benchmarks.training import bench_training, device_config
from gsm8k_lora.config import BUILTIN_TINY, ENGINES
from gsm8k_lora.data import synthetic
from gsm8k_lora.environment import environment
from gsm8k_lora.errors import ConfigError, fail
from gsm8k_lora.model.loading import load
from gsm8k_lora.model.sources import resolve
from gsm8k_lora.rundir import resolve_adapter, write_json

TARGETS = {"eval_batched_speedup_x": (">=", 5.0), "eval_generated_over_needed_x": ("<=", 1.2),
           "train_padding_efficiency_default": (">=", 0.95), "train_speedup_x": (">=", 1.5),
           "parallel_answer_time_ratio": ("<=", 0.6),
           "real_train_speedup_x": (">=", 1.5), "real_train_share_of_matmul_rate": (">=", 0.5),
           "real_generation_speedup_x": (">=", 3.0), "real_generation_share_of_matmul_rate": (">=", 0.5),
           "real_eval_generated_over_needed_x": ("<=", 1.2)}
# What each figure stands beside (see the sources before comparing: each has its own setup).
REFERENCES = {
    "train_speedup_x": "HF blog (packing with FA2): padding-free ~1.4x on OrcaMath vs padded; Unsloth 2.74x (A100)",
    "eval_batched_speedup_x": "HF generate at large batch: about half of vLLM's throughput",
    "falcon3_package_default": "NeMo AutoModel LoRA on one H100: ~41% MFU (Llama3-8B, seq 4096)",
    "qlora_weight_memory_saving": "NF4 weights are 0.5 byte/param plus constants; embedding and LM head stay bf16",
    "gen_seconds": "lm-eval + vLLM: 8-shot gsm8k_cot, 1.5B model, H100: ~18 s for 1,319 questions",
}


MACHINE_SKIPS = ("real_skipped", "parallel_skipped")  # no local GSM8K; a single GPU: said, not a failure


def unmeasured(results: dict) -> list[str]:
    """The figures this run did not measure: a training variant that failed, was left out, or counted no token (its
    rates would print 0), an engine that failed or was left out, a rate that is not a number, an MFU on a GPU whose
    peak is unknown. Figures absent for a stated reason of the machine (no `#### N` answer to measure against, no
    GPU, on a CPU no 4-bit kernels) are printed as n/a with it, and are not listed."""
    found = []
    on_gpu = results.get("falcon3_device", "cpu") != "cpu"
    for key, value in results.items():
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{key}: {value}")
        if key.endswith("_error") or (on_gpu and key.endswith("_skipped") and key not in MACHINE_SKIPS):
            found.append(f"{key.rpartition('_')[0]}: {value}")
        listed = isinstance(value, list)
        variants = value if listed else [value] if isinstance(value, dict) and "variant" in value else []
        for variant in variants:
            name = f"{key}[{variant['variant']}]" if listed else key
            if "error" in variant or "skipped" in variant:
                found.append(f"{name}: {variant.get('error') or 'not run: ' + variant['skipped']}")
            elif not (variant.get("real_tokens") and variant.get("computed_tokens")):
                found.append(f"{name}: counted no trained token")
            elif on_gpu and "mfu" in variant and variant["mfu"] is None:
                found.append(f"{name}: no MFU, no bf16 peak is known for {results['falcon3_device']}")
    return found


def choose(results: dict) -> list[str]:
    """The overrides of the training variant with the most tokens/s among those that keep the reference run's 16
    rows a step, and of the answer engine with the most tokens/s (the merged adapter where the slot loop is chosen
    and merging made it faster): from what a GPU bench measured, never from what it did not."""
    def rate(key: str) -> float:
        value = results.get(key)
        return value.get("real_tokens_per_s", 0.0) if isinstance(value, dict) and "error" not in value else 0.0

    reference_batch = [lever for lever in LEVERS if not any("per_device_train_batch_size" in o for o in LEVERS[lever])]
    training = max(reference_batch, key=lambda lever: rate(f"falcon3_{lever}"))
    chosen = list(LEVERS[training]) if rate(f"falcon3_{training}") > 0 else []
    engines = {e: results.get(f"gen_{e}_tokens_per_s") or 0.0 for e in ENGINES}
    engine = max(engines, key=engines.get)
    if engines[engine] > 0:
        chosen.append(f"eval.engine={engine}")
        if engine == "slots" and (results.get("gen_slots_merged_tokens_per_s") or 0.0) > engines["slots"]:
            chosen.append("eval.merge_adapter=true")
    return chosen


def print_table(results: dict) -> None:
    print(f"{'figure':42s} {'value':>12s}  target")
    for key, value in results.items():
        if isinstance(value, dict) and ("error" in value or "skipped" in value):
            print(f"{key:42s} {value.get('error') or 'not run: ' + value['skipped']}")
        elif isinstance(value, dict) and "gpu_busy" in value:  # a profile of CUDA kernels
            parts = ", ".join(f"{k} {v:.0%}" for k, v in value.items() if k not in ("wall_s", "gpu_busy"))
            print(f"{key:42s} {value['wall_s']:.3f} s, GPU busy {value['gpu_busy']:.0%}: {parts}")
        elif key.startswith("falcon3_") and isinstance(value, dict):  # one Falcon3-shaped training variant
            mfu = "n/a" if value["mfu"] is None else f"{value['mfu']:.1%}"
            peak = "n/a" if value["peak_memory_gib"] is None else f"{value['peak_memory_gib']:.1f} GiB"
            print(f"{key:42s} {value['real_tokens_per_s']:10.0f} tok/s, MFU {mfu}, peak {peak}  "
                  f"[{REFERENCES.get(key, '')}]")
        elif key == "real_train_step_profile" and value:
            parts = ", ".join(f"{k} {v:.0%}" for k, v in value.items() if k != "step_s")
            print(f"{key:42s} one step {value['step_s']:.1f} s: {parts}")
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
        elif key not in ("environment", "unmeasured", "finished"):
            print(f"{key:42s} {value!s:>12s}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few questions only (the test suite uses this)")
    parser.add_argument("--adapter", help="a run directory or adapter to benchmark instead of the base tiny model")
    parser.add_argument("--out", default="outputs/bench", help="where the JSON result goes")
    parser.add_argument("--skip-real", action="store_true", help="leave out the real-model section (SmolLM2-135M)")
    parser.add_argument("--gpu-check", action="store_true",
                        help="sized for the one-call GPU check (scripts/gpu_check.sh): 6 steps a variant, 256 prompts")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds the Falcon3-shaped section may take: what does not fit is named as not measured")
    parser.add_argument("--real-steps", type=int, default=3, help="optimizer steps per real-model training variant")
    parser.add_argument("--real-questions", type=int, default=64,
                        help="real test questions for generation speed (at least 32)")
    parser.add_argument("--choose", type=Path, default=None, metavar="BENCH_JSON",
                        help="print the overrides of the fastest training levers and answer engine a GPU bench "
                             "measured (what the GPU check's runs then use), and stop")
    parser.add_argument("--gsm8k", type=Path, default=None,
                        help="a local GSM8K (train.jsonl, test.jsonl) for the real-model section (make bench gives it)")
    args = parser.parse_args(argv)

    if args.choose:
        print(" ".join(choose(json.loads(args.choose.read_text(encoding="utf-8")))))
        return {}
    cuda = torch.cuda.is_available()
    if args.gpu_check and not cuda:
        fail(ConfigError("--gpu-check measures the CUDA levers at Falcon3-1B's shape, and this machine has no CUDA "
                         "GPU: here, python -m gsm8k_lora.bench (make bench) measures what a CPU can"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    env = environment()

    def save(figures: dict, finished: bool = False) -> dict:
        """The JSON, rewritten after each measurement: a bench stopped from outside (a time limit) leaves its
        figures so far, each one not measured named with why."""
        written = {**figures, "environment": env, "unmeasured": unmeasured(figures), "finished": finished}
        write_json(path, written)
        return written

    results = measure(args, cuda, save)
    results = save(results, finished=True)
    print_table(results)
    print(f"written: {path}")
    if results["unmeasured"]:
        print(f"bench: {len(results['unmeasured'])} figure(s) not measured: {'; '.join(results['unmeasured'])}",
              file=sys.stderr)
        sys.exit(1)
    return results


def measure(args: argparse.Namespace, cuda: bool, save) -> dict:
    """Every section the arguments ask for, `save`d after each measurement."""
    cfg = device_config(cuda)  # the tiny model, with the trainer and eval presets a run on this device uses
    torch.manual_seed(0)
    tiny = resolve(dataclasses.replace(cfg.model, name_or_path=BUILTIN_TINY))
    results = {"mode": "gpu-check" if args.gpu_check else "quick" if args.quick else "full",
               "model": "tiny" + ("+adapter" if args.adapter else "")}
    if not args.gpu_check:  # the GPU check's minutes go to the Falcon3-shaped levers
        model, tokenizer = load(dataclasses.replace(cfg.model, name_or_path=BUILTIN_TINY), resolved=tiny)
        if args.adapter:
            model = PeftModel.from_pretrained(model, resolve_adapter(args.adapter))
        model.to("cuda" if cuda else "cpu")
        n = 8 if args.quick else 64
        questions = [row["question"] for row in synthetic.generate(n, seed=123)]
        results.update(bench_eval(model, tokenizer, questions, cfg.eval, batch_size=min(32, n), max_new_tokens=128))
        save(results)
        results.update(bench_training(tiny.path, cfg, steps=3 if args.quick else 20,
                                      epoch_rows=400 if args.quick else 6726))
        save(results)
        if not args.quick:  # two launches of torchrun: a minute on a CPU
            results.update(bench_parallel(64, torch.cuda.device_count() if cuda else 0))
            save(results)
    if cuda or not args.quick:  # on a CPU, the weight memory only
        steps = 6 if args.gpu_check else (5 if args.quick else 30)
        results.update(bench_falcon3(Path(tiny.path), steps=steps, quick=args.quick,
                                     prompts=256 if args.gpu_check else None, gsm8k_dir=args.gsm8k,
                                     deadline_s=args.deadline_s, progress=lambda figures: save({**results, **figures})))
        save(results)
    if not (args.quick or args.skip_real):
        if args.gsm8k is None:
            results["real_skipped"] = "no local GSM8K given (--gsm8k DIR)"
        else:
            results.update(bench_real(args.real_steps, args.real_questions, args.gsm8k))
    return results


if __name__ == "__main__":
    main()
