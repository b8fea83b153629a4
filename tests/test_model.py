"""The tiny model is built reproducibly and loads through from_pretrained; load failures are clear."""

import json
import os
import subprocess
import sys

import pytest
import torch

from gsm8k_lora.errors import ModelLoadError
from gsm8k_lora.model import tiny as tiny_model
from gsm8k_lora.model.loading import load, load_model, load_tokenizer
from tests.conftest import compose, model_config


def test_tiny_model_is_a_llama_with_its_own_tokenizer(tiny_model_dir):
    model, tok = load(compose("model=tiny").model, str(tiny_model_dir.parent))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 2e7
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token != tok.eos_token
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_tiny_build_is_deterministic_before_pretraining(tmp_path):
    a = tiny_model.build(tmp_path / "a", seed=0, pretrain=False)
    b = tiny_model.build(tmp_path / "b", seed=0, pretrain=False)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_pretrained_tiny_model_writes_steps_but_no_final_answer_line(tiny_model_dir):
    """The base model knows the words, not the GSM8K answer format: fine-tuning has something to teach."""
    from gsm8k_lora.data.formatting import render_prompt
    from gsm8k_lora.data.synthetic import generate

    model, tok = load(compose("model=tiny").model, str(tiny_model_dir.parent))
    prompt = render_prompt(tok, generate(1, 99)[0]["question"], None)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=80, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "####" not in text
    assert any(ch.isdigit() for ch in text)


def test_unreachable_hub_id_suggests_offline_options():
    with pytest.raises(ModelLoadError, match="model=tiny"):
        load_tokenizer("no-such-org/no-such-model-xyz", model_config(name_or_path="x"))


def test_a_good_model_directory_whose_load_fails_is_named_with_its_own_cause(tiny_model_dir):
    """Only a directory without a config or weights is "not a Hugging Face model"; a good one whose load fails
    for another reason (here an attention implementation this machine does not have) keeps its own error."""
    cfg = model_config(name_or_path=str(tiny_model_dir), attn_implementation="flash_attention_2")
    with pytest.raises(ModelLoadError) as failed:
        load(cfg)
    message = str(failed.value)
    assert "not a Hugging Face model" not in message and "\n" not in message
    assert message.startswith(f"cannot load the model of {str(tiny_model_dir)!r}: ")
    assert "flash" in message.lower()  # transformers' own words about FlashAttention


def test_a_directory_without_weights_is_named_as_such(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"is a directory but not a Hugging Face model: it has no weights"):
        load_model(str(tmp_path), model_config(name_or_path=str(tmp_path)))


def test_a_model_the_package_loads_runs_no_hub_kernels(tiny_model_dir):
    """transformers 5.25 turns Hub kernels on unless told (and on CUDA fetches one at the first `train()`):
    the package tells it, whatever the environment says."""
    assert "USE_HUB_KERNELS" not in os.environ
    model, _ = load(compose("model=tiny").model, str(tiny_model_dir.parent))
    model.train()
    assert model.use_kernels is False


def test_importing_peft_asks_the_hub_for_no_kernel():
    """bitsandbytes (PEFT imports it) asks the `kernels` package for a Hub kernel at import on AVX512-BF16 CPUs;
    in a process that imports the package first, nothing asks, even where its spec was looked up before the import:
    a recorder stands in for `get_kernel`."""
    pytest.importorskip("bitsandbytes")
    code = """if True:
        import json, kernels
        asked = []
        def recorder(repo_id, *args, **kwargs):
            asked.append(repo_id)
            raise RuntimeError("recorded")
        kernels.get_kernel = recorder
        import importlib.util, gsm8k_lora
        importlib.util.find_spec("bitsandbytes")  # as transformers' availability checks ask, before the import
        import peft
        from bitsandbytes.functional import has_avx512bf16
        print(json.dumps({"asked": asked, "avx512bf16": bool(has_avx512bf16())}))"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if not seen["avx512bf16"]:
        pytest.skip("bitsandbytes asks the Hub for its CPU kernel only on a CPU with AVX512-BF16; this one has none")
    assert seen["asked"] == []


def test_pinned_hub_kernels_are_exactly_those_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    """A pin reaches the model for training and inference at its commit, transformers' own unpinned mapping is not
    inherited, and offline nothing is fetched (the tiny model runs on the CPU, where the CUDA kernel is not used)."""
    from kernels import Mode

    from gsm8k_lora.model import kernels
    from gsm8k_lora.preflight import kernel_problems

    revision = "0123456789abcdef0123456789abcdef01234567"
    pinned = {"RMSNorm": f"kernels-community/liger-kernels:LigerRMSNorm@{revision}"}
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path))
    cfg = model_config(name_or_path=str(tiny_model_dir), hub_kernels=pinned)
    assert [p.key for p in kernel_problems(cfg)] == ["model.hub_kernels.RMSNorm"]  # offline, and not in the cache
    (tmp_path / "kernels--kernels-community--liger-kernels" / "snapshots" / revision).mkdir(parents=True)
    assert kernel_problems(cfg) == []
    model, _ = load(cfg)
    mapping = model.kernel_config.kernel_mapping
    assert set(mapping) == {"RMSNorm"} and model.kernel_config.inherit_mapping is False
    for mode in (Mode.TRAINING, Mode.INFERENCE):
        repo = mapping["RMSNorm"]["cuda"][mode]
        assert (repo._repo_id, repo.layer_name, repo._revision) == ("kernels-community/liger-kernels",
                                                                     "LigerRMSNorm", revision)
    assert kernels.describe(model, pinned) == {"use_kernels": True, "pinned": pinned}



def test_tokenizer_without_chat_template_is_refused_unless_one_is_supplied(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    for name in ("chat_template.jinja",):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="model.chat_template_path"):
        load_tokenizer(str(tmp_path), model_config(name_or_path=str(tmp_path)))
    template = tmp_path / "t.jinja"
    template.write_text(tiny_model.CHAT_TEMPLATE)
    tok = load_tokenizer(str(tmp_path), model_config(name_or_path=str(tmp_path), chat_template_path=str(template)))
    assert tok.chat_template == tiny_model.CHAT_TEMPLATE


def test_resolve_passes_hub_ids_and_directories_through(tmp_path):
    from gsm8k_lora.model.sources import resolve

    hub = resolve(model_config(name_or_path="tiiuae/Falcon3-1B-Instruct"))
    assert (hub.path, hub.source) == ("tiiuae/Falcon3-1B-Instruct", "hub")
    local = resolve(model_config(name_or_path=str(tmp_path)))
    assert (local.path, local.source) == (str(tmp_path), "local")


def test_an_unreachable_hub_is_detected_once_and_switches_the_clients_offline(monkeypatch):
    """Offline is found by one quick check, and the hub clients are switched offline so that later lookups
    go straight to the local cache instead of each retrying for tens of seconds."""
    import datasets.config
    import httpx
    from huggingface_hub import constants

    from gsm8k_lora import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(hub, "_STATE", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []
    real_head = httpx.head
    monkeypatch.setattr(httpx, "head", lambda *a, **k: asked.append(a) or real_head(*a, **k))
    assert hub.probe() is False
    assert constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub.unreachable_note() == "hub: http://127.0.0.1:9 does not answer; using local files and caches only"
    assert hub.probe() is False and len(asked) == 1  # asked once per process
