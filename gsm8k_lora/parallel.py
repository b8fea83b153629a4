"""Several processes, one owner: the one module that knows a run may be data-parallel.

A run is launched as one process (`python -m gsm8k_lora.train`), by torchrun or `accelerate launch` on one machine,
or by submitit as a SLURM job's tasks on several nodes. Every process trains its share of each batch (the Trainer's
DDP) and answers its share of the questions (`shard` and `gather`, accelerate's own helpers); rank 0 alone writes
the run directory, logs to W&B and speaks on the console (`main_only`, `quiet_replica`). Whatever decides which
process does what is here, once, as Lightning's `rank_zero_only` and accelerate's `PartialState` have it:
- `scale()`: processes, nodes and the launcher, read from the environment the launcher set (no torch import: the
  door asks it before anything loads);
- `start(timeout_s, cpu)`: the process group, with `trainer.ddp_timeout`, before anything waits on another rank (the
  Trainer later finds it made and keeps it);
- `shard(items)` / `gather(parts)`: each rank's contiguous share of a list, and every rank's results concatenated
  in rank order, so the whole comes back in its original order;
- `from_main(fn)`: rank 0 computes, every rank gets its answer; `barrier()`: every rank has reached this point;
- `join_submitit_task()`: a SLURM job with several tasks (submitit) becomes the process group those tasks form;
- `one_gpu(...)`: a plain launch on a machine with several GPUs keeps to one (the Trainer would otherwise wrap the
  model in `nn.DataParallel`), and says how to use them all.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Scale:
    """How many processes run this job, on how many nodes, started by what."""

    processes: int
    nodes: int
    launcher: str  # python (one process), torchrun, accelerate, submitit

    def as_dict(self) -> dict:
        return asdict(self)

    def launch_prefix(self) -> list[str]:
        """The start of the command line that launches this many processes as this launcher does. Over several
        nodes it is torchrun's, run on each node, meeting at rank 0's address (accelerate's would need each node's
        own --machine_rank)."""
        if self.processes == 1 and self.launcher == "python":
            return ["python", "-m"]
        per_node = max(1, self.processes // self.nodes)
        if self.launcher == "accelerate" and self.nodes == 1:
            return ["accelerate", "launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
                    str(self.processes), "-m"]
        if self.nodes == 1:
            return ["torchrun", "--nproc_per_node", str(per_node), "-m"]
        meet = f"{os.environ.get('MASTER_ADDR', 'RANK0_HOST')}:{os.environ.get('MASTER_PORT', '29500')}"
        return ["torchrun", "--nnodes", str(self.nodes), "--nproc_per_node", str(per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", meet, "-m"]


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def scale() -> Scale:
    """This job's processes, nodes and launcher, as the launcher's environment says (torchrun and accelerate set
    WORLD_SIZE and LOCAL_WORLD_SIZE; submitit's tasks get them from `join_submitit_task`)."""
    processes = _int_env("WORLD_SIZE", 1)
    per_node = _int_env("LOCAL_WORLD_SIZE", processes) or processes
    if os.environ.get("SUBMITIT_EXECUTOR") and "RANK" in os.environ:
        launcher = "submitit"
    elif "ACCELERATE_MIXED_PRECISION" in os.environ and processes > 1:  # what `accelerate launch` always sets
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in os.environ or processes > 1:
        launcher = "torchrun"
    else:
        launcher = "python"
    return Scale(processes, max(1, processes // per_node), launcher)


def rank() -> int:
    return _int_env("RANK", 0)


def is_main_process() -> bool:
    """Rank 0 (and the only process without a launcher): the one that writes files, logs and speaks."""
    return rank() == 0


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """`fn` runs on rank 0 only; on any other rank the call does nothing and returns None."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def distributed() -> bool:
    return scale().processes > 1


def who() -> str:
    """`rank 1 of 2: ` in a data-parallel run, to begin a line one rank says; '' for a single process."""
    s = scale()
    return f"rank {rank()} of {s.processes}: " if s.processes > 1 else ""


def start(timeout_s: float, cpu: bool) -> None:
    """The process group of a data-parallel run, made once with `trainer.ddp_timeout` (accelerate's `PartialState`,
    as the Trainer makes it: gloo on a CPU, NCCL on GPUs). Nothing for a single process."""
    if not distributed():
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=cpu or not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))


def _state():
    from accelerate import PartialState

    return PartialState()


@contextmanager
def shard(items: list[T]) -> Iterator[list[T]]:
    """This rank's contiguous share of `items` (all of them for a single process)."""
    if not distributed():
        yield items
        return
    with _state().split_between_processes(items) as mine:
        yield list(mine)


def gather(parts: list[T]) -> list[T]:
    """Every rank's `parts`, concatenated in rank order, on every rank (`parts` itself for a single process)."""
    if not distributed():
        return parts
    from accelerate.utils import gather_object

    return gather_object(list(parts))  # all_gather_object, then the ranks' lists joined in rank order


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` computed on rank 0, its value given to every rank."""
    if not distributed():
        return fn()
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([fn() if is_main_process() else None])[0]


def barrier() -> None:
    if distributed():
        _state().wait_for_everyone()


@contextmanager
def quiet_replica() -> Iterator[None]:
    """On a rank other than 0: no console output of its own. Its prints, progress bars, warnings and the libraries'
    lines, which rank 0 says once, go nowhere (`sys.stdout` and `sys.stderr`); a failure this rank must say goes
    to the terminal itself (`speak`), and a bug's traceback too (the streams are back before it is printed).
    Rank 0 is untouched."""
    if is_main_process():
        yield
        return
    os.environ.update({"TRANSFORMERS_VERBOSITY": "error", "WANDB_SILENT": "true"})  # read where each is imported
    stdout, stderr = sys.stdout, sys.stderr
    with open(os.devnull, "w") as null, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.stdout = sys.stderr = null
        try:
            yield
        finally:
            sys.stdout, sys.stderr = stdout, stderr


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is this rank's view of another rank's end: a collective that failed because a peer is gone
    (torch.distributed's own error types; gloo raises a plain RuntimeError from inside torch.distributed or DDP)."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    innermost = frames[-1].filename.replace(os.sep, "/") if frames else ""
    return isinstance(err, RuntimeError) and ("/torch/distributed/" in innermost
                                              or innermost.endswith("/torch/nn/parallel/distributed.py"))


def record_for_launcher(line: str) -> None:
    """`line` as this process's error record for torchrun (TORCHELASTIC_ERROR_FILE, in the form its own `record`
    writes), so the launcher's summary gives it as the failure's cause instead of "<N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        stamp = str(int(time.time()))
        with open(path, "w", encoding="utf-8") as out:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}, out)


def speak(line: str) -> None:
    """One line to the terminal from any rank, whatever `quiet_replica` silenced: on a line of its own, as rank 0's
    progress bar may have left the terminal's line unfinished."""
    print(f"\n{line}", file=sys.__stderr__, flush=True)


def join_submitit_task() -> bool:
    """In a submitit job with several tasks (`hydra.launcher.tasks_per_node` x `nodes`), this task's rank and the
    group's address from submitit's own environment (`TorchDistributedEnvironment`), for the process group to
    form as under torchrun. The GPUs stay as the scheduler gave them: each rank takes `cuda:LOCAL_RANK`. True when
    this task joined a group of several."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return False
    import submitit

    environment = submitit.JobEnvironment()
    if environment.num_tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: tasks on one machine do not fight for its cores
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
    return True


def gpu_count() -> int:
    """The machine's NVIDIA GPUs, asked of nvidia-smi: asking torch would start CUDA before a GPU is chosen."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def visible_gpus(count: int) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES where it is set, else all `count`."""
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return [str(i) for i in range(count)]
    return [g for g in (part.strip() for part in chosen.split(",")) if g]


def one_gpu(command_args: list[str], module: str = "gsm8k_lora.train", hint: str | None = None) -> str | None:
    """A single process that sees several GPUs keeps to the first (transformers' Trainer would spread it over all of
    them with `nn.DataParallel`, slower than one GPU for LoRA and unlike any launch the docs give). Called before
    anything starts CUDA. Returns the line to say (how to use all of them: the torchrun command, or `hint`), or
    None where there is nothing to do: a launcher's process (it has its GPU), one GPU or none."""
    if distributed() or "LOCAL_RANK" in os.environ:
        return None
    gpus = visible_gpus(gpu_count())
    if len(gpus) <= 1:
        return None
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[0]
    if hint is None:
        hint = shlex.join([*Scale(len(gpus), 1, "torchrun").launch_prefix(), module, *command_args])
        if not any(a.startswith("hydra.run.dir=") for a in command_args):
            hint += " hydra.run.dir=outputs/runs/NAME"
    return (f"this machine has {len(gpus)} GPUs; this run uses one (CUDA_VISIBLE_DEVICES={gpus[0]}). To use all "
            f"{len(gpus)}: {hint}")


def command_line(module: str, args: list[str]) -> str:
    """The command as launched: `python -m gsm8k_lora.train ...`, or under torchrun `torchrun --nproc_per_node 2 -m
    gsm8k_lora.train ...` (the launcher's own arguments are not visible to its processes: rebuilt from its
    environment)."""
    return shlex.join([*scale().launch_prefix(), module, *args])


def describe(s: Scale) -> str:
    """`2 processes (torchrun, 1 node)`, for the console and the report."""
    if s.processes == 1:
        return "1 process"
    nodes = f", {s.nodes} nodes" if s.nodes > 1 else ", 1 node"
    return f"{s.processes} processes ({s.launcher}{nodes})"


def recorded(run_record: dict) -> Scale | None:
    """The scale an earlier run recorded in its environment.json (None where it recorded none)."""
    found: Any = run_record.get("scale")
    if not isinstance(found, dict) or "processes" not in found:
        return None
    return Scale(int(found["processes"]), int(found.get("nodes", 1)), str(found.get("launcher", "python")))
