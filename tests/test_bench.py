"""`make bench`: its figures are counted, not assumed. The Falcon3-shaped benchmark's code also runs on the
CPU with a scaled-down shape: the same building, loading (bf16 and 4-bit), training variants, FLOPs
accounting and generation a CUDA machine runs at full size; those figures are only checked to be there and sane."""

import copy
import json

import pytest
import torch

from gsm8k_lora.bench import unmeasured
from gsm8k_lora.benchmarks.falcon3 import (
    FALCON3_1B,
    LEVERS,
    NOT_REACHED,
    PLAN,
    bench_falcon3,
    matmul_param_count,
    param_count,
)
from gsm8k_lora.benchmarks.training import device_config
from tests.conftest import compose, load_tiny, run_cli

SMALL = {**FALCON3_1B, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 1024}


def test_falcon3_config_counts_the_published_parameters():
    assert param_count(FALCON3_1B) == pytest.approx(1.67e9, rel=0.01)  # with the untied 131k-vocab head


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_counts_the_parameters_that_do_matmuls(tied):
    arch = {**FALCON3_1B, "tie_word_embeddings": tied}
    h, q, kv, ffn, vocab = 2048, 8 * 256, 4 * 256, 8192, 131072
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * ffn  # q, k, v, o; gate, up, down
    # the LM head's matmul counts once, tied or not; the input embedding is a lookup and does not count
    assert matmul_param_count(arch) == 18 * per_layer + vocab * h == 1_400_897_536
    embedding_and_norms = vocab * h + (2 * 18 + 1) * h
    assert param_count(arch) == matmul_param_count(arch) + embedding_and_norms - (vocab * h if tied else 0)


@pytest.fixture
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


ANSWER = "Tom has 2+3=<<2+3=5>>5 apples.\n#### 5"


@pytest.mark.parametrize("completion, ended, through, plus", [
    (ANSWER + "\nThen more text that was not needed", True, ANSWER, 1),  # ended (EOS/stop) after more text
    (ANSWER + "\n", True, ANSWER, 1),                                     # stopped by the finished answer line
    (ANSWER + "\nThen more", False, ANSWER, 0),                           # cut off after the answer
    (ANSWER, True, ANSWER, 1),                                            # EOS right after the number
    ("He has 1,000 apples.\n#### 1,000 apples", False, "He has 1,000 apples.\n#### 1,000", 0),
])
def test_needed_tokens_run_through_the_answer_number(tokenizer, completion, ended, through, plus):
    from gsm8k_lora.benchmarks.generation import needed_tokens

    assert needed_tokens(tokenizer, completion, ended) == count(tokenizer, through) + plus


@pytest.mark.parametrize("completion, ended", [
    ("no final line", True),   # the base tiny model: no answer, so nothing it needed
    ("no final line", False),
    (ANSWER, False),           # cut off right after a number: it may have gone on (5 -> 50)
    ("so\n####", True),        # a marker without a number
])
def test_needed_tokens_are_unmeasured_without_a_complete_answer(tokenizer, completion, ended):
    from gsm8k_lora.benchmarks.generation import needed_tokens

    assert needed_tokens(tokenizer, completion, ended) is None


def test_generated_over_needed_is_measured_on_the_answered_rows_only(tokenizer):
    from gsm8k_lora.benchmarks.generation import answer_token_figures

    max_new = 64
    answered = {"completions": [ANSWER + "\nand then some"], "generated_tokens": [30]}  # ended before the limit
    cut_off = {"completions": ["1+1=2 and 2+2=4 and"], "generated_tokens": [max_new]}
    rambling = {"completions": ["no answer at all"], "generated_tokens": [12]}
    needed = count(tokenizer, ANSWER) + 1
    figures = answer_token_figures(tokenizer, [answered, cut_off, rambling], max_new)
    assert figures == {"eval_needed_measured_rows": 1, "eval_needed_tokens_per_question": needed,
                       "eval_generated_over_needed_x": 30 / needed}
    assert answer_token_figures(tokenizer, [cut_off, rambling], max_new) == {
        "eval_needed_measured_rows": 0, "eval_needed_tokens_per_question": None, "eval_generated_over_needed_x": None}


