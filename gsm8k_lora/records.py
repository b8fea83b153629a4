"""The run directory, the unit of truth: every file a run writes, written here.

    config.yaml        resolved config          environment.json   versions, commit, command, device, weights
    metrics.json       figures of training      log_history.json   every logged step
    eval_metrics.json  GSM8K accuracy           predictions.jsonl  graded answers, baseline and fine-tuned
    report.md, *.png   report and its plots     done.json / failed.json   job status (a sweep re-runs the rest)
    adapter/, checkpoints/, wandb_run.txt: written by the Trainer and by `tracking.py`

`done.json` is written last, after every result file; a job directory without it is incomplete, so a sweep
started again re-runs only what is missing or failed. Each file is written whole or not at all (written
beside, then renamed): a reader never sees half a file.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import traceback
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora.errors import ConfigError

PACKAGES = ("gsm8k_lora", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "hydra-core", "wandb",
            "bitsandbytes")
DONE, FAILED = "done.json", "failed.json"


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and always without them): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def write_text(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def read_config(run_dir: Path) -> dict:
    """A run directory's resolved config.yaml as plain data ({} if it has none)."""
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None) or {}


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    import torch  # deferred for start-up time: `report` and `compare` read run directories without torch

    cuda = torch.cuda.is_available()
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
    }


def write_run_record(run_dir: Path, raw_cfg: DictConfig, model_weights: dict) -> dict:
    """config.yaml (resolved) and environment.json; returns the resolved config, as W&B logs it."""
    resolved = OmegaConf.to_container(raw_cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    write_json(run_dir / "environment.json", {**environment(), "model_weights": model_weights})
    return resolved


def write_figures(directory: Path, figures: dict[str, Figure | None]) -> list[Path]:
    """Each figure as `<name>.png` in `directory` (None: nothing was drawn, nothing is written)."""
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        path = directory / f"{name}.png"
        tmp = directory / f".{name}.png.tmp"
        figure.savefig(tmp, format="png")
        tmp.replace(path)
        paths.append(path)
    return paths


def write_training(run_dir: Path, metrics: dict, history: list[dict], figures: dict[str, Figure]) -> None:
    """metrics.json, log_history.json and the loss plot, written before evaluation so a failure there loses none."""
    write_json(run_dir / "log_history.json", {"log_history": history})
    write_figures(run_dir, figures)
    write_json(run_dir / "metrics.json", metrics)


def write_eval(run_dir: Path, predictions: dict[str, list[dict]], metrics: dict) -> None:
    write_text(run_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for rs in predictions.values() for r in rs))
    write_json(run_dir / "eval_metrics.json", metrics)


def read_predictions(run_dir: Path) -> list[dict]:
    path = run_dir / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def resolve_adapter(path: str) -> str:
    root = Path(path).expanduser()
    if (root / "adapter_config.json").exists():
        return str(root)
    if (root / "adapter" / "adapter_config.json").exists():
        return str(root / "adapter")
    raise ConfigError(f"adapter={path!r} is invalid: expected a LoRA adapter directory "
                      "or a run directory with adapter/")


def run_directory(adapter: str | None) -> Path | None:
    """The run directory an `adapter=` path belongs to (it holds config.yaml), or None for a bare adapter."""
    if not adapter:
        return None
    root = Path(adapter).expanduser()
    candidates = [root]
    if root.name == "adapter":  # RUN/adapter
        candidates.append(root.parent)
    if root.parent.name == "checkpoints":  # RUN/checkpoints/checkpoint-N
        candidates.append(root.parent.parent)
    return next((c for c in candidates if (c / "config.yaml").exists()), None)


def completed(job_dir: Path, overrides: list[str]) -> dict | None:
    """The done marker of this job if it finished with these same overrides, else None."""
    record = read_json(job_dir / DONE)
    return record if record and record.get("overrides") == overrides else None


def mark_done(job_dir: Path, overrides: list[str], objective: str, value: float | None) -> None:
    (job_dir / FAILED).unlink(missing_ok=True)
    write_json(job_dir / DONE, {"overrides": overrides, "objective": objective, "value": value})


def mark_failed(job_dir: Path, overrides: list[str], err: BaseException) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f"{last[0].filename}:{last[0].lineno}" if last else None
    write_json(job_dir / FAILED, {"overrides": overrides, "error": f"{type(err).__name__}: {err}", "where": where})
