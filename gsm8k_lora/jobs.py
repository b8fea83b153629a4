"""Job status markers, so a sweep started again re-runs only what is missing or failed.

`done.json` is written last, after every result file; a job directory without it is incomplete.
`failed.json` records the error of a failed job for `compare` to list.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from gsm8k_lora.tracking import write_json

DONE, FAILED = "done.json", "failed.json"


def completed(job_dir: Path, overrides: list[str]) -> dict | None:
    """The done marker of this job if it finished with these same overrides, else None."""
    import json

    marker = job_dir / DONE
    if not marker.exists():
        return None
    record = json.loads(marker.read_text(encoding="utf-8"))
    return record if record.get("overrides") == overrides else None


def mark_done(job_dir: Path, overrides: list[str], objective: str, value: float | None) -> None:
    (job_dir / FAILED).unlink(missing_ok=True)
    write_json(job_dir / DONE, {"overrides": overrides, "objective": objective, "value": value})


def mark_failed(job_dir: Path, overrides: list[str], err: BaseException) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f"{last[0].filename}:{last[0].lineno}" if last else None
    write_json(job_dir / FAILED, {"overrides": overrides, "error": f"{type(err).__name__}: {err}", "where": where})
