"""Answer engines (`eval.engine`): how the requests of `generation.py` become generated token ids.

- `slots`: this package's continuous batching (`batching.py`): a row leaves the batch the step it stops and the
  next question takes its slot; the fastest on a CPU (docs/speed.md).
- `padded`: `model.generate` on batches of `eval.batch_size` prompts sorted by length and left-padded, each decoded
  until its last row stops (rows that stopped are padded meanwhile).
- `static`: the same with transformers' static KV cache, whose decode step transformers compiles on CUDA.
- `paged`: transformers' own continuous batching (`generate_batch`'s manager: a paged KV cache, CUDA graphs on CUDA).
Every engine stops a row by the one rule of `batching.finished` (stop tokens, the row's token limit, the model's
last position, stop strings, a complete `#### N` line), and none is given a prompt that leaves no room in the
model's context (`run`); where a library engine cannot stop on a rule during decoding (stop strings in the paged
manager), its output is cut after the fact at the first token where the rule holds (`batching.cut`), so greedy
rows keep exactly the tokens the slot loop keeps, wherever the numerics agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from gsm8k_lora.config import ENGINES
from gsm8k_lora.evaluation import batching
from gsm8k_lora.evaluation.batching import Request
from gsm8k_lora.stopping import STOP

Progress = Callable[[int], None]


class RowsDone(StoppingCriteria):
    """Per row of a left-padded batch (prompts `width` tokens wide): done by `batching.finished`."""

    def __init__(self, requests: list[Request], width: int, stop_ids: set[int], max_new_tokens: int):
        self.requests, self.width, self.stop_ids, self.max_new_tokens = requests, width, stop_ids, max_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        STOP.check()  # a stop asked for by a signal: within one decoding step
        rows = input_ids[:, self.width:].tolist()
        done = [batching.finished(r, tokens, self.stop_ids, self.max_new_tokens)
                for r, tokens in zip(self.requests, rows, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generation_config(max_new_tokens: int, stop_ids: set[int], pad_id: int, temperature: float | None,
                       **extra) -> GenerationConfig:
    sampling = temperature is not None
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature,
                            top_k=None, top_p=None, eos_token_id=sorted(stop_ids), pad_token_id=pad_id, **extra)


@torch.inference_mode()
def padded(model, requests: list[Request], slots: int, max_new_tokens: int, stop_ids: set[int], pad_id: int,
           temperature: float | None, progress: Progress, cache: str | None = None) -> list[list[int]]:
    """`model.generate` over batches of `slots` requests of similar length, left-padded; `cache`: transformers'
    cache implementation (None: its default dynamic cache)."""
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].ids))
    out: list[list[int]] = [[] for _ in requests]
    for start in range(0, len(order), slots):
        chosen = order[start:start + slots]
        batch = [requests[i] for i in chosen]
        width = max(len(r.ids) for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=device)
        limit = max(batching.budget(r, max_new_tokens) for r in batch)
        config = _generation_config(limit, stop_ids, pad_id, temperature, cache_implementation=cache)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   stopping_criteria=StoppingCriteriaList([RowsDone(batch, width, stop_ids,
                                                                                    max_new_tokens)]))
        for row, i in enumerate(chosen):
            out[i] = batching.cut(requests[i], generated[row, width:].tolist(), stop_ids, max_new_tokens)
        progress(len(chosen))
    return out


@torch.inference_mode()
def paged(model, requests: list[Request], slots: int, max_new_tokens: int, stop_ids: set[int], pad_id: int,
          temperature: float | None, progress: Progress) -> list[list[int]]:
    """transformers' continuous batching manager, at most `slots` requests a batch, each with its own token limit;
    its outputs cut by `batching.cut` (the manager stops on token ids only)."""
    from transformers import ContinuousBatchingConfig

    config = _generation_config(max_new_tokens, stop_ids, pad_id, temperature)
    batching_config = ContinuousBatchingConfig(max_requests_per_batch=slots)
    attention = model.config._attn_implementation  # the manager switches the model to its paged attention
    out: list[list[int] | None] = [None] * len(requests)
    try:
        with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=5,
                                                       continuous_batching_config=batching_config) as manager:
            for i, r in enumerate(requests):
                manager.add_request(r.ids, request_id=str(i), max_new_tokens=batching.budget(r, max_new_tokens))
            waiting = len(requests)
            while waiting:
                STOP.check()
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' continuous batching stopped before answering every request")
                    continue
                if not result.is_finished():
                    continue
                if result.error:
                    raise RuntimeError(f"transformers' continuous batching failed a request: {result.error}")
                i = int(result.request_id)
                out[i] = batching.cut(requests[i], list(result.generated_tokens), stop_ids, max_new_tokens)
                waiting -= 1
                progress(1)
    finally:
        model.config._attn_implementation = attention
    return out  # type: ignore[return-value]


def run(engine: str, model, requests: list[Request], slots: int, max_new_tokens: int, stop_ids: set[int],
        pad_id: int, temperature: float | None, progress: Progress) -> list[list[int]]:
    """Each request's generated token ids (the stop token included, as `model.generate` keeps it); none for a
    request whose prompt leaves no room in the model's context (`Request.room`), which no engine is given."""
    if engine not in ENGINES:
        raise ValueError(f"eval.engine={engine!r} is invalid: allowed: {', '.join(ENGINES)}")
    fits = [i for i, r in enumerate(requests) if r.room is None or r.room > 0]
    out: list[list[int]] = [[] for _ in requests]
    progress(len(requests) - len(fits))
    if fits:
        answered = _run(engine, model, [requests[i] for i in fits], slots, max_new_tokens, stop_ids, pad_id,
                        temperature, progress)
        for i, tokens in zip(fits, answered, strict=True):
            out[i] = tokens
    return out


def _run(engine: str, model, requests: list[Request], slots: int, max_new_tokens: int, stop_ids: set[int],
         pad_id: int, temperature: float | None, progress: Progress) -> list[list[int]]:
    if engine == "slots":
        return batching.run(model, requests, slots, max_new_tokens, stop_ids, temperature, progress)[0]
    if engine == "paged":
        return paged(model, requests, slots, max_new_tokens, stop_ids, pad_id, temperature, progress)
    cache = "static" if engine == "static" else None
    return padded(model, requests, slots, max_new_tokens, stop_ids, pad_id, temperature, progress, cache)
