"""Every file a command reads, broken as files break (cut short, random bytes, invalid JSON, a value of the wrong
type, empty, another encoding, one file of a set missing), ends the command with exit code 1 and one line of the
package's own that names the file; a run directory a command read is left byte for byte as it was.

The broken inputs are made here from good ones (the tiny model, GSM8K-format rows, a copy of the trained smoke run).
Most are refused at the command's door, before any model loads, so they run in-process through the command's own
`main` or door (`cli.command`); what only loading finds is checked where the model loads, and one case of each kind
through the real command line."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from gsm8k_lora.data.synthetic import generate
from tests.conftest import SMOKE_RUN, run_cli, write_jsonl

RANDOM = random.Random(35)
ROWS = generate(20, 0)


# --- ways a file breaks ----------------------------------------------------------------------------------------
def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 3])  # past a line end where a file is two halves of equal lines


def random_bytes(path: Path) -> None:
    path.write_bytes(RANDOM.randbytes(max(256, path.stat().st_size)))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def invalid_json(path: Path) -> None:
    path.write_text('{"question": "How many?", "answer": ', encoding="utf-8")


def utf16(path: Path) -> None:
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))


def latin1(path: Path) -> None:
    path.write_bytes((path.read_text(encoding="utf-8") + "{# café #}\n").encode("latin-1"))


def json_list(path: Path) -> None:
    path.write_text("[1, 2, 3]\n", encoding="utf-8")


def remove(path: Path) -> None:
    path.unlink()


def invalid_yaml(path: Path) -> None:
    path.write_text("model: [unclosed\n  name: {\n", encoding="utf-8")


# --- what the user sees ------------------------------------------------------------------------------------------
def said(capsys, call) -> tuple[int, list[str]]:
    """The exit code of `call` and the lines it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        call()
    return ended.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code: int, lines: list[str], names: Path) -> None:
    assert code == 1, lines
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("error: ") and str(names) in lines[-1], lines


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def at_the_door(entry: str, *args: str) -> bool:
    """The command's door (`cli.command`) on these arguments, in-process: exits (SystemExit) where it refuses them,
    else returns True without running the job."""
    from hydra.core.global_hydra import GlobalHydra

    from gsm8k_lora import cli
    from gsm8k_lora import evaluate as evaluate_command
    from gsm8k_lora import train as train_command
    from gsm8k_lora.config import register_configs

    command = {"train": train_command, "evaluate": evaluate_command}[entry]
    passed = []

    def checked(composed):
        task = command.checked_job(composed)
        held = task.keywords.get("run_dir")
        if held is not None:  # the door holds a training run's directory for its job: let it go
            held.release()
        passed.append(True)
        raise SystemExit(0)

    register_configs()
    try:
        cli.command(list(args), "", command.job, checked)
    except SystemExit:
        if not passed:
            raise
    finally:
        GlobalHydra.instance().clear()
    return bool(passed)


# --- a model directory, a GGUF file --------------------------------------------------------------------------------
def sharded(model: Path) -> None:
    """The model's weights as two shards and their index, as save_pretrained writes a large model."""
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, model / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    (model / "model.safetensors").unlink()


