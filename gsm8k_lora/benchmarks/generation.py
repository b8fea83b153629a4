"""Generation speed for `make bench`: batched against one question at a time, and tokens generated against
the tokens needed to reach the final answer. Uses the evaluation's own `generate`, with the eval preset of
`conf/eval/default.yaml` changed only in batch size and token limit."""

from __future__ import annotations

import dataclasses
import time

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.data.gsm8k import final_answer
from gsm8k_lora.evaluation.generation import build_prompt, generate

NO_ANSWER = "n/a: the model wrote no #### answer"


def needed_tokens(tokenizer, completion: str, ended: bool) -> int | None:
    """Tokens a completion needed to give its final answer: through the `#### N` number, plus the one
    token that ended generation (EOS or stop) if it ended. None without a complete `#### N`: with no
    answer there is nothing it needed, and a number cut off by the token limit may be incomplete."""
    match = final_answer(completion)
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


def bench_eval(model, tokenizer, questions: list[str], eval_cfg: EvalConfig, batch_size: int,
               max_new_tokens: int) -> dict:
    """Generation speed of `model` (the base model, or one with a trained adapter), and its tokens
    generated against those needed to reach the final answer."""
    cfg = dataclasses.replace(eval_cfg, batch_size=batch_size, max_new_tokens=max_new_tokens)
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
