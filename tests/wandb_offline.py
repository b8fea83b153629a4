"""What a W&B dashboard gets from an offline run, read back with wandb's own reader of its `.wandb` file
(`wandb leet inspect`), not from what the package meant to log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WANDB = str(Path(sys.executable).parent / "wandb")


def run_file(directory: Path) -> Path:
    """The one offline run logged in `directory` (a run directory, or a sweep's for its summary run)."""
    (found,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    return found


def _inspect(path: Path, *flags: str) -> str:
    return subprocess.run([WANDB, "leet", "inspect", "--json", *flags, str(path)], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in _inspect(run_file(directory)).splitlines() if line.strip()]


def read_run(directory: Path) -> dict:
    """name, group, job_type, tags, notes, config, summary; tables (summary key -> columns and data), images (keys)
    and artifacts (each logged artifact's record: name, type, digest, aliases, metadata as text, manifest)."""
    path = run_file(directory)
    state = json.loads(_inspect(path, "--summary"))
    logged = records(directory)
    (run,) = [r["run"] for r in logged if r["type"] == "run"][:1]
    summary = state["summary"]
    tables = {}
    for key, value in summary.items():
        if isinstance(value, dict) and value.get("_type") == "table-file":
            tables[key] = json.loads((path.parent / "files" / value["path"]).read_text())
    images = {key for key, value in summary.items() if isinstance(value, dict) and value.get("_type") == "image-file"}
    artifacts = [r["artifact"] for r in logged if r["type"] == "artifact"]
    return {"name": run.get("display_name"), "group": run.get("run_group"), "job_type": run.get("job_type"),
            "tags": run.get("tags", []), "notes": state.get("notes", ""),
            "config": {k: v for k, v in state["config"].items() if k != "_wandb"},
            "summary": summary, "tables": tables, "images": images, "artifacts": artifacts}


def history(directory: Path) -> dict[str, list]:
    """Every logged metric's values, in logging order."""
    out: dict[str, list] = {}
    for record in records(directory):
        if record["type"] == "history":
            for key, value in record["history"]["item"].items():
                out.setdefault(key, []).append(value)
    return out
