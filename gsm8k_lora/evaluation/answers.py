"""The evaluation step: which questions, with which few-shot examples, answered by the baseline (adapter
disabled) and the fine-tuned model, then graded and summed up (`scoring.py`). Used alike by the recipe
(`recipe.py`) and `python -m gsm8k_lora.evaluate`; nothing here writes a file or talks to W&B."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from gsm8k_lora import figures as F
from gsm8k_lora.config import EvalConfig
from gsm8k_lora.data.loading import Splits, shot_pool
from gsm8k_lora.evaluation import baseline_cache, protocols
from gsm8k_lora.evaluation.generation import build_prompt, generate, merged, settings, token_limit
from gsm8k_lora.evaluation.scoring import eval_metrics, score

TINY_NOTE = ("The built-in tiny model's accuracy says nothing about Falcon3 or any real model: "
             "it only shows the pipeline measures what fine-tuning changed.")


def pick_shots(train_rows: list[dict], cfg: EvalConfig, num_questions: int) -> list[list[dict]]:
    """Each question's few-shot examples, as `eval.prompt`'s protocol draws them (`protocols.Protocol.shots`)."""
    return protocols.get(cfg.prompt).shots(train_rows, num_questions, cfg.num_fewshot)


def answer(model, tokenizer, rows: list[dict], shots: list[list[dict]], cfg: EvalConfig,
           system_prompt: str | None, adapters: bool,
           weights: dict | None = None) -> tuple[dict[str, list[dict]], str, dict[str, float]]:
    """Graded predictions of the fine-tuned model and (adapter disabled) the baseline, on the same questions; where
    the baseline's answers came from: `generated`, or the cache entry that held them (`weights`: the base weights'
    identity, `baseline_cache.weights_identity`; without it the baseline is not cached); and the seconds each
    model took to answer and how many processes shared it, as eval_metrics.json names them (a baseline read from
    the cache took none)."""
    prompts = [build_prompt(tokenizer, r["question"], cfg, s, system_prompt) for r, s in zip(rows, shots, strict=True)]
    model.config.use_cache = True
    out: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    processes: dict[str, int] = {}
    source = "generated"

    def timed(name: str, answering, desc: str) -> list[dict]:
        start = time.perf_counter()
        generations = generate(answering, tokenizer, prompts, cfg, desc)
        seconds[name] = time.perf_counter() - start
        processes[name] = len({g.pop("process") for g in generations})  # how many shared the answering
        return generations

    if not adapters or cfg.compare_baseline:
        context = model.disable_adapter() if adapters else contextlib.nullcontext()
        with context:
            def run() -> list[dict]:
                return timed("baseline", model, "Baseline answers")

            if cfg.baseline_cache and weights is not None:
                the_key = baseline_cache.key(weights, model, prompts, rows, settings(model, tokenizer, cfg))
                generations, source = baseline_cache.fetch(Path(cfg.baseline_cache), the_key, run)
            else:
                generations = run()
            out["baseline"] = score(rows, generations, "baseline", token_limit(cfg))
    if adapters:
        with merged(model) if cfg.merge_adapter else contextlib.nullcontext(model) as answering:
            generations = timed("finetuned", answering, "Fine-tuned answers")
        out["finetuned"] = score(rows, generations, "finetuned", token_limit(cfg))
    return out, source, {**{F.figure(n, F.ANSWER_SECONDS): v for n, v in seconds.items()},
                         **{F.figure(n, F.ANSWER_PROCESSES): v for n, v in processes.items()}}


def evaluate(cfg: EvalConfig, system_prompt: str | None, model, tokenizer, splits: Splits, rows: list[dict],
             adapters: bool, weights: dict | None = None,
             note: str | None = None) -> tuple[dict[str, list[dict]], dict]:
    """The questions answered and graded, and the figures of `eval_metrics.json` (`note`: a caveat kept with them)."""
    shots = pick_shots(shot_pool(splits, cfg.split), cfg, len(rows))
    predictions, source, timing = answer(model, tokenizer, rows, shots, cfg, system_prompt, adapters, weights)
    metrics = eval_metrics(predictions)
    metrics.update(timing)
    if "baseline" in predictions:
        metrics["baseline_source"] = source
    if note:
        metrics["note"] = note
    return predictions, metrics


def model_note(name_or_path: str) -> str | None:
    """The caveat of a run's figures that its model calls for: the built-in tiny model's."""
    return TINY_NOTE if name_or_path.startswith("builtin:") else None
