"""Generation speed for `make bench`: the evaluation's own path (`evaluation/generation.generate` with the
default engine, continuous batching) against `model.generate`'s padded batches (`eval.engine=padded`, the
baseline as TRL's defaults are for training) and against one question at a time; tokens computed over tokens
kept, counted at the LM head; and tokens generated against those needed to reach the final answer. The eval
preset of `conf/eval/default.yaml` is changed only in batch size, token limit and engine."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.data.gsm8k import final_answer
from gsm8k_lora.evaluation.generation import (
    build_prompt,
    generate,
)

NO_ANSWER = "n/a: the model wrote no #### answer"


@contextmanager
def counted_at_the_head(model):
    """The token positions whose next-token logits the model computes, counted by a hook on its LM head: what
    a generation path computes, whether it keeps the token or not (prefill computes one a prompt)."""
    count = [0]

    def hook(module, inputs, output):
        count[0] += output.shape[0] * output.shape[1]

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def timed(model, tokenizer, prompts: list[str], cfg: EvalConfig, limits: list[int] | None = None) -> dict:
    """The answers of `cfg.engine`: seconds, tokens kept, tokens computed (at the LM head), kept tokens/s."""
    with counted_at_the_head(model) as computed:
        start = time.perf_counter()
        out = generate(model, tokenizer, prompts, cfg, f"{cfg.engine}, batch {cfg.batch_size}", limits)
        seconds = time.perf_counter() - start
    kept = sum(sum(o["generated_tokens"]) for o in out)
    return {"seconds": seconds, "kept_tokens": kept, "computed_tokens": computed[0], "tokens_per_s": kept / seconds,
            "computed_over_kept_x": computed[0] / kept, "outputs": out}


def same_answers(a: dict, b: dict) -> int:
    """How many questions two `timed` results answered alike (every completion and its token count)."""
    return sum(x == y for x, y in zip(a["outputs"], b["outputs"], strict=True))


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


def bench_eval(model, tokenizer, questions: list[str], eval_cfg: EvalConfig, batch_size: int,
               max_new_tokens: int) -> dict:
    """Generation speed of `model` (the base model, or one with a trained adapter): the evaluation's path against
    the padded baseline and against one question at a time, and tokens generated against those needed."""
    cfg = dataclasses.replace(eval_cfg, batch_size=batch_size, max_new_tokens=max_new_tokens)
    prompts = [build_prompt(tokenizer, q, cfg, [], None) for q in questions]
    generate(model, tokenizer, prompts[:2], dataclasses.replace(cfg, max_new_tokens=4))  # warm-up
    single = timed(model, tokenizer, prompts, dataclasses.replace(cfg, batch_size=1))
    padded = timed(model, tokenizer, prompts, dataclasses.replace(cfg, engine="padded"))
    ours = timed(model, tokenizer, prompts, cfg)
    same = same_answers(ours, padded)
    return {
        "eval_questions": len(prompts),
        "eval_batch_size": batch_size,
        "eval_tokens_per_s": ours["tokens_per_s"],
        "eval_tokens_per_s_padded": padded["tokens_per_s"],
        "eval_speedup_over_padded_x": ours["tokens_per_s"] / padded["tokens_per_s"],
        "eval_batched_speedup_x": single["seconds"] / ours["seconds"],
        "eval_computed_over_kept_x": ours["computed_over_kept_x"],
        "eval_computed_over_kept_x_padded": padded["computed_over_kept_x"],
        "eval_same_answers_as_padded": same,
        "eval_generated_tokens_per_question": ours["kept_tokens"] / len(prompts),
        **answer_token_figures(tokenizer, ours["outputs"], max_new_tokens),
    }
