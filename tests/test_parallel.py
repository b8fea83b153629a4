"""Several processes, as a user with a node of GPUs runs them: two CPU processes over gloo, one thread each (as
torchrun sets it), launched by torchrun and by accelerate. Each rank trains and answers its share; rank 0 alone
writes and speaks; the run records its scale; a rerun with another number of processes is refused where it would
change the training; a failure on one rank is one line that names it."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gsm8k_lora import parallel
from tests.conftest import OFFLINE_ENV, ROOT, run_cli
from tests.wandb_offline import read_run

SMALL = ["experiment=smoke", "trainer.max_steps=6", "trainer.eval_steps=3", "trainer.save_steps=3",
         "trainer.logging_steps=3", "eval.limit=8", "data.num_train=200"]
ONE_THREAD = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


def launch(launcher: list[str], args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *launcher, "-m", "gsm8k_lora.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD, **(env or {})})


def answers(run_dir: Path) -> dict[tuple[str, str], str]:
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return {(r["model"], r["id"]): r["completion"] for r in rows}


TORCHRUN = ["torch.distributed.run", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_model_dir):
    """A 2-process run, its baseline generated into a cache of its own (rank 0 holds the entry's lock)."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir, cache = root / "run", f"eval.baseline_cache={root / 'baselines'}"
    proc = launch(TORCHRUN, [*SMALL, cache, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc, cache


@pytest.mark.slow
def test_each_rank_trains_and_answers_its_share_and_rank_0_alone_writes_and_speaks(torchrun_run):
    run_dir, proc, _ = torchrun_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 180 training rows, 4 a process x 4 accumulated x 2 processes = 32 a step: an epoch is 6 steps, not 12
    assert (metrics["processes"], metrics["global_batch"], metrics["steps_per_epoch"]) == (2, 32, 6)
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    # both ranks answered a share of each pass: counted from the answers they gave back, not from the settings
    assert evaluated["baseline_answer_processes"] == evaluated["finetuned_answer_processes"] == 2
    assert evaluated["baseline_source"] == "generated"
    assert len(answers(run_dir)) == 16  # 8 questions, two models, each answered once
    # the console: each line once, no rank's progress bars twice
    for line in ("data: ", "model: ", "data-parallel: 2 processes (torchrun", "GSM8K, 8 test questions",
                 "run directory: "):
        assert sum(said.startswith(line) for said in proc.stdout.splitlines()) == 1, line
    assert proc.stderr.count("Fine-tuned answers:   0%") == 1
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["command"].startswith("torchrun --nproc_per_node 2 -m gsm8k_lora.train experiment=smoke")
    assert environment["scale"]["processes"] == 2 and environment["scale"]["launcher"] == "torchrun"
    # a checkpoint is marked complete once every rank has written its random state into it
    for checkpoint in (run_dir / "checkpoints").glob("checkpoint-*"):
        assert (checkpoint / ".complete").exists()
        assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert "find_unused_parameters" not in proc.stderr  # DDP is told LoRA uses every trainable weight
    assert "2 processes (torchrun, 1 node)" in (run_dir / "report.md").read_text()
    logged = read_run(run_dir)
    assert (logged["config"]["processes"], logged["config"]["global_batch"]) == (2, 32)


@pytest.mark.slow
def test_a_finished_training_is_answered_alike_by_one_process(torchrun_run, tmp_path):
    """The answers of a data-parallel run are one process's (greedy, float32): a rerun by one process of a run whose
    training finished is allowed, answers once, and gives every answer the two processes gave."""
    source, _, cache = torchrun_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for name in ("eval_metrics.json", "predictions.jsonl", "done.json", "report.md"):
        (run_dir / name).unlink()
    proc = run_cli("train", *SMALL, "eval.baseline_cache=null", "logger=none", f"hydra.run.dir={run_dir}",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training finished earlier") == 1
    assert json.loads((run_dir / "eval_metrics.json").read_text())["finetuned_answer_processes"] == 1
    assert answers(run_dir) == answers(source)


@pytest.mark.slow
def test_a_finished_training_resumed_by_the_same_launch_is_answered_once_and_sharded(torchrun_run, tmp_path):
    """Both ranks resume it; the fine-tuned pass runs once, shared, and the baseline comes from the cache rank 0
    read and gave to both."""
    source, _, cache = torchrun_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for name in ("eval_metrics.json", "predictions.jsonl", "done.json", "report.md"):
        (run_dir / name).unlink()
    proc = launch(TORCHRUN, [*SMALL, cache, "logger=none", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training finished earlier") == 1 and proc.stdout.count("run directory: ") == 1
    evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
    assert evaluated["finetuned_answer_processes"] == 2 and "baseline_answer_processes" not in evaluated
    assert evaluated["baseline_source"].startswith(cache.partition("=")[2])
    assert answers(run_dir) == answers(source)


@pytest.mark.slow
def test_a_rerun_mid_training_with_another_number_of_processes_is_refused(torchrun_run, tmp_path):
    source, _, cache = torchrun_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("adapter", "metrics.json", "checkpoint-6"))
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    proc = run_cli("train", *SMALL, "logger=none", f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "trained on 2 processes (torchrun, 1 node)" in line and "this command runs 1 process" in line
    assert "torchrun --nproc_per_node 2 -m gsm8k_lora.train experiment=smoke" in line
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_the_run_in_one_line_naming_the_rank(tmp_path, tiny_model_dir):
    """accelerate launch, with the flag it needs to start several processes; rank 1 fails in its first step (the
    fault is tests/faults/sitecustomize.py). Rank 0, ended by the launcher, says nothing and marks nothing."""
    run_dir = tmp_path / "run"
    faults = {"PYTHONPATH": str(ROOT / "tests" / "faults"), "GSM8K_LORA_TEST_FAIL_RANK": "1",
              "GSM8K_LORA_TEST_FAIL_STEP": "0"}
    proc = launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
                  [*SMALL, "logger=none", f"hydra.run.dir={run_dir}"], env=faults)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("rank ")]  # rank 0 said nothing
    assert len(ours) == 1, proc.stderr[-3000:]
    assert ours[0].startswith("rank 1 of 2: error: a batch this rank cannot train on")
    assert f"run directory {run_dir}" in ours[0]
    assert ("resume with: accelerate launch --multi_gpu --num_machines 1 --num_processes 2 -m gsm8k_lora.train"
            in ours[0])
    assert "Error executing job" not in proc.stderr  # no rank printed a traceback of its own
    assert json.loads((run_dir / "failed.json").read_text())["rank"] == 1


def test_several_processes_must_be_given_the_run_directory(tmp_path):
    """Hydra's default directory is named by the second each process starts in: the processes would disagree."""
    proc = run_cli("train", "experiment=smoke", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2",
                                                     "TORCHELASTIC_RUN_ID": "test"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: hydra.run.dir is required with 2 processes (torchrun, 1 node): they "
                                   "must agree on the directory they write, and its default is named by the time each "
                                   "one starts; add hydra.run.dir=outputs/runs/NAME")
    quiet = run_cli("train", "experiment=smoke", env={"WORLD_SIZE": "2", "RANK": "1"}, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr == "" and quiet.stdout == ""  # rank 1 meets it too, silently
    # a sweep is launched once: each process would run it, its callback and its jobs' Hydra set-up
    sweep = run_cli("train", "-m", "experiment=smoke", f"hydra.sweep.dir={tmp_path}", timeout=120,
                    env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "test"})
    assert sweep.returncode == 2 and sweep.stderr.startswith("config error: -m (a sweep) is invalid with 2 processes")


@pytest.fixture
def four_gpus(tmp_path, monkeypatch):
    """A machine whose nvidia-smi lists four GPUs, and a process no launcher started."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(4)))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for name in ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_on_a_machine_with_several_gpus_keeps_to_one_and_says_how_to_use_all(four_gpus):
    note = parallel.one_gpu(["lora.r=8"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # what torch counts: transformers' Trainer sees one GPU
    assert note == ("this machine has 4 GPUs; this run uses one (CUDA_VISIBLE_DEVICES=0). To use all 4: torchrun "
                    "--nproc_per_node 4 -m gsm8k_lora.train lora.r=8 hydra.run.dir=outputs/runs/NAME")


def test_a_choice_of_gpus_is_kept_to_its_first_and_a_launchers_process_is_left_alone(four_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert "To use all 2" in parallel.one_gpu([])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parallel.one_gpu([]) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"


def test_the_door_keeps_a_plain_launch_to_one_gpu_before_anything_loads(four_gpus):
    """The whole command, with the GPU preset refused on this CPU: the note comes first, from the door."""
    proc = run_cli("train", "experiment=smoke", "trainer=default", timeout=120)
    assert proc.returncode == 2
    note, refusal = proc.stderr.strip().splitlines()
    assert note.startswith("this machine has 4 GPUs; this run uses one (CUDA_VISIBLE_DEVICES=0). To use all 4: "
                           "torchrun --nproc_per_node 4 -m gsm8k_lora.train experiment=smoke trainer=default")
    assert refusal.startswith("config error: this config cannot run on this machine")


@pytest.mark.parametrize(("env", "expected"), [
    ({}, ("python", 1, 1, ["python", "-m"])),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"},
     ("torchrun", 2, 1, ["torchrun", "--nproc_per_node", "2", "-m"])),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "node0",
      "MASTER_PORT": "29400"},
     ("torchrun", 16, 2, ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", "node0:29400", "-m"])),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no", "TORCHELASTIC_RUN_ID": "x"},
     ("accelerate", 2, 1, ["accelerate", "launch", "--multi_gpu", "--num_machines", "1", "--num_processes", "2",
                           "-m"])),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_LOG_LEVEL": "info", "TORCHELASTIC_RUN_ID": "x"},
     ("torchrun", 2, 1, ["torchrun", "--nproc_per_node", "2", "-m"])),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "3", "SUBMITIT_EXECUTOR": "slurm"},
     ("submitit", 4, 2, None)),
])
def test_the_scale_is_read_from_what_the_launcher_set(monkeypatch, env, expected):
    for name in list(os.environ):
        if name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR", "MASTER_ADDR",
                    "MASTER_PORT") or name.startswith("ACCELERATE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    scale = parallel.scale()
    assert (scale.launcher, scale.processes, scale.nodes) == expected[:3]
    if expected[3] is not None:
        assert scale.launch_prefix() == expected[3]


@pytest.mark.slow
def test_a_submitit_sweeps_job_is_one_data_parallel_run_of_its_tasks(tmp_path, tiny_model_dir):
    """The SLURM sweep through submitit's local executor (sweeps/slurm_local.yaml, `make sweep SWEEP=slurm_local`):
    the job's two tasks take their ranks from submitit and train and answer as one run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("train", "-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", "slurm_local",
                   "experiment=smoke", "trainer.num_train_epochs=1", "trainer.learning_rate=1e-3",
                   "trainer.max_steps=2", "trainer.eval_steps=2", "trainer.save_steps=2", "trainer.logging_steps=2",
                   "eval.limit=4", "data.num_train=64", "logger=none", f"hydra.sweep.dir={sweep_dir}",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 1 of 1 jobs done" in proc.stdout
    job = sweep_dir / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    assert (metrics["processes"], metrics["launcher"], metrics["global_batch"]) == (2, "submitit", 32)
    assert json.loads((job / "eval_metrics.json").read_text())["finetuned_answer_processes"] == 2
    assert (job / "done.json").exists() and not (job / "failed.json").exists()
    # the sweep's comparison says at which scale each setting trained
    (row,) = [r for r in csv.DictReader((sweep_dir / "comparison.csv").open()) if r["level"] == "setting"]
    assert (row["processes"], row["global_batch"]) == ("2", "32")
