"""Prompts and batched generation for evaluation.

Prompts are built with the model's chat template, exactly as in training (`data.render_prompt`).
Generation is batched with left padding and the KV cache (`model.generate`); each row stops at
EOS, at a stop sequence, or as soon as its `#### N` line is complete, so no row burns the whole
`max_new_tokens` once it has answered.
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from gsm8k_lora.config import EvalConfig

_DONE_RE = re.compile(r"####\s*\$?\s*-?[\d,]*\.?\d+\s*\n")


def fewshot_messages(examples: list[dict], style: str) -> list[dict]:
    """k worked examples as earlier chat turns. `lm_eval_gsm8k` mirrors lm-evaluation-harness's
    `gsm8k` task under --apply_chat_template --fewshot_as_multiturn."""
    messages = []
    for ex in examples:
        question = f"Question: {ex['question']}\nAnswer:" if style == "lm_eval_gsm8k" else ex["question"]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ex["answer"]}]
    return messages


def build_prompt(tokenizer, question: str, cfg: EvalConfig, shots: list[dict], system_prompt: str | None) -> str:
    from gsm8k_lora.data import build_messages, render_prompt

    if cfg.prompt == "zero_shot_cot" or not shots:
        return render_prompt(tokenizer, question, system_prompt)
    head = build_messages("", system_prompt)[:-1] + fewshot_messages(shots, cfg.prompt)
    text = f"Question: {question}\nAnswer:" if cfg.prompt == "lm_eval_gsm8k" else question
    return tokenizer.apply_chat_template(head + [{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


class AnswerComplete(StoppingCriteria):
    """Per row: a stop sequence was written, or the `#### N` line is complete.

    Hand-written because transformers' StopStringCriteria matches fixed strings only, and the end of
    an answer line is a pattern (a number after `####`, then a newline).
    """

    def __init__(self, tokenizer, prompt_len: int, stops: list[str], lookback: int = 24):
        self.tokenizer, self.prompt_len, self.stops, self.lookback = tokenizer, prompt_len, stops, lookback

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.lookback):])
        done = [bool(_DONE_RE.search(t)) or any(s in t for s in self.stops) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], cfg: EvalConfig, desc: str = "Generating") -> list[dict]:
    """For each prompt, `cfg.num_samples` completions with their generated token counts."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batches must end at the same position
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    results: list[dict] = [{} for _ in prompts]
    sampling = cfg.num_samples > 1
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), cfg.batch_size), desc=desc, unit="batch"):
        idx = order[start:start + cfg.batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        prompt_len = batch.input_ids.shape[1]
        out = model.generate(
            **batch, max_new_tokens=cfg.max_new_tokens, do_sample=sampling,
            temperature=cfg.temperature if sampling else None, top_p=None, top_k=None,
            num_return_sequences=cfg.num_samples, use_cache=True, pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([AnswerComplete(tokenizer, prompt_len, list(cfg.stop_sequences))]),
        )
        new = out[:, prompt_len:].view(len(idx), cfg.num_samples, -1)
        for row, i in enumerate(idx):
            texts, counts = [], []
            for seq in new[row]:
                keep = seq[seq != tokenizer.pad_token_id]
                if tokenizer.eos_token_id in keep.tolist():
                    keep = keep[: keep.tolist().index(tokenizer.eos_token_id) + 1]
                counts.append(int(keep.numel()))
                texts.append(tokenizer.decode(keep, skip_special_tokens=True))
            results[i] = {"completions": texts, "generated_tokens": counts}
    tokenizer.padding_side = side
    return results
