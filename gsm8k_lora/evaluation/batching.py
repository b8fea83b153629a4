"""Answers generated with continuous batching: a row leaves the batch the step it stops, the next question takes
its slot, and no row is padded to another's length.

`model.generate` pads a batch to its longest prompt and decodes every row until the last one stops, so a batch
in which one answer loops to the token limit computes that limit for every row; its KV cache is grown by
concatenation at every step. Here each slot of a fixed cache holds one row's keys and values: a prompt is
prefilled alone into a free slot, each decoding step runs one token for every live row, written in place at that
row's position, and a row that stops hands its slot to the last live row, so the live rows stay the first rows
of the cache (a view, not a copy, for attention). Attention masks the positions past each row's length.

Written here because the libraries' own do not fit this package's stops or this hardware, measured (docs/results.md;
the libraries' own are the other answer engines, `engines.py`): transformers' continuous batching (`generate_batch`,
a paged cache) ran at 48-72 tokens/s on the 2-core CPU against 102 for padded `model.generate` and 140 for this
loop, and it stops on token ids only; a static cache computes the whole cache length at every step. Rows stop by
`finished`: at a stop token id, once a stop string has been written (the sequence's tail is decoded), once a
`#### N` line is complete (outside lm-eval's protocols), at the row's token limit, or at the model's last position;
greedy rows decode exactly as `model.generate` decodes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from gsm8k_lora.stopping import STOP


class _SlotLayer:
    """One layer's keys and values: [slots, heads, capacity, head_dim], allocated at the first write."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: SlotCache):
        self.cache = cache
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        if self.keys is None:
            shape = (c.slots, keys.shape[1], c.capacity, keys.shape[3])
            self.keys = torch.zeros(shape, dtype=keys.dtype, device=keys.device)
            self.values = torch.zeros(shape, dtype=values.dtype, device=values.device)
        if c.prefill_slot is not None:  # one prompt, into its slot
            slot, length = c.prefill_slot, keys.shape[2]
            self.keys[slot, :, :length] = keys[0]
            self.values[slot, :, :length] = values[0]
            return self.keys[slot:slot + 1, :, :length], self.values[slot:slot + 1, :, :length]
        self.keys[c.rows, :, c.positions] = keys[:, :, 0]  # one token a live row, at its own position
        self.values[c.rows, :, c.positions] = values[:, :, 0]
        live = c.rows.shape[0]
        return self.keys[:live, :, :c.span], self.values[:live, :, :c.span]

    def get_seq_length(self) -> int:
        return 0  # positions and masks are given to the model explicitly

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.span, 0


