"""Generation speed for `make bench`: the evaluation's own path (`evaluation/generation.generate`, continuous
batching) against `model.generate`'s padded batches (`generate_padded`, what the package used before, kept as
the baseline as TRL's defaults are for training) and against one question at a time; tokens computed over
tokens kept, counted at the LM head; and tokens generated against those needed to reach the final answer. The
eval preset of `conf/eval/default.yaml` is changed only in batch size and token limit."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.data.gsm8k import answer_line_complete, final_answer
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.evaluation.generation import (
    ANSWER_LOOKBACK,
    adds_special_tokens,
    build_prompt,
    generate,
    stop_token_ids,
    stops_and_limit,
)

NO_ANSWER = "n/a: the model wrote no #### answer"


class AnswerComplete(StoppingCriteria):
    """Per row: the `#### N` line is complete (the padded path's form of the evaluation's own stop)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_len, input_ids.shape[1] - ANSWER_LOOKBACK)
        done = [answer_line_complete(t) for t in self.tokenizer.batch_decode(input_ids[:, start:])]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_padded(model, tokenizer, prompts: list[str], cfg: EvalConfig, desc: str = "padded batches") -> list[dict]:
    """The evaluation's generation before continuous batching: `model.generate` on batches of `eval.batch_size`
    prompts sorted by length and left-padded, each decoded until its last row stops, with the same stops."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[dict] = [{} for _ in prompts]
    sampling = cfg.num_samples > 1
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer)
    protocol = protocols.get(cfg.prompt)
    stops, max_new = stops_and_limit(tokenizer, cfg)
    for start in tqdm(range(0, len(order), cfg.batch_size), desc=desc, unit="batch"):
        idx = order[start:start + cfg.batch_size]
        texts_in = [prompts[i] for i in idx]
        batch = tokenizer(texts_in, return_tensors="pt", padding=True,
                          add_special_tokens=adds_special_tokens(tokenizer, texts_in[0], protocol)).to(device)
        prompt_len = batch.input_ids.shape[1]
        criteria = [AnswerComplete(tokenizer, prompt_len)] if protocol.stops_at_answer_line else []
        out = model.generate(
            **batch, max_new_tokens=max_new, do_sample=sampling,
            temperature=cfg.temperature if sampling else None, top_p=None, top_k=None,
            num_return_sequences=cfg.num_samples, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids, stop_strings=stops or None, tokenizer=tokenizer,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        new = out[:, prompt_len:].view(len(idx), cfg.num_samples, -1)
        for row, i in enumerate(idx):
            texts, counts = [], []
            for seq in new[row]:
                keep = seq[seq != tokenizer.pad_token_id].tolist()
                ends = [k for k, token in enumerate(keep) if token in stop_ids]
                keep = keep[: ends[0] + 1] if ends else keep
                counts.append(len(keep))
                text = tokenizer.decode(keep, skip_special_tokens=True)
                texts.append(protocol.graded_text(text, stops))
            results[i] = {"completions": texts, "generated_tokens": counts}
    tokenizer.padding_side = side
    return results


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


def timed(path, model, tokenizer, prompts: list[str], cfg: EvalConfig) -> dict:
    """One path's answers: seconds, tokens kept, tokens computed (at the LM head), kept tokens/s."""
    with counted_at_the_head(model) as computed:
        start = time.perf_counter()
        out = path(model, tokenizer, prompts, cfg, f"{path.__name__}, batch {cfg.batch_size}")
        seconds = time.perf_counter() - start
    kept = sum(sum(o["generated_tokens"]) for o in out)
    return {"seconds": seconds, "kept_tokens": kept, "computed_tokens": computed[0], "tokens_per_s": kept / seconds,
            "computed_over_kept_x": computed[0] / kept, "outputs": out}


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
    single = timed(generate, model, tokenizer, prompts, dataclasses.replace(cfg, batch_size=1))
    padded = timed(generate_padded, model, tokenizer, prompts, cfg)
    ours = timed(generate, model, tokenizer, prompts, cfg)
    same = sum(a["completions"] == b["completions"] for a, b in zip(ours["outputs"], padded["outputs"], strict=True))
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
