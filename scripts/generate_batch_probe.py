"""transformers' own continuous batching (`generate_batch`, paged KV cache) against the evaluation's path, on
SmolLM2-135M-Instruct and real GSM8K test questions, float32, greedy, 256 new tokens. Not part of the package:
it is the measurement behind the choice of `evaluation/batching.py` (docs/results.md names it).

    python scripts/generate_batch_probe.py --gsm8k ../shared/gsm8k [--questions 32]

`generate_batch` stops on token ids only, so it runs here with EOS and the end-of-turn token; its tokens/s
counts every token it generated (what it would spend), the package's counts what it keeps (it also stops at a
complete `#### N` line), the padded path's likewise.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from gsm8k_lora.benchmarks.generation import generate_padded
from gsm8k_lora.config import compose
from gsm8k_lora.data.loading import build_splits, questions
from gsm8k_lora.evaluation.generation import build_prompt, generate, stop_token_ids
from gsm8k_lora.model.loading import load


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gsm8k", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=32)
    args = parser.parse_args()
    cfg = compose(["experiment=real_cpu", "data=local", f"data.path={args.gsm8k}", "logger=none"])
    ecfg = dataclasses.replace(cfg.eval, dtype="float32", batch_size=32, max_new_tokens=256)
    model, tokenizer = load(cfg.model)
    model.eval()
    rows = questions(build_splits(cfg.data), "test", args.questions)
    prompts = [build_prompt(tokenizer, r["question"], ecfg, [], None) for r in rows]
    generate(model, tokenizer, prompts[:2], dataclasses.replace(ecfg, max_new_tokens=4))  # warm-up

    ours, seconds = timed(lambda: generate(model, tokenizer, prompts, ecfg))
    kept = sum(o["generated_tokens"][0] for o in ours)
    print(f"package (continuous batching, 32 slots): {kept / seconds:.1f} kept tokens/s ({kept} in {seconds:.1f} s)")
    padded, seconds = timed(lambda: generate_padded(model, tokenizer, prompts, ecfg))
    kept = sum(o["generated_tokens"][0] for o in padded)
    print(f"model.generate, padded batches of 32: {kept / seconds:.1f} kept tokens/s ({kept} in {seconds:.1f} s)")

    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    gen = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                           pad_token_id=tokenizer.pad_token_id)
    for batch_tokens, pages, requests in ((512, 64, None), (128, 64, 32), (2048, 256, None)):
        cb = ContinuousBatchingConfig(max_batch_tokens=batch_tokens, page_size=pages, max_requests_per_batch=requests)
        with torch.inference_mode():
            out, seconds = timed(lambda cb=cb: model.generate_batch(ids, generation_config=gen,
                                                                    continuous_batching_config=cb))
        made = sum(len(o.generated_tokens) for o in out.values())
        print(f"generate_batch (max_batch_tokens={batch_tokens}, page_size={pages}, max_requests={requests}): "
              f"{made / seconds:.1f} generated tokens/s ({made} in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
