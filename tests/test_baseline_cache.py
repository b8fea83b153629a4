"""The baseline's answers, generated once and reused: the same predictions and figures as generated ones, and
generated anew when anything they depend on changes."""

import json
import shutil

import pytest

from gsm8k_lora.data.loading import build_splits, questions
from gsm8k_lora.evaluation import baseline_cache
from gsm8k_lora.evaluation.answers import evaluate
from tests.conftest import compose

SMALL = ["experiment=smoke", "eval.limit=4", "eval.max_new_tokens=8", "data.num_test=8"]


@pytest.fixture(scope="module")
def answering(tiny, tiny_model_dir):
    model, tokenizer = tiny
    return model, tokenizer, build_splits(compose(*SMALL).data), baseline_cache.weights_identity(str(tiny_model_dir))


def answered(answering, cache, *overrides, weights=None):
    model, tokenizer, splits, identity = answering
    cfg = compose(*SMALL, f"eval.baseline_cache={cache}", *overrides)
    rows = questions(splits, cfg.eval.split, cfg.eval.limit)
    predictions, metrics = evaluate(cfg.eval, cfg.data.system_prompt, model, tokenizer, splits, rows, adapters=False,
                                    weights=weights or identity)
    assert (metrics.pop("baseline_answer_s", None) is None) == (metrics["baseline_source"] != "generated")  # timed
    assert (metrics.pop("baseline_answer_processes", None) is None) == (metrics["baseline_source"] != "generated")
    return json.dumps(predictions), metrics


@pytest.mark.parametrize("sampled", [[], ["eval.num_samples=2", "eval.temperature=1.0"]])
def test_a_reused_baseline_gives_the_predictions_and_figures_of_a_generated_one(answering, tmp_path, sampled):
    generated, first = answered(answering, tmp_path / "a", *sampled)
    reused, second = answered(answering, tmp_path / "a", *sampled)
    again, third = answered(answering, tmp_path / "b", *sampled)  # generated once more, in a new cache
    assert first.pop("baseline_source") == third.pop("baseline_source") == "generated"
    entry = second.pop("baseline_source")
    assert entry.startswith(str(tmp_path / "a")) and json.loads((tmp_path / "a" / entry.rpartition("/")[2] /
                                                                 "key.json").read_text())["questions"]
    assert reused == generated == again and second == first == third


@pytest.mark.parametrize("change", [
    ["eval.limit=3"],  # the questions
    ["eval.prompt=fewshot", "eval.num_fewshot=1"],  # the protocol and its shots
    ["eval.max_new_tokens=9"],  # the generation settings
    ["data.system_prompt=Be brief."],  # the prompt itself
    "weights",  # the base weights
    "hub_kernels",  # the kernels pinned to run them
])
def test_a_change_in_anything_the_answers_depend_on_generates_anew(answering, tmp_path, tiny_model_dir, change):
    _, base = answered(answering, tmp_path)
    assert base["baseline_source"] == "generated"
    assert answered(answering, tmp_path)[1]["baseline_source"] != "generated"  # the same inputs: reused
    if change == "weights":
        copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
        (copy / "model.safetensors").touch()  # another file's identity: weights that may differ
        _, changed = answered(answering, tmp_path, weights=baseline_cache.weights_identity(str(copy)))
    elif change == "hub_kernels":
        pinned = {"RMSNorm": "kernels-community/liger-kernels:LigerRMSNorm@" + "0" * 40}
        identity = baseline_cache.weights_identity(str(tiny_model_dir), None, pinned)
        _, changed = answered(answering, tmp_path, weights=identity)
    else:
        _, changed = answered(answering, tmp_path, *change)
    assert changed["baseline_source"] == "generated"