class SlotCache(Cache):
    """A transformers `Cache` of fixed slots, one a row in flight (see the module's docstring)."""

    def __init__(self, num_layers: int, slots: int, capacity: int):
        self.slots, self.capacity = slots, capacity
        self.layers = [_SlotLayer(self) for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.offloading = False
        self.prefill_slot: int | None = None
        self.rows = self.positions = None
        self.span = 0

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return self.span, 0  # the keys attention sees: a prompt's own, or the live rows' first `span` positions

    def move(self, source: int, target: int, length: int) -> None:
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys[target, :, :length] = layer.keys[source, :, :length]
                layer.values[target, :, :length] = layer.values[source, :, :length]


@dataclass
class Row:
    request: int  # which prompt (and sample) this row answers
    length: int  # tokens in its slot: the prompt and what it generated
    tokens: list[int] = field(default_factory=list)  # generated, the last one not yet in the cache


@dataclass
class Request:
    ids: list[int]  # the prompt's token ids, as fed (`protocols.Protocol.fit`)
    stops: Callable[[list[int], list[int]], bool]  # (prompt ids, generated ids) -> done (besides ids and limit)
    limit: int | None = None  # its own token limit, under the engine's (the bench stops random weights here)
    room: int | None = None  # tokens left before the model's last position (<= 0: none; `engines.run` skips it)
    cut: int = 0  # tokens cut from the prompt's start (lm-eval's protocols), for the record


def budget(request: Request, max_new_tokens: int) -> int:
    """The most tokens a row may generate: the engine's limit, its own, and the room its context leaves, so no
    token is generated past the model's last position."""
    return min(n for n in (max_new_tokens, request.limit, request.room) if n is not None)


def finished(request: Request, tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> bool:
    """Whether a row is done with `tokens` generated: at a stop token, at its budget (`budget`), or once its stop
    condition holds. The one rule every answer engine stops rows by (`engines.py` cuts their output with it)."""
    if tokens[-1] in stop_ids or len(tokens) >= budget(request, max_new_tokens):
        return True
    return request.stops(request.ids, tokens)


def at_context_end(request: Request, tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> bool:
    """Whether a row stopped only because the model's context ended: it ran to the room the context left, before
    every token limit, and neither a stop token nor its stop condition ended it there."""
    limits = [n for n in (max_new_tokens, request.limit) if n is not None]
    return (request.room is not None and 0 < len(tokens) == request.room < min(limits)
            and tokens[-1] not in stop_ids and not request.stops(request.ids, tokens))


def cut(request: Request, tokens: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """`tokens` up to and including the first at which the row is done (`finished`): what the slot loop keeps."""
    for n in range(1, len(tokens) + 1):
        if finished(request, tokens[:n], stop_ids, max_new_tokens):
            return tokens[:n]
    return tokens


def cache_keyword(model) -> str:
    """The forward's name for the cache: transformers 5.2x renames `past_key_values` to `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _pick(logits: torch.Tensor, temperature: float | None) -> list[int]:
    if temperature is None:
        return logits.argmax(-1).tolist()
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probabilities, 1)[:, 0].tolist()


@torch.inference_mode()
def run(model, requests: list[Request], slots: int, max_new_tokens: int, stop_ids: set[int],
        temperature: float | None = None, progress: Callable[[int], None] | None = None) -> tuple[list[list[int]], int]:
    """Each request's generated token ids (the stop token included, as `model.generate` keeps it), and the tokens
    computed (prefill aside): every live row computes one token a step, and a row stops the step it is done."""
    device = next(model.parameters()).device
    cache_argument = cache_keyword(model)
    capacity = max(len(r.ids) for r in requests) + max_new_tokens + 1
    cache = SlotCache(model.config.num_hidden_layers, min(slots, len(requests)), capacity)
    waiting, live, results, computed = list(range(len(requests))), [], [None] * len(requests), 0

    def done(row: Row) -> bool:
        return finished(requests[row.request], row.tokens, stop_ids, max_new_tokens)

    def finish(row: Row) -> None:
        results[row.request] = row.tokens
        if progress is not None:
            progress(1)

    def admit() -> None:  # prefill waiting prompts, one at a time, into the free slots
        while waiting and len(live) < cache.slots:
            index = waiting.pop(0)
            ids = torch.tensor([requests[index].ids], device=device)
            n = ids.shape[1]
            cache.prefill_slot, cache.span = len(live), n  # its own tokens only: plain causal attention
            logits = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=True,
                           logits_to_keep=1, **{cache_argument: cache}).logits
            row = Row(index, n, _pick(logits[:, -1], temperature))
            # Its first token is judged here, before any step: a row whose first token stops it never decodes
            # another, wherever it entered the queue (its slot is the next prompt's).
            if done(row):
                finish(row)
            else:
                live.append(row)

    admit()
    while live:
        STOP.check()  # a stop asked for by a signal: within one decoding step
        positions = torch.tensor([row.length for row in live], device=device)
        cache.prefill_slot, cache.rows, cache.positions = None, torch.arange(len(live), device=device), positions
        cache.span = int(positions.max()) + 1
        mask = (torch.arange(cache.span, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        inputs = torch.tensor([[row.tokens[-1]] for row in live], device=device)
        logits = model(input_ids=inputs, position_ids=positions[:, None], attention_mask=mask, use_cache=True,
                       **{cache_argument: cache}).logits
        computed += len(live)
        for row, token in zip(live, _pick(logits[:, -1], temperature), strict=True):
            row.length += 1
            row.tokens.append(token)
        for i in reversed(range(len(live))):  # rows that are done leave; the last live row takes the slot
            if done(live[i]):
                finish(live[i])
                last = live.pop()
                if i < len(live):
                    cache.move(len(live), i, last.length)
                    live[i] = last
        admit()
    return results, computed
