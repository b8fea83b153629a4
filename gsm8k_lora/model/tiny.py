"""A tiny Llama-architecture model with its own BPE tokenizer and Falcon3-style chat template.

Built from a seed on first use and cached as an ordinary Hugging Face model directory, so the same
`from_pretrained` code that loads Falcon3 loads it. Falcon3 is a `LlamaForCausalLM`, so this
exercises the same modelling, PEFT and TRL code paths on a CPU.

Like a real base model it is pretrained (briefly, on raw text: generated word problems and their
worked steps, never the chat template and never a `#### N` line). So before fine-tuning it writes
plausible reasoning but no final-answer line; fine-tuning has something measurable to teach.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gsm8k_lora.data import synthetic
from gsm8k_lora.data.gsm8k import parse_answer
from gsm8k_lora.model import cache

BUILD_VERSION = 3  # bump when anything below changes, so old caches are not reused
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Falcon3's turn format: `<|role|>\n{content}\n`, generation prompt `<|assistant|>\n`, EOS after the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Every projection width is a multiple of 64, as in real models: bitsandbytes' CPU 4-bit kernels need
# multiples of 32, so the QLoRA path runs on this model too.
ARCH = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False)
VOCAB_SIZE = 2048
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 120, 16, 3e-3


def _train_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    # Byte-level BPE, as Falcon3 and Llama 3 use; trained on generated GSM8K-format text only.
    corpus = [f"{r['question']}\n{r['answer']}" for r in synthetic.generate(3000, seed=10_000 + seed)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=ARCH["max_position_embeddings"])


def _pretrain(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    # A plain loop rather than a Trainer: this builds a test fixture in ~30 s, with no run directory,
    # logging or checkpoints to manage.
    rows = synthetic.generate(PRETRAIN_STEPS * PRETRAIN_BATCH, seed=20_000 + seed)
    texts = [row["question"] + "\n" + parse_answer(row["answer"]).solution + tokenizer.eos_token for row in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / PRETRAIN_STEPS))
    model.train()
    for step in tqdm(range(PRETRAIN_STEPS), desc="Pretraining the tiny model (once)"):
        batch = tokenizer(texts[step * PRETRAIN_BATCH:(step + 1) * PRETRAIN_BATCH], return_tensors="pt",
                          padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()


def build(out_dir: Path, seed: int, pretrain: bool = True) -> Path:
    """Write the tokenizer and the (seeded, briefly pretrained) model to `out_dir`."""
    tokenizer = _train_tokenizer(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **ARCH)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain:
        _pretrain(model, tokenizer, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "gsm8k_lora_build.json").write_text(json.dumps({"version": BUILD_VERSION, "seed": seed}))
    return out_dir


def ensure(seed: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached model directory for `seed`, built first if missing. Safe against concurrent builds."""
    target = cache.root(cache_dir) / f"tiny-llama-v{BUILD_VERSION}-seed{seed}"
    if (target / "gsm8k_lora_build.json").exists():
        return target
    return cache.build_once(target, "gsm8k_lora_build.json", lambda staging: build(staging, seed))