def torch_bin(model: Path) -> None:
    """The model's weights as `pytorch_model.bin`, torch.save's format."""
    import torch
    from safetensors.torch import load_file as load_torch

    torch.save(load_torch(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


MODEL_CASES = [  # (id, how the copy is laid out first, the file, how it breaks)
    ("weights-cut", None, "model.safetensors", cut),
    ("weights-random", None, "model.safetensors", random_bytes),
    ("weights-empty", None, "model.safetensors", empty),
    ("weights-missing", None, "model.safetensors", remove),
    ("config-invalid-json", None, "config.json", invalid_json),
    ("config-utf16", None, "config.json", utf16),
    ("config-a-list", None, "config.json", json_list),
    ("tokenizer-cut", None, "tokenizer.json", cut),
    ("tokenizer-config-invalid", None, "tokenizer_config.json", invalid_json),
    ("chat-template-latin1", None, "chat_template.jinja", latin1),
    ("shard-missing", sharded, "model-00002-of-00002.safetensors", remove),
    ("shard-cut", sharded, "model-00001-of-00002.safetensors", cut),
    ("index-invalid", sharded, "model.safetensors.index.json", invalid_json),
    ("bin-cut", torch_bin, "pytorch_model.bin", cut),
    ("bin-random", torch_bin, "pytorch_model.bin", random_bytes),
]


@pytest.mark.parametrize("layout, name, breaks", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_a_broken_model_directory_is_one_line_naming_the_file_at_the_door(tiny_model_dir, tmp_path, capsys,
                                                                           layout, name, breaks):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    if layout:
        layout(model)
    breaks(model / name)
    code, lines = said(capsys, lambda: at_the_door("train", "experiment=smoke", "logger=none",
                                                   f"model.name_or_path={model}", f"hydra.run.dir={tmp_path / 'run'}"))
    at_fault = model if breaks is remove and name == "model.safetensors" else model / name
    assert_one_line(code, lines, at_fault)
    if at_fault == model:  # no weights at all: the one case that is "not a Hugging Face model"
        assert "not a Hugging Face model: it has no weights" in lines[-1]
    else:
        assert "not a Hugging Face model" not in lines[-1]
    assert not (tmp_path / "run").exists()  # refused before the run began: nothing left behind


def gguf_file(path: Path) -> Path:
    """A small valid GGUF (one tensor), written with the gguf package transformers reads GGUF with."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("breaks", [cut, random_bytes, empty])
def test_a_broken_gguf_file_is_one_line_naming_it(tmp_path, capsys, breaks):
    path = gguf_file(tmp_path / "model.gguf")
    breaks(path)
    code, lines = said(capsys, lambda: at_the_door("train", "experiment=smoke", "logger=none",
                                                   f"model.gguf_file={path}", f"hydra.run.dir={tmp_path / 'run'}"))
    assert_one_line(code, lines, path)
    assert "gguf package cannot read it" in lines[-1]


def config_edit(change):
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        change(config)
        (model / "config.json").write_text(json.dumps(config))
    return edit


LOAD_CASES = [  # what only loading finds: (id, the break, the file named, words of the library that found it)
    ("rope-type-unknown", config_edit(lambda c: c.update(rope_scaling={"rope_type": "bogus"})), "config.json",
     "cannot build a LlamaForCausalLM from it (KeyError: 'bogus')"),
    ("sizes-differ", config_edit(lambda c: c.update(hidden_size=2 * c["hidden_size"])), "config.json",
     "does not match the weights beside it"),
    ("wrong-type", config_edit(lambda c: c.update(num_hidden_layers="four")), "config.json",
     "expected int, got str"),
    ("template-syntax", lambda m: (m / "chat_template.jinja").write_text("{% for m in messages %}{{ m }"),
     "chat_template.jinja", "TemplateSyntaxError"),
]


@pytest.mark.parametrize("breaks, name, words", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_what_only_loading_finds_is_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys, breaks, name, words):
    from gsm8k_lora.errors import ModelLoadError, fail
    from gsm8k_lora.model.loading import load
    from tests.conftest import model_config

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    breaks(model)
    with pytest.raises(ModelLoadError) as refused:
        load(model_config(name_or_path=str(model), dtype="float32"))
    code, lines = said(capsys, lambda: fail(refused.value))
    assert_one_line(code, lines, model / name)
    assert words in lines[-1]


# --- data files ----------------------------------------------------------------------------------------------------
def parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def jsonl_rows(rows):
    return lambda d: write_jsonl(d / "train.jsonl", rows)


DATA_CASES = [  # (id, the file written good, the file, how it breaks, words of the reader that refused it)
    ("jsonl-random", jsonl_rows(ROWS), "train.jsonl", random_bytes, "not UTF-8 text"),
    ("jsonl-cut", jsonl_rows(ROWS), "train.jsonl", cut, "malformed JSON"),
    ("jsonl-empty", jsonl_rows(ROWS), "train.jsonl", empty, "holds no rows (it is empty)"),
    ("jsonl-utf16", jsonl_rows(ROWS), "train.jsonl", utf16, "not UTF-8 text"),
    ("jsonl-columns", jsonl_rows([{"prompt": r["question"], "response": r["answer"]} for r in ROWS]), "train.jsonl",
     None, "no row has the columns 'question' and 'answer'; its columns: prompt, response"),
    ("jsonl-types", jsonl_rows([{**r, "answer": 72} for r in ROWS]), "train.jsonl", None, "20 answer not text"),
    ("json-cut", lambda d: (d / "train.json").write_text(json.dumps(ROWS)), "train.json", cut, "malformed JSON"),
    ("json-number", lambda d: (d / "train.json").write_text(json.dumps(ROWS)), "train.json",
     lambda p: p.write_text("42"), "expected a JSON array of objects"),
    ("parquet-random", lambda d: parquet(d / "train.parquet", ROWS), "train.parquet", random_bytes,
     "pyarrow cannot read it as Parquet"),
    ("parquet-cut", lambda d: parquet(d / "train.parquet", ROWS), "train.parquet", cut,
     "pyarrow cannot read it as Parquet"),
    ("parquet-empty", lambda d: parquet(d / "train.parquet", ROWS), "train.parquet", empty,
     "pyarrow cannot read it as Parquet"),
    ("parquet-types", lambda d: parquet(d / "train.parquet", [{**r, "question": 7} for r in ROWS]), "train.parquet",
     None, "20 question not text"),
    ("test-split-invalid", lambda d: (jsonl_rows(ROWS)(d), write_jsonl(d / "test.jsonl", ROWS[:5])), "test.jsonl",
     invalid_json, "malformed JSON"),
]


@pytest.mark.parametrize("write, name, breaks, words", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_a_broken_data_file_is_one_line_naming_it_at_the_door(tmp_path, capsys, write, name, breaks, words):
    data = tmp_path / "data"
    data.mkdir()
    write(data)
    if breaks:
        breaks(data / name)
    entry = "evaluate" if name.startswith("test") else "train"  # the test split: what an evaluation reads
    code, lines = said(capsys, lambda: at_the_door(entry, "experiment=smoke", "logger=none", "data=local",
                                                   f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}"))
    assert_one_line(code, lines, data / name)
    assert words in lines[-1]
    assert not (tmp_path / "run").exists()


# --- completions to grade --------------------------------------------------------------------------------------------
GRADE_ROWS = [{"completion": "so 5\n#### 5", "answer": "2+3=5\n#### 5"}] * 4


@pytest.mark.parametrize("breaks, words", [
    (latin1, "not UTF-8 text"), (random_bytes, "not UTF-8 text"), (empty, "holds no rows to grade"),
    (cut, "malformed JSON"), (json_list, "expected a JSON object"),
    (lambda p: write_jsonl(p, [{"completion": "#### 5"}]), "row 1 needs both 'completion' and 'answer'"),
], ids=["latin1", "random", "empty", "cut", "a-list", "a-column-missing"])
def test_broken_completions_to_grade_are_one_line_naming_the_file(tmp_path, capsys, breaks, words):
    from gsm8k_lora import grade

    path = write_jsonl(tmp_path / "completions.jsonl", GRADE_ROWS)
    breaks(path)
    code, lines = said(capsys, lambda: grade.main([str(path)]))
    assert_one_line(code, lines, path)
    assert words in lines[-1]
    assert capsys.readouterr().out == ""


def test_grade_on_a_file_in_another_encoding_is_one_line_from_the_command_line(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_bytes('{"completion": "caf\xe9 #### 5", "answer": "5"}\n'.encode("latin-1"))
    proc = run_cli("grade", str(path), timeout=120)
    assert_one_line(proc.returncode, proc.stderr.strip().splitlines(), path)
    assert "HYDRA_FULL_ERROR=1 shows the traceback" in proc.stderr


def test_the_switch_the_line_names_prints_the_whole_traceback_above_it(tmp_path, capsys, monkeypatch):
    from gsm8k_lora import grade

    path = tmp_path / "completions.jsonl"
    path.write_bytes(b"\xff\xfe{}\n")
    code, lines = said(capsys, lambda: grade.main([str(path)]))
    assert len(lines) == 1 and lines[0].endswith("(HYDRA_FULL_ERROR=1 shows the traceback)")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    code_again, full = said(capsys, lambda: grade.main([str(path)]))
    assert code_again == code and full[0].startswith("Traceback") and len(full) > 3
    assert any(line.startswith("UnicodeDecodeError") for line in full)  # the reader's own exception, then the line
    assert full[-1] == lines[0].removesuffix(" (HYDRA_FULL_ERROR=1 shows the traceback)")


# --- a run directory: evaluate it, resume it, report it, compare a sweep of it -------------------------------------
@pytest.fixture
def run_copy(smoke_run, tmp_path) -> Path:
    """A copy of the trained smoke run, to break (the shared run stays as it is)."""
    return shutil.copytree(smoke_run[0], tmp_path / "run", ignore=shutil.ignore_patterns(".lock*"))


EVALUATE_CASES = [  # (id, the file, how it breaks)
    ("adapter-weights-random", "adapter/adapter_model.safetensors", random_bytes),
    ("adapter-weights-cut", "adapter/adapter_model.safetensors", cut),
    ("adapter-weights-missing", "adapter/adapter_model.safetensors", remove),
    ("adapter-config-invalid", "adapter/adapter_config.json", invalid_json),
    ("adapter-config-a-list", "adapter/adapter_config.json", json_list),
    ("run-config-invalid", "config.yaml", invalid_yaml),
    ("run-config-utf16", "config.yaml", utf16),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, breaks", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES])
def test_evaluating_a_broken_run_is_one_line_and_leaves_it_as_it_was(run_copy, tmp_path, capsys, name, breaks):
    breaks(run_copy / name)
    before = snapshot(run_copy)
    code, lines = said(capsys, lambda: at_the_door("evaluate", "logger=none", f"adapter={run_copy}",
                                                   f"hydra.run.dir={tmp_path / 'evaluation'}"))
    at_fault = run_copy / "adapter" if breaks is remove else run_copy / name
    assert_one_line(code, lines, at_fault)
    assert snapshot(run_copy) == before
    assert not (tmp_path / "evaluation").exists()


@pytest.mark.slow
def test_an_evaluation_into_the_run_it_reads_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    code, lines = said(capsys, lambda: at_the_door("evaluate", "logger=none", f"adapter={run_copy}",
                                                   f"hydra.run.dir={run_copy}"))
    assert code == 2 and len(lines) == 1 and "it is the run being evaluated" in lines[0]
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_an_adapter_on_a_base_model_it_was_not_trained_on_is_one_line_and_the_run_is_kept(run_copy, tmp_path,
                                                                                       tiny_model_dir):
    """From the command line: the run's config.yaml names a base model of other sizes (the tiny model's tokenizer and
    architecture at half its width, random weights), found when PEFT loads the adapter."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    config = AutoConfig.from_pretrained(other)
    config.hidden_size //= 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    run_config = yaml.safe_load((run_copy / "config.yaml").read_text())
    run_config["model"]["name_or_path"] = str(other)
    (run_copy / "config.yaml").write_text(yaml.safe_dump(run_config))
    before = snapshot(run_copy)
    proc = run_cli("evaluate", "logger=none", f"adapter={run_copy}", "eval.limit=2",
                   f"hydra.run.dir={tmp_path / 'evaluation'}", timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert_one_line(proc.returncode, lines, run_copy / "adapter")
    assert f"was trained on another base model than {str(other)!r}: size mismatch" in lines[-1]
    assert snapshot(run_copy) == before


RESUME_CASES = [  # (id, what the rerun will read, how it breaks, what was removed first so that it reads it)
    ("finished-adapter-cut", "adapter/adapter_model.safetensors", cut, ["done.json"]),
    ("checkpoint-optimizer-cut", "LAST/optimizer.pt", cut, ["done.json", "metrics.json"]),
    ("checkpoint-state-invalid", "LAST/trainer_state.json", invalid_json, ["done.json", "metrics.json"]),
    ("done-marker-invalid", "done.json", invalid_json, []),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, breaks, removed", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resuming_a_broken_run_is_one_line_and_deleting_what_it_names_lets_the_same_command_go_on(
        run_copy, capsys, name, breaks, removed):
    for gone in removed:
        (run_copy / gone).unlink()
    last = sorted((run_copy / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    at_fault = run_copy / name.replace("LAST", f"checkpoints/{last.name}")
    breaks(at_fault)
    before = snapshot(run_copy)
    command = ("train", *SMOKE_RUN, "logger=none", f"hydra.run.dir={run_copy}")
    code, lines = said(capsys, lambda: at_the_door(*command))
    assert_one_line(code, lines, at_fault)
    assert snapshot(run_copy) == before
    if at_fault.name != "done.json":
        assert "or add trainer.resume=never to start afresh" in lines[-1]
        shutil.rmtree(at_fault.parent)  # what the line says to delete: the same command then goes on
    else:
        at_fault.unlink()
    assert at_the_door(*command)


REPORT_CASES = [
    ("metrics-cut", "metrics.json", cut), ("eval-metrics-utf16", "eval_metrics.json", utf16),
    ("predictions-cut", "predictions.jsonl", cut), ("config-invalid", "config.yaml", invalid_yaml),
    ("history-a-list", "log_history.json", json_list), ("environment-empty", "environment.json", empty),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, breaks", [c[1:] for c in REPORT_CASES], ids=[c[0] for c in REPORT_CASES])
def test_reporting_a_broken_run_is_one_line_and_writes_nothing(run_copy, capsys, name, breaks):
    from gsm8k_lora import report

    breaks(run_copy / name)
    before = snapshot(run_copy)
    code, lines = said(capsys, lambda: report.main([str(run_copy)]))
    assert_one_line(code, lines, run_copy / name)
    assert snapshot(run_copy) == before


COMPARE_CASES = [
    ("job-metrics-invalid", "1/metrics.json", invalid_json), ("job-overrides-invalid", "0/.hydra/overrides.yaml",
                                                              invalid_yaml),
    ("sweep-record-cut", "sweep.json", cut), ("job-config-random", "1/config.yaml", random_bytes),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, breaks", [c[1:] for c in COMPARE_CASES], ids=[c[0] for c in COMPARE_CASES])
def test_comparing_a_broken_sweep_is_one_line_and_writes_nothing(smoke_run, tmp_path, capsys, name, breaks):
    from gsm8k_lora import compare

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(smoke_run[0], sweep / job, ignore=shutil.ignore_patterns(".lock*", "checkpoints", "adapter",
                                                                                 "merged", "wandb"))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "group": "s", "swept": ["trainer.learning_rate"]}))
    breaks(sweep / name)
    before = snapshot(sweep)
    code, lines = said(capsys, lambda: compare.main([str(sweep)]))
    assert_one_line(code, lines, sweep / name)
    assert snapshot(sweep) == before
