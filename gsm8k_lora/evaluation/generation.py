"""Prompts and generation for evaluation.

Prompts are built with the model's chat template, exactly as in training (`data/formatting.py`), or as
lm-evaluation-harness builds them (`protocols.py`). Answers are generated with continuous batching
(`batching.py`); each row stops at EOS or the template's end-of-turn token (token ids), once it has written a
stop string (the new-turn markers of `data/gsm8k.py` and `eval.stop_sequences`, or lm-eval's stops), or
(outside lm-eval's protocols) as soon as its `#### N` line is complete, so no row burns the whole
`max_new_tokens` once it has answered. `model.generate`'s padded batches, what this package used before, stay
in the benchmark as the baseline it is measured against (`benchmarks/generation.py`).
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import deepcopy

import torch
from tqdm.auto import tqdm

from gsm8k_lora.config import EvalConfig
from gsm8k_lora.data.gsm8k import NEW_TURN_TEXT, answer_line_complete
from gsm8k_lora.evaluation import batching, protocols
from gsm8k_lora.preflight import cpu_has_bf16

ANSWER_LOOKBACK = 24  # generated tokens read for a complete `#### N` line: the line and the newline after it fit


def build_prompt(tokenizer, question: str, cfg: EvalConfig, shots: list[dict], system_prompt: str | None) -> str:
    """The prompt of one question under `eval.prompt` (`protocols.py`)."""
    return protocols.get(cfg.prompt).prompt(tokenizer, question, shots, system_prompt)


def token_limit(cfg: EvalConfig) -> int:
    """The most tokens a completion may have under `eval.prompt`: lm-eval's 256 for its protocols."""
    return protocols.get(cfg.prompt).token_limit(cfg.max_new_tokens)


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


def adds_special_tokens(tokenizer, first_prompt: str, protocol: protocols.Protocol) -> bool:
    """Our own prompts are tokenised as training tokenises them: the chat template already holds every
    special token. lm-eval's protocols follow lm-eval's `tok_batch_encode`: the tokenizer's own special
    tokens (a BOS where it adds one) unless the batch's first prompt already starts with BOS."""
    if not protocol.adds_special_tokens:
        return False
    bos = tokenizer.bos_token
    return not (bos and first_prompt.startswith(bos))


def stops_and_limit(tokenizer, cfg: EvalConfig) -> tuple[list[str], int]:
    """The stop strings and token limit of `eval.prompt`: lm-eval's own for its protocols (and no early stop at
    the `#### N` line there), else the new-turn markers, `eval.stop_sequences` and `eval.max_new_tokens`."""
    protocol = protocols.get(cfg.prompt)
    return protocol.stops(tokenizer.eos_token, [*NEW_TURN_TEXT, *cfg.stop_sequences]), token_limit(cfg)


def settings(model, tokenizer, cfg: EvalConfig) -> dict:
    """Everything besides the model and the prompts that decides the answers (the baseline cache's key)."""
    stops, max_new = stops_and_limit(tokenizer, cfg)
    return {"dtype": str(generation_dtype(model, cfg)).removeprefix("torch."), "stop_sequences": stops,
            "stop_token_ids": stop_token_ids(tokenizer), "max_new_tokens": max_new,
            "answer_line_stop": protocols.get(cfg.prompt).stops_at_answer_line, "num_samples": cfg.num_samples,
            "temperature": cfg.temperature if cfg.num_samples > 1 else None, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "pad_token_id": tokenizer.pad_token_id}


def stop_window(tokenizer, stops: list[str]) -> int:
    """Tokens of a sequence's tail that can hold any stop string, with room for one split across tokens."""
    return max((len(tokenizer(s, add_special_tokens=False).input_ids) for s in stops if s), default=0) + 2