def test_padding_efficiency_is_counted_from_the_collated_batches():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from gsm8k_lora.benchmarks.training import epoch_padding_efficiency

    lengths = [3, 5, 2, 7]  # one batch of four: 17 real tokens
    assert epoch_padding_efficiency(lengths, 4, "random", padding_free=False) == 17 / (4 * 7)  # padded to 7
    assert epoch_padding_efficiency(lengths, 4, "random", padding_free=True) == 1.0  # one flat sequence of 17
    # what the collator produced is what counts: padding-free padded to a multiple of 8 computes 24 positions
    padded_flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)
    assert epoch_padding_efficiency(lengths, 4, "random", padding_free=True, collate=padded_flat) == 17 / 24


def test_length_grouping_pads_less_than_random_batches():
    from gsm8k_lora.benchmarks.training import epoch_padding_efficiency

    lengths = [10, 200, 12, 190, 11, 205, 9, 198] * 50
    grouped = epoch_padding_efficiency(lengths, 4, "group_by_length", padding_free=False)
    shuffled = epoch_padding_efficiency(lengths, 4, "random", padding_free=False)
    assert 0 < shuffled < grouped < 1


@pytest.mark.slow
def test_bench_quick_mode_writes_its_figures(tmp_path, tiny_model_dir):
    proc = run_cli("bench", "--quick", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = tmp_path.glob("*.json")
    figures = json.loads(result.read_text())
    for key in ("eval_batched_speedup_x", "eval_speedup_over_padded_x", "eval_tokens_per_s", "train_speedup_x",
                "train_padding_efficiency_default", "train_padding_efficiency_trl_defaults"):
        assert figures[key] > 0
    # continuous batching computes no token it does not keep; the padded batches do (counted at the LM head)
    assert figures["eval_computed_over_kept_x"] == 1.0 < figures["eval_computed_over_kept_x_padded"]
    # the base tiny model never writes `#### N`: the token ratio is unmeasured, and says so
    assert figures["eval_needed_measured_rows"] == 0 and figures["eval_generated_over_needed_x"] is None
    assert "n/a: the model wrote no #### answer" in proc.stdout
    # the CPU preset is padding-free: no padding in the epoch's batches, nor in the trained ones
    assert figures["train_padding_efficiency_default"] == figures["train_padding_efficiency_measured_default"] == 1.0
    assert figures["train_padding_efficiency_trl_defaults"] < 1.0
    assert {v["variant"] for v in figures["train_variants"]} == {"trl_defaults", "package_default"}
    assert "eval_batched_speedup_x" in proc.stdout


@pytest.mark.slow
def test_falcon3_shaped_benchmark_code_runs_on_a_small_shape(tiny_model_dir):
    """The GPU bench's code at a small shape on the CPU preset: two levers, TRL's defaults and QLoRA trained, and
    every answer engine, each of which must answer as padded `generate` does (float32 here)."""
    pytest.importorskip("bitsandbytes")
    levers = {"package_default": [], "quiet_steps": ["trainer.step_metrics=false"]}
    snapshots = []  # what the bench hands on after each measurement: what its JSON holds if stopped there
    out = bench_falcon3(tiny_model_dir, steps=2, quick=True, arch=SMALL, preset=("trainer=cpu_smoke",),
                        training=True, prompts=8, levers=levers, progress=lambda f: snapshots.append(copy.deepcopy(f)))
    first, after_one = snapshots[0], snapshots[1]
    assert first["falcon3_package_default"]["skipped"] == first["gen_padded_skipped"] == NOT_REACHED
    assert after_one["falcon3_package_default"]["real_tokens"] > 0
    assert f"falcon3_quiet_steps: not run: {NOT_REACHED}" in unmeasured(after_one)
    assert len(snapshots) >= 8 and snapshots[-1] == out
    assert out["falcon3_params"] == param_count(SMALL) and out["falcon3_matmul_params"] == matmul_param_count(SMALL)
    assert 0 < out["qlora_weights_gib_4bit"] < out["qlora_weights_gib_bf16"]
    for name in ("falcon3_trl_defaults", "falcon3_package_default", "falcon3_quiet_steps", "falcon3_qlora"):
        figures = out[name]
        assert figures["steps"] == 2 and figures["timed_steps"] == 1 and figures["model_tflops"] > 0, figures
        tflops = 4 * matmul_param_count(SMALL) * figures["real_tokens_per_s"] / 1e12
        assert figures["model_tflops"] == pytest.approx(tflops)
        timed_tokens = figures["real_tokens_per_s"] * figures["seconds"]  # the warm-up step's tokens are left out
        assert 0 < timed_tokens < figures["real_tokens"]
    # the quiet trainer trains on the same tokens as TRL's own
    assert out["falcon3_quiet_steps"]["real_tokens"] == out["falcon3_package_default"]["real_tokens"]
    assert out["gen_questions"] == 8 and out["gen_padded_tokens"] > 0
    assert out["gen_paged_skipped"].startswith("eval.engine=paged needs a CUDA GPU")  # measured on a GPU only
    for engine in ("slots", "static", "slots_merged"):
        assert out[f"gen_{engine}_same_answers_as_padded"] == 8, engine
        assert out[f"gen_{engine}_tokens"] == out["gen_padded_tokens"]  # each row stopped at its reference length
    assert unmeasured(out) == []


def test_the_gpu_bench_plans_every_lever_and_engine_the_4bit_copy_last():
    from gsm8k_lora.config import ENGINES

    planned = {(kind, name) for kind, name in PLAN}
    assert {("train", lever) for lever in LEVERS} <= planned and {("answer", e) for e in ENGINES} <= planned
    assert PLAN[0] == ("train", "package_default") and PLAN[-2:] == (("train", "qlora"), ("memory", "qlora"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs --gpu-check")
def test_the_gpu_check_bench_refuses_a_machine_without_cuda_in_one_line(tmp_path):
    proc = run_cli("bench", "--gpu-check", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: --gpu-check measures the CUDA levers")


def test_real_bench_counts_matmul_parameters_once_and_leaves_the_embedding_lookup_out():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gsm8k_lora.benchmarks.real import flops_per_token, matmul_params

    shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2)
    untied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    # per layer q, k, v, o 4 x 16 x 16 and gate, up, down 3 x 16 x 32; the head 64 x 16; no embedding lookup, no norms
    n = 2 * (4 * 16 * 16 + 3 * 16 * 32) + 64 * 16
    assert matmul_params(untied) == n
    tied = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))  # the head's matmul, counted once
    assert matmul_params(tied) == n
    # 4N, plus attention 6 x layers x s x d for a mean sequence of s tokens
    assert flops_per_token(tied, 10.0) == 4 * n + 6 * 2 * 10.0 * 16


def test_training_tokens_are_counted_where_the_loop_runs_whatever_the_loader_workers(tiny_model_dir):
    """The GPU preset builds batches in 2 worker processes: a count kept by the collator stayed in them, and the
    bench printed 0 tokens/s. Counted in the training step, 2 workers count what the main process counts."""
    import dataclasses
    from pathlib import Path

    from gsm8k_lora.benchmarks.training import bench_settings, gsm8k_like_rows, run_variant
    from gsm8k_lora.training.sft import build_sft_config

    cfg = device_config(False)
    rows = gsm8k_like_rows(2 * cfg.trainer.per_device_train_batch_size)  # two steps: every row once

    def counted(workers: int) -> dict:
        trainer = dataclasses.replace(cfg.trainer, dataloader_num_workers=workers)
        return run_variant(f"workers={workers}", lambda out: build_sft_config(trainer, Path(out), **bench_settings(2)),
                           cfg, str(tiny_model_dir), rows, steps=2)

    main, workers = counted(0), counted(2)
    assert workers["real_tokens"] == main["real_tokens"] > 0
    assert workers["computed_tokens"] == main["computed_tokens"] >= main["real_tokens"]
    assert workers["real_tokens_per_s"] > 0


def test_a_figure_the_bench_did_not_measure_fails_it_by_name():
    from gsm8k_lora.bench import unmeasured

    variant = {"variant": "package_default", "real_tokens": 0, "computed_tokens": 0, "padding_efficiency": None,
               "real_tokens_per_s": 0.0}
    results = {"train_variants": [variant, {**variant, "variant": "trl_defaults", "real_tokens": 10,
                                            "computed_tokens": 12, "padding_efficiency": 10 / 12,
                                            "real_tokens_per_s": 5.0}],
               "falcon3_package_default": {**variant, "mfu": None}, "train_speedup_x": float("nan"),
               "eval_tokens_per_s": 12.5, "eval_generated_over_needed_x": None, "eval_needed_measured_rows": 0}
    found = unmeasured(results)
    assert found == ["train_variants[package_default]: counted no trained token",
                     "falcon3_package_default: counted no trained token", "train_speedup_x: nan"]


def lever(tokens_per_s: float, **extra) -> dict:
    return {"variant": "x", "real_tokens": 100, "computed_tokens": 100, "real_tokens_per_s": tokens_per_s, **extra}


@pytest.mark.parametrize("measured, chosen", [
    # the fastest lever that keeps 16 rows a step; a faster one with more rows a step, or one that failed, is not taken
    ({"falcon3_package_default": lever(10), "falcon3_flex_attention": lever(14), "falcon3_rows_32": lever(30),
      "falcon3_liger": {"variant": "liger", "error": "ImportError: no triton"}},
     ["model.attn_implementation=flex_attention"]),
    # the engine with the most tokens/s; the merged adapter where it made the slot loop faster
    ({"falcon3_package_default": lever(10), "gen_slots_tokens_per_s": 900.0, "gen_padded_tokens_per_s": 800.0,
      "gen_slots_merged_tokens_per_s": 1200.0}, ["eval.engine=slots", "eval.merge_adapter=true"]),
    ({"gen_paged_tokens_per_s": 2000.0, "gen_slots_tokens_per_s": 900.0, "gen_slots_merged_tokens_per_s": 1200.0},
     ["eval.engine=paged"]),
    ({}, []),  # nothing measured: nothing chosen
])
def test_the_gpu_check_runs_with_what_its_bench_measured_fastest(measured, chosen):
    from gsm8k_lora.bench import choose

    assert choose(measured) == chosen


@pytest.mark.slow
def test_bench_measures_tokens_over_needed_with_the_trained_adapter(smoke_run, tiny_model_dir):
    """`make bench --adapter RUN_DIR`'s figure: the base model writes no `#### N`, the trained one does."""
    from peft import PeftModel

    from gsm8k_lora.benchmarks.generation import bench_eval

    run_dir, _ = smoke_run
    records = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    answered = [r["question"] for r in records if r["model"] == "finetuned" and "#### " in r["completion"]][:4]
    assert answered, "the trained adapter wrote no `#### N` answer on the test questions"
    base, tokenizer = load_tiny()
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    eval_cfg = compose("experiment=smoke").eval
    figures = bench_eval(model, tokenizer, answered, eval_cfg, batch_size=4, max_new_tokens=128)  # as the run evaluated
    assert 1 <= figures["eval_needed_measured_rows"] <= len(answered)
    assert 0 < figures["eval_needed_tokens_per_question"] <= 128 and figures["eval_generated_over_needed_x"] > 0.5
