"""Padding-free and packed batches compute the same loss as padded ones, and no example attends to another."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tests.conftest import load_tiny


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir):
    from gsm8k_lora.data.formatting import render_prompt
    from gsm8k_lora.data.synthetic import generate

    # As a run loads it (sdpa, and no KV cache: with one, transformers skips the packed-sequence mask it derives
    # from position ids, and packed examples would attend to each other)
    model, tok = load_tiny()
    model.eval()
    examples = []
    for row in generate(5, seed=11):  # different lengths
        prompt = tok(render_prompt(tok, row["question"], None))["input_ids"]
        full = tok(render_prompt(tok, row["question"], None) + row["answer"] + tok.eos_token)["input_ids"]
        examples.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]})
    assert len({len(e["input_ids"]) for e in examples}) > 1
    return model, tok, examples


def loss_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).loss


def test_padding_free_loss_equals_padded_loss(model_and_examples):
    model, tok, examples = model_and_examples
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    assert flat["input_ids"].numel() == sum(len(e["input_ids"]) for e in examples)  # no pad token computed
    assert padded["input_ids"].numel() > flat["input_ids"].numel()
    assert torch.allclose(loss_of(model, padded), loss_of(model, flat), atol=1e-5)


def test_bfd_packing_loss_equals_padded_loss(model_and_examples):
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    model, tok, examples = model_and_examples
    packed = pack_dataset(Dataset.from_list(examples), seq_length=4096, strategy="bfd").to_list()
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == len(examples)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(packed)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    assert torch.allclose(loss_of(model, padded), loss_of(model, batch), atol=1e-5)


def test_no_example_attends_to_another_in_a_padding_free_batch(model_and_examples):
    model, tok, examples = model_and_examples
    first, second = examples[0], examples[1]
    changed = {**first, "input_ids": [(t + 7) % len(tok) for t in first["input_ids"]]}
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    a, b = collate([first, second]), collate([changed, second])
    n = len(first["input_ids"])
    with torch.no_grad():
        logits_a = model(input_ids=a["input_ids"], position_ids=a["position_ids"]).logits[0, n:]
        logits_b = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0, n:]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    assert torch.allclose(logits_a, logits_b, atol=1e-5)  # the second example never saw the first
    assert torch.allclose(logits_a, alone, atol=1e-4)  # and reads exactly as it does alone


@pytest.mark.slow
def test_flex_attention_keeps_padding_free_examples_apart(model_and_examples, tiny_model_dir):
    """`model.attn_implementation=flex_attention` turns a padding-free batch's position ids into a block mask: the
    loss is the padded batch's under sdpa (flex compiles its kernel on first use: tens of seconds on a CPU)."""
    sdpa, tok, examples = model_and_examples
    flex, _ = load_tiny(attn_implementation="flex_attention")
    flex.eval()
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert torch.allclose(loss_of(flex, flat), loss_of(sdpa, padded), atol=1e-5)