def requests(tokenizer, prompts: list[str], cfg: EvalConfig) -> list[batching.Request]:
    """One request a prompt and sample, tokenised as `generate` tokenises it, each with the stops of `eval.prompt`."""
    protocol = protocols.get(cfg.prompt)
    stops, _ = stops_and_limit(tokenizer, cfg)
    window = stop_window(tokenizer, stops)

    endings = {stop[-1] for stop in stops if stop}

    def stopped(prompt: list[int], tokens: list[int]) -> bool:
        # A stop string written (the sequence's tail, as transformers' StopStringCriteria reads it), or (outside
        # lm-eval's protocols) a complete `#### N` line among the generated tokens. Read only when the newest token
        # could end one: a stop string's last character, or the newline that ends an answer line.
        newest = tokenizer.decode(tokens[-1:])
        if any(c in newest for c in endings) and any(
                stop in tokenizer.decode((prompt + tokens)[-window:]) for stop in stops if stop):
            return True
        return protocol.stops_at_answer_line and "\n" in newest and answer_line_complete(
            tokenizer.decode(tokens[-ANSWER_LOOKBACK:]))

    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=adds_special_tokens(tokenizer, prompt, protocol)).input_ids
        out += [batching.Request(ids, stopped) for _ in range(cfg.num_samples)]
    return out


def completion(tokenizer, tokens: list[int], cfg: EvalConfig) -> str:
    """The text of generated tokens, as graded: special tokens dropped; under lm-eval's protocols, cut at its stops."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return protocols.get(cfg.prompt).graded_text(text, stops_and_limit(tokenizer, cfg)[0])


def generation_dtype(model, cfg: EvalConfig) -> torch.dtype:
    """The dtype answers are generated in (`eval.dtype`). `auto`: bfloat16 for a float32 model on a CPU with bf16
    instructions (AVX512-BF16 or AMX: there bf16 matmuls run 2-3x float32, `make bench`), else the model's own."""
    own = next(model.parameters()).dtype
    if cfg.dtype == "model" or getattr(model, "is_loaded_in_4bit", False):
        return own
    if cfg.dtype == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        return torch.bfloat16 if own == torch.float32 and on_cpu and cpu_has_bf16() else own
    return getattr(torch, cfg.dtype)


@contextmanager
def in_dtype(model, dtype: torch.dtype):
    """The model, or where `dtype` is not its own a copy of it in `dtype` (the adapter's state included): the
    trained model itself stays as it is for what follows (merging, saving, training on)."""
    if next(model.parameters()).dtype == dtype:
        yield model
        return
    copy = deepcopy(model).to(dtype)
    # A forward set on an instance comes with the copy but still calls the original: TRL's fused LM head
    # (`add_fused_lm_head`, applied by SFTTrainer) closes over the model's own bound forward, so the copy would
    # answer with the original float32 weights. Generation needs the class's forward, so each module gets it back.
    for module in copy.modules():
        module.__dict__.pop("forward", None)
    try:
        yield copy
    finally:
        del copy


def generate(model, tokenizer, prompts: list[str], cfg: EvalConfig, desc: str = "Generating") -> list[dict]:
    """For each prompt, `cfg.num_samples` completions with their generated token counts, `eval.batch_size` rows in
    flight at once (`batching.py`), in `eval.dtype`. Sampling starts from `eval.seed` each time, so the same
    settings give the same answers."""
    with in_dtype(model, generation_dtype(model, cfg)) as chosen:
        return _generate(chosen, tokenizer, prompts, cfg, desc)


def _generate(model, tokenizer, prompts: list[str], cfg: EvalConfig, desc: str) -> list[dict]:
    model.eval()
    sampling = cfg.num_samples > 1
    if sampling:
        torch.manual_seed(cfg.seed)
    _, max_new = stops_and_limit(tokenizer, cfg)
    attention = model.config._attn_implementation
    if attention == "flash_attention_2":  # it takes no attention mask: the slots' masks need SDPA
        model.config._attn_implementation = "sdpa"
    try:
        with tqdm(total=len(prompts) * cfg.num_samples, desc=desc, unit="answer") as bar:
            tokens, _ = batching.run(model, requests(tokenizer, prompts, cfg), cfg.batch_size, max_new,
                                     set(stop_token_ids(tokenizer)), cfg.temperature if sampling else None, bar.update)
    finally:
        model.config._attn_implementation = attention
    k = cfg.num_samples
    return [{"completions": [completion(tokenizer, t, cfg) for t in tokens[i * k:(i + 1) * k]],
             "generated_tokens": [len(t) for t in tokens[i * k:(i + 1) * k]]} for i in range(len(prompts))]
