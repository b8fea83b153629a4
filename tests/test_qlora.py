"""The 4-bit QLoRA path on the CPU, through bitsandbytes' CPU kernels: the same loading, PEFT and TRL code
a CUDA run takes (the CUDA run itself is in test_gpu.py)."""

import json
import sys

import pytest
import torch

from gsm8k_lora.config import ConfigError
from gsm8k_lora.model.loading import four_bit_device, load, weight_memory
from tests.conftest import model_config, run_cli

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif("cpu" not in getattr(bnb, "supported_torch_devices", ()),
                                reason="this bitsandbytes has no CPU kernels")


def lora_gradients(model_dir, evaluate_first: bool) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, _ = load(model_config(name_or_path=str(model_dir), load_in_4bit=True), use_cpu=True)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(5, 700, (2, 24), generator=torch.Generator().manual_seed(1))
    if evaluate_first:  # as an evaluation step between training steps does
        model.eval()
        with torch.no_grad():
            model(ids)
    model.train()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_after_an_evaluation_pass_are_the_gradients_before_it(tiny_model_dir):
    """bitsandbytes repacks CPU 4-bit weights for an inference kernel without a backward on the first
    evaluation pass; the loader turns that off, so training after an evaluation is still correct."""
    fresh = lora_gradients(tiny_model_dir, evaluate_first=False)
    after_eval = lora_gradients(tiny_model_dir, evaluate_first=True)
    first_layer = [n for n in fresh if "layers.0." in n]
    assert first_layer and all(fresh[n].abs().sum() > 0 for n in first_layer)
    for name, grad in fresh.items():
        torch.testing.assert_close(after_eval[name], grad, msg=name)


def test_four_bit_weights_take_less_memory_and_say_how_much(tiny_model_dir):
    full, _ = load(model_config(name_or_path=str(tiny_model_dir)), use_cpu=True)
    quant, _ = load(model_config(name_or_path=str(tiny_model_dir), load_in_4bit=True), use_cpu=True)
    a, b = weight_memory(full, torch.float32), weight_memory(quant, torch.float32)
    assert a["weights_gib"] == pytest.approx(a["weights_gib_unquantised"])
    assert b["weights_gib_unquantised"] == pytest.approx(a["weights_gib"])  # the same weights, counted unquantised
    assert b["weights_gib"] < 0.5 * a["weights_gib"]
    assert getattr(quant, "is_loaded_in_4bit", False)


def test_missing_bitsandbytes_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"model.load_in_4bit=True is invalid: bitsandbytes is not installed"):
        four_bit_device(use_cpu=True)


def test_merging_into_a_4bit_base_is_refused_before_loading(tmp_path):
    proc = run_cli("train", "experiment=smoke", "model.load_in_4bit=true", "trainer.save_merged=true",
                   f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "trainer.save_merged=True is invalid: must be false with model.load_in_4bit=true" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_qlora_run_trains_records_its_memory_saving_and_reloads(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    proc = run_cli("train", "experiment=smoke", "logger=none", "model.load_in_4bit=true", "trainer.max_steps=10",
                   "trainer.eval_steps=5", "trainer.save_steps=5", "eval.limit=8", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_loss_last"] < m["train_loss_first"] and m["eval_loss_last"] < m["eval_loss_first"]
    assert m["weights_gib"] < 0.5 * m["weights_gib_unquantised"]
    report = (run_dir / "report.md").read_text()
    mib, mib_full = m["weights_gib"] * 1024, m["weights_gib_unquantised"] * 1024
    assert f"{mib:.1f} MiB as loaded, {mib_full:.1f} MiB in float32 unquantised" in report
    proc = run_cli("evaluate", "experiment=smoke", "logger=none", "model.load_in_4bit=true", f"adapter={run_dir}",
                   "eval.limit=8", f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    first = json.loads((run_dir / "eval_metrics.json").read_text())
    assert again["finetuned_answer_format_rate"] == first["finetuned_answer_format_rate"]
