"""The answer engines measured on the Falcon3-shaped model (`benchmarks/falcon3.py`): the fine-tuned answer pass
as each engine (`eval.engine`, `eval.merge_adapter`) runs it on GSM8K test questions, each row stopped at its
reference solution's token count because random weights never stop by themselves."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model

from gsm8k_lora.benchmarks.generation import same_answers, timed
from gsm8k_lora.benchmarks.profiles import kernel_shares, profile_kernels
from gsm8k_lora.benchmarks.training import gsm8k_like_rows, synchronize
from gsm8k_lora.config import Config
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.model.loading import load
from gsm8k_lora.training.sft import build_lora_config


def answer_rows(gsm8k_dir: Path | None, n: int) -> list[dict]:
    """Test questions with reference solutions: GSM8K's own where a local copy is given, else GSM8K-like rows."""
    if gsm8k_dir is not None and (gsm8k_dir / "test.jsonl").exists():
        lines = (gsm8k_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines[:n]]
    return gsm8k_like_rows(n, seed=3)


class Answers:
    """The fine-tuned answer pass as each engine runs it: the model with a LoRA adapter attached, in bf16, each row
    stopped at its reference solution's token count (under `eval.max_new_tokens`). Loaded at the first engine
    measured and shared by the rest (the training variants after it measure peak memory above what it holds)."""

    def __init__(self, model_dir: Path, cfg: Config, rows: list[dict], batch_size: int):
        self.model_dir, self.cfg, self.rows, self.batch_size = model_dir, cfg, rows, batch_size
        self.model, self.results = None, {}

    def setup(self) -> dict:
        model, self.tokenizer = load(dataclasses.replace(self.cfg.model, name_or_path=str(self.model_dir)))
        model = get_peft_model(model.to("cuda" if torch.cuda.is_available() else "cpu"),
                               build_lora_config(self.cfg.lora))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: an adapter that changes nothing would merge to nothing
                torch.nn.init.normal_(param, std=0.02)
        model.config.use_cache = True
        self.model, self.ecfg = model, dataclasses.replace(self.cfg.eval, batch_size=self.batch_size, dtype="model")
        self.prompts = [build_prompt(self.tokenizer, r["question"], self.ecfg, [], None) for r in self.rows]
        self.limits = [len(self.tokenizer(r["answer"]).input_ids) + 1 for r in self.rows]  # the solution, its EOS
        generate(model, self.tokenizer, self.prompts[:4], dataclasses.replace(self.ecfg, max_new_tokens=4))  # warm-up
        cap = self.ecfg.max_new_tokens
        return {"gen_questions": len(self.rows), "gen_batch_size": self.batch_size, "gen_max_new_tokens": cap,
                "gen_reference_tokens_mean": sum(min(n, cap) for n in self.limits) / len(self.limits),
                "gen_note": "random weights never stop: each row is stopped at its reference solution's token count"}

    def measure(self, name: str) -> dict:
        """`name`: an engine, or `slots_merged` (the slot loop on the adapter merged into a copy of the weights)."""
        figures = self.setup() if self.model is None else {}
        engine, merge = name.removesuffix("_merged"), name.endswith("_merged")
        synchronize()
        result = timed(self.model, self.tokenizer, self.prompts,
                       dataclasses.replace(self.ecfg, engine=engine, merge_adapter=merge), self.limits)
        synchronize()
        self.results[name] = result
        figures.update({f"gen_{name}_seconds": result["seconds"], f"gen_{name}_tokens": result["kept_tokens"],
                        f"gen_{name}_tokens_per_s": result["tokens_per_s"]})
        if "padded" in self.results and name != "padded":
            figures[f"gen_{name}_same_answers_as_padded"] = same_answers(result, self.results["padded"])
        return figures

    def profile(self) -> dict:
        """Where 32 decode steps of one full batch spend their time."""
        if self.model is None:
            self.setup()
        with profile_kernels() as profile:
            start = time.perf_counter()
            generate(self.model, self.tokenizer, self.prompts[:self.batch_size],
                     dataclasses.replace(self.ecfg, max_new_tokens=32))
            synchronize()
        return {"gen_decode_profile": kernel_shares(profile, time.perf_counter() - start)}
