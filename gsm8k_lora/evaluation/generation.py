"""Prompts and batched generation for evaluation.

Prompts are built with the model's chat template, exactly as in training (`data/formatting.py`), or as
lm-evaluation-harness builds them (`protocols.py`). Generation is batched with left padding and the KV
cache (`model.generate`); each row stops at EOS or the template's end-of-turn token (token ids), at a
fixed stop string (`generate(stop_strings=...)`: the new-turn markers of `data/gsm8k.py`, or lm-eval's
stops), or (outside lm-eval's protocol) as soon as its `#### N` line is complete, so no row burns the
whole `max_new_tokens` once it has answered.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.data.formatting import build_messages, render_prompt
from gsm8k_lora.data.gsm8k import NEW_TURN_TEXT, answer_line_complete
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.stopping import STOP


def build_prompt(tokenizer, question: str, cfg: EvalConfig, shots: list[dict], system_prompt: str | None) -> str:
    """The prompt of one question under `eval.prompt`:
    - zero_shot_cot: the training prompt (the question in the model's chat template);
    - fewshot: the same, after k worked examples as earlier chat turns;
    - lm_eval_gsm8k: lm-eval's `gsm8k` task with --apply_chat_template --fewshot_as_multiturn (TII's setting
      for Falcon3's published 43.9%); lm_eval_gsm8k_plain: the same task as plain text (`protocols.py`)."""
    if cfg.prompt == "lm_eval_gsm8k":
        return protocols.lm_eval_chat_prompt(tokenizer, question, shots, system_prompt)
    if cfg.prompt == "lm_eval_gsm8k_plain":
        return protocols.lm_eval_plain_prompt(question, shots, system_prompt)
    if cfg.prompt == "zero_shot_cot" or not shots:
        return render_prompt(tokenizer, question, system_prompt)
    head = build_messages("", system_prompt)[:-1]
    for ex in shots:
        head += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["answer"]}]
    return tokenizer.apply_chat_template(head + [{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def token_limit(cfg: EvalConfig) -> int:
    """The most tokens a completion may have under `eval.prompt`: lm-eval's 256 for its protocols."""
    protocol = protocols.BY_EVAL_PROMPT.get(cfg.prompt)
    return protocol.max_new_tokens if protocol is not None else cfg.max_new_tokens


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>` in ChatML,
    EOS in Falcon3's template), read from the template itself rather than known by model name."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\x00"}],
                                         tokenize=False)
    after = text[text.rindex("\x00") + 1:].lstrip()
    return next((tok for tok in tokenizer.all_special_tokens if tok and after.startswith(tok)), None)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the template's end-of-turn token: generation stops at either."""
    ids = [tokenizer.eos_token_id]
    turn = end_of_turn(tokenizer)
    if turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(turn))
    return sorted({i for i in ids if i is not None})


class StopAsked(StoppingCriteria):
    """Every row, once a SIGINT/SIGTERM asked the run to stop: generation ends after the current decoding step
    (and `generate` raises `Interrupted`), not after the batch."""

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), STOP.requested, dtype=torch.bool, device=input_ids.device)


class AnswerComplete(StoppingCriteria):
    """Per row: the `#### N` line is complete. Hand-written because the end of an answer line is a
    pattern (a number after `####`, then a newline); fixed stop strings go to `generate(stop_strings=)`."""

    def __init__(self, tokenizer, prompt_len: int, lookback: int = 24):
        self.tokenizer, self.prompt_len, self.lookback = tokenizer, prompt_len, lookback

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.lookback):])
        done = [answer_line_complete(t) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def adds_special_tokens(tokenizer, first_prompt: str, protocol) -> bool:
    """Our own prompts are tokenised as training tokenises them: the chat template already holds every
    special token. lm-eval's protocols follow lm-eval's `tok_batch_encode`: the tokenizer's own special
    tokens (a BOS where it adds one) unless the batch's first prompt already starts with BOS."""
    if protocol is None:
        return False
    bos = tokenizer.bos_token
    return not (bos and first_prompt.startswith(bos))


def stops_and_limit(tokenizer, cfg: EvalConfig) -> tuple[list[str], int]:
    """The stop strings and token limit of `eval.prompt`: lm-eval's own for its protocols (and no early stop at
    the `#### N` line there), else the new-turn markers, `eval.stop_sequences` and `eval.max_new_tokens`."""
    protocol = protocols.BY_EVAL_PROMPT.get(cfg.prompt)
    if protocol is not None:
        return protocols.lm_eval_stop_sequences(protocol, tokenizer.eos_token), protocol.max_new_tokens
    return [*NEW_TURN_TEXT, *cfg.stop_sequences], cfg.max_new_tokens


def settings(tokenizer, cfg: EvalConfig) -> dict:
    """Everything besides the model and the prompts that decides the answers (the baseline cache's key)."""
    stops, max_new = stops_and_limit(tokenizer, cfg)
    return {"stop_sequences": stops, "stop_token_ids": stop_token_ids(tokenizer), "max_new_tokens": max_new,
            "answer_line_stop": cfg.prompt not in protocols.BY_EVAL_PROMPT, "num_samples": cfg.num_samples,
            "temperature": cfg.temperature if cfg.num_samples > 1 else None, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "pad_token_id": tokenizer.pad_token_id}


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], cfg: EvalConfig, desc: str = "Generating") -> list[dict]:
    """For each prompt, `cfg.num_samples` completions with their generated token counts. Sampling starts from
    `eval.seed` each time, so the same settings give the same answers."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batches must end at the same position
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    results: list[dict] = [{} for _ in prompts]
    sampling = cfg.num_samples > 1
    if sampling:
        torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer)
    protocol = protocols.BY_EVAL_PROMPT.get(cfg.prompt)
    stops, max_new = stops_and_limit(tokenizer, cfg)
    for start in tqdm(range(0, len(order), cfg.batch_size), desc=desc, unit="batch"):
        idx = order[start:start + cfg.batch_size]
        texts_in = [prompts[i] for i in idx]
        batch = tokenizer(texts_in, return_tensors="pt", padding=True,
                          add_special_tokens=adds_special_tokens(tokenizer, texts_in[0], protocol)).to(device)
        prompt_len = batch.input_ids.shape[1]
        criteria = [StopAsked()] + ([AnswerComplete(tokenizer, prompt_len)] if protocol is None else [])
        out = model.generate(
            **batch, max_new_tokens=max_new, do_sample=sampling,
            temperature=cfg.temperature if sampling else None, top_p=None, top_k=None,
            num_return_sequences=cfg.num_samples, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids, stop_strings=stops or None, tokenizer=tokenizer,
            stopping_criteria=StoppingCriteriaList(criteria),
        )
        STOP.check()  # a stop asked for during this batch: its answers are cut short, not to be graded
        new = out[:, prompt_len:].view(len(idx), cfg.num_samples, -1)
        for row, i in enumerate(idx):
            texts, counts = [], []
            for seq in new[row]:
                keep = seq[seq != tokenizer.pad_token_id].tolist()
                ends = [k for k, token in enumerate(keep) if token in stop_ids]
                keep = keep[: ends[0] + 1] if ends else keep
                counts.append(len(keep))
                text = tokenizer.decode(keep, skip_special_tokens=True)
                texts.append(protocols.lm_eval_truncate(text, stops) if protocol is not None else text)
            results[i] = {"completions": texts, "generated_tokens": counts}
    tokenizer.padding_side = side
    return results
