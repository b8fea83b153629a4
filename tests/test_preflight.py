"""The commands' door: a config mistake, or anything this machine cannot do, is one line and exit code 2,
said before anything loads and before a sweep starts a job, and it leaves no directory behind."""

import pytest
import torch

from gsm8k_lora.data.loading import load_local
from tests.conftest import ROOT, run_cli, write_jsonl

ROW = {"question": "q", "answer": "a\n#### 1"}


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def no_hub(tmp_path) -> dict:
    """A machine whose hub does not answer and whose caches are empty."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_the_used_by_command_on_a_machine_that_cannot_run_it_is_one_message(tmp_path):
    proc = run_cli("train", "lora.r=8", cwd=tmp_path, env=no_hub(tmp_path), timeout=120)
    line = one_line(proc)
    assert line.startswith("config error: this config cannot run on this machine")
    for key in ("data.path='openai/gsm8k'", "model.name_or_path='tiiuae/Falcon3-1B-Instruct'"):
        assert key in line
    if not torch.cuda.is_available():  # the GPU preset's device-bound flags, each named
        assert "trainer.bf16=True" in line and "trainer.tf32=True" in line
        assert "make demo" in line and "make real" in line and "experiment=real_cpu" in line
    assert not (tmp_path / "outputs").exists()  # no run directory left by a run that never began


def test_a_sweep_that_cannot_run_says_so_before_any_job(tmp_path):
    proc = run_cli("train", "-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", "lr_epochs", cwd=tmp_path,
                   env=no_hub(tmp_path), timeout=120)
    assert one_line(proc).startswith("config error: this sweep cannot run")
    assert not (tmp_path / "outputs").exists()


def test_a_bad_value_in_one_job_of_a_sweep_stops_it_before_any_job(tmp_path):
    proc = run_cli("train", "-m", "experiment=smoke", "lora.r=4,0", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "lora.r=0 is invalid: must be a positive integer" in one_line(proc)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, says", [
    (["data=local", "data.path=/nonexistent/gsm8k"], "data.path='/nonexistent/gsm8k' does not exist"),
    (["data.path=/nonexistent/x"], "data.source=synthetic generates its rows and reads no file"),
    (["data=local", "data.path=DIR", "data.name=main"], "data.name='main' is invalid: data.source=local ignores it"),
    (["data=gsm8k", "data.path=no-such-org/no-such-dataset"], "'no-such-org/no-such-dataset' is on the hub"),
    (["model.name_or_path=no-such-org/no-such-model"], "is on the hub, which does not answer"),
    (["model.name_or_path=DIR"], "is a directory without config.json: not a model directory"),
    (["trainer.resume=DIR"], "trainer.resume='DIR' is not a checkpoint directory"),
    (["eval.engine=paged"], "eval.engine='paged' needs a CUDA GPU (transformers' continuous batching"),
    (["model.hub_kernels.RMSNorm=x"], "model.hub_kernels.RMSNorm is invalid: model.hub_kernels has no key 'RMSNorm'; "
     "add one with +model.hub_kernels.RMSNorm=VALUE"),
    (["+model.hub_kernels.RMSNorm='kernels-community/liger-kernels:LigerRMSNorm'"],
     "model.hub_kernels.RMSNorm='kernels-community/liger-kernels:LigerRMSNorm' is invalid: allowed: org/repo:"
     "KernelLayer@<40-hex commit>"),
    (["+model.hub_kernels.RMSNorm='kernels-community/liger-kernels:LigerRMSNorm@" + "a" * 40 + "'"],
     "LigerRMSNorm@" + "a" * 40 + "' is not in the local kernel cache"),
])
def test_bad_inputs_are_one_line_before_anything_loads(tmp_path, args, says):
    write_jsonl(tmp_path / "data" / "train.jsonl", [ROW] * 20)
    args = [a.replace("DIR", str(tmp_path / "data")) for a in args]
    proc = run_cli("train", "experiment=smoke", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *args,
                   env={"GSM8K_LORA_CACHE": str(tmp_path / "cache"), **no_hub(tmp_path)}, timeout=120)
    assert says.replace("DIR", str(tmp_path / "data")) in one_line(proc)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing built, nothing left


def test_a_local_directory_is_read_for_its_own_files_only(tmp_path):
    """`data.path=.` in a project with outputs must not read a checkpoint's trainer_state.json as data."""
    write_jsonl(tmp_path / "train.jsonl", [ROW] * 3)
    write_jsonl(tmp_path / "test.jsonl", [ROW])
    (tmp_path / "outputs" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "outputs" / "checkpoint-5" / "trainer_state.json").write_text("{not data")
    (tmp_path / "outputs" / "train_more.jsonl").write_text("{not data")
    rows = load_local(str(tmp_path), 0.0)
    assert (len(rows["train"]), len(rows["test"])) == (3, 1)


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_help_is_the_commands_own_page(entry):
    proc = run_cli(entry, "--help", timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    page = proc.stdout
    assert page.startswith(f"usage: python -m gsm8k_lora.{entry}") and "base_" not in page
    assert "falcon3_1b_qlora" in page and "smollm2_135m" in page  # the model group's real options
    if entry == "train":
        assert "lora        attn_only, default (default), r16" in page and "trainer.learning_rate=" in page
    else:
        assert "adapter=outputs/runs/RUN" in page and "eval.prompt=" in page
