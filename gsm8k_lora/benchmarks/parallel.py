"""The answer pass, data-parallel, for `make bench`: the same questions answered by 2 processes and by 1, each
launched by torchrun with one thread a process (OMP_NUM_THREADS=1, as torchrun sets it), so the two runs differ
only in their number of processes (on a GPU machine: one GPU a process, so it needs two). Each process answers its
share (`evaluation/generation.generate`, sharded by `parallel.shard` and gathered); rank 0 times the pass between
two barriers, which wait for the slowest share. Figures:
- `parallel_answer_s_1`, `parallel_answer_s_2`: seconds of the pass;
- `parallel_answer_time_ratio`: 2 processes over 1 (target <= 0.6; 0.5 is a perfect split);
- `parallel_answers_equal`: questions answered alike by the two (greedy answers do not depend on the split).
The worker is this module run as a program: `python -m gsm8k_lora.benchmarks.parallel OUT QUESTIONS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gsm8k_lora import parallel
from gsm8k_lora.benchmarks.training import device_config
from gsm8k_lora.config import BUILTIN_TINY
from gsm8k_lora.data import synthetic
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.model.loading import load, to_device

WORKER = "gsm8k_lora.benchmarks.parallel"


def bench_parallel(questions: int, gpus: int) -> dict:
    """The pass of `questions` synthetic questions by 2 processes against 1 (`gpus`: this machine's CUDA GPUs)."""
    if 0 < gpus < 2:
        return {"parallel_skipped": "needs 2 GPUs on a GPU machine (one a process); this one has 1"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    found = {}
    with tempfile.TemporaryDirectory(prefix="gsm8k_lora-parallel-") as tmp:
        for processes in (1, 2):
            out = Path(tmp) / f"{processes}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", WORKER, str(out), str(questions)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0 or not out.exists():
                return {"parallel_error": f"{processes} process(es): exit {proc.returncode}: {proc.stderr[-500:]}"}
            found[processes] = json.loads(out.read_text(encoding="utf-8"))
    one, two = found[1], found[2]
    return {"parallel_questions": questions, "parallel_answer_s_1": one["seconds"],
            "parallel_answer_s_2": two["seconds"], "parallel_answer_time_ratio": two["seconds"] / one["seconds"],
            "parallel_answers_equal": sum(a == b for a, b in zip(one["completions"], two["completions"], strict=True))}


def worker(out: Path, questions: int) -> None:
    """One process of the pass: the tiny model answers its share of `questions` synthetic questions."""
    cuda = torch.cuda.is_available()
    parallel.start(600, cpu=not cuda)
    cfg = device_config(cuda)
    model, tokenizer = load(dataclasses.replace(cfg.model, name_or_path=BUILTIN_TINY))
    to_device(model)
    prompts = [build_prompt(tokenizer, row["question"], cfg.eval, [], None)
               for row in synthetic.generate(questions, seed=123)]
    parallel.barrier()
    start = time.perf_counter()
    answers = generate(model, tokenizer, prompts, dataclasses.replace(cfg.eval, max_new_tokens=128, batch_size=8),
                       "answers")
    parallel.barrier()
    seconds = time.perf_counter() - start
    if parallel.is_main_process():
        out.write_text(json.dumps({"seconds": seconds, "completions": [a["completions"] for a in answers]}),
                       encoding="utf-8")


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
