"""The Falcon3-shaped benchmark's code, run on the CPU with a scaled-down shape: the same building,
loading (bf16 and 4-bit), training variants, FLOPs accounting and generation a CUDA machine runs at full
size. Its figures are not asserted, only that each is there and sane."""

import pytest

from gsm8k_lora.bench_falcon3 import FALCON3_1B, bench_falcon3, param_count
from gsm8k_lora.bench_train import default_trainer_config

SMALL = {**FALCON3_1B, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 1024}


def test_falcon3_config_counts_the_published_parameters():
    assert param_count(FALCON3_1B) == pytest.approx(1.67e9, rel=0.01)  # with the untied 131k-vocab head


@pytest.mark.slow
def test_falcon3_shaped_benchmark_code_runs_on_a_small_shape(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    out = bench_falcon3(tiny_model_dir, steps=2, quick=True, arch=SMALL, trainer_cfg=default_trainer_config(False),
                        training=True)
    assert out["falcon3_params"] == param_count(SMALL)
    assert 0 < out["qlora_weights_gib_4bit"] < out["qlora_weights_gib_bf16"]
    for name in ("falcon3_trl_defaults", "falcon3_package_default", "falcon3_qlora"):
        figures = out[name]
        assert figures["steps"] == 2 and figures["timed_steps"] == 1 and figures["model_tflops"] > 0
        timed_tokens = figures["real_tokens_per_s"] * figures["seconds"]  # the warm-up step's tokens are left out
        assert 0 < timed_tokens < figures["real_tokens"]
    assert out["gen_prompts"] == 64 and out["gen_tokens"] > 0
