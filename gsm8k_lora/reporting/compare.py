"""The comparison of a sweep's runs, from what each job wrote in its directory (metrics, eval metrics,
log history, status markers, Hydra overrides): a table with the best run marked, as `comparison.csv` and
`comparison.md`, and the figures `accuracy_grid` and `val_loss_curves`. Built here, written by the caller
(`python -m gsm8k_lora.compare`, the sweep report).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from gsm8k_lora.records import read_config, read_json
from gsm8k_lora.reporting import plots

COLUMNS = ("job", "status", "overrides", "eval_loss_best", "protocol", "n", "baseline_acc", "baseline_ci95",
           "finetuned_acc", "finetuned_ci95", "difference", "mcnemar_p", "finetuned_loop_rate", "train_runtime_s",
           "error")


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def read_job(job_dir: Path) -> dict:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    failed = read_json(job_dir / "failed.json")
    status = "done" if (job_dir / "done.json").exists() else ("failed" if failed else "incomplete")
    config = read_config(job_dir)
    return {"job": job_dir.name, "dir": job_dir, "status": status, "overrides": overrides or [],
            "protocol": (config.get("eval") or {}).get("prompt"),
            "metrics": read_json(job_dir / "metrics.json"), "eval": read_json(job_dir / "eval_metrics.json"),
            "history": read_json(job_dir / "log_history.json").get("log_history", []), "error": failed.get("error")}


def varying(jobs: list[dict]) -> list[str]:
    """The override keys whose value differs between jobs: what the sweep is about."""
    values: dict[str, set] = {}
    for job in jobs:
        for item in job["overrides"]:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1 or len(jobs) == 1]


def _ci(ev: dict, model: str) -> str:
    key = f"{model}_gsm8k_by_value"
    if f"{key}_ci95_low" not in ev:
        return ""
    return f"[{ev[key + '_ci95_low']:.3f}, {ev[key + '_ci95_high']:.3f}]"


def rows_of(jobs: list[dict]) -> list[dict]:
    keys = varying(jobs)
    rows = []
    for job in jobs:
        m, ev = job["metrics"], job["eval"]
        shown = [o for o in job["overrides"] if o.partition("=")[0] in keys]
        rows.append({
            "job": job["job"], "status": job["status"], "overrides": " ".join(shown),
            "eval_loss_best": m.get("eval_loss_best"), "protocol": job["protocol"] if ev else None,
            "n": ev.get("finetuned_n", ev.get("baseline_n")),
            "baseline_acc": ev.get("baseline_gsm8k_by_value"), "baseline_ci95": _ci(ev, "baseline"),
            "finetuned_acc": ev.get("finetuned_gsm8k_by_value"), "finetuned_ci95": _ci(ev, "finetuned"),
            "difference": ev.get("paired_by_value_difference"), "mcnemar_p": ev.get("paired_by_value_mcnemar_p"),
            "finetuned_loop_rate": ev.get("finetuned_repetition_loop_rate"),
            "train_runtime_s": m.get("train_runtime_s"), "error": job["error"] or "",
        })
    return rows


def best_job(rows: list[dict]) -> str | None:
    """Highest fine-tuned GSM8K accuracy (lowest validation loss breaks ties, or decides without eval)."""
    done = [r for r in rows if r["status"] == "done"]
    scored = [r for r in done if r["finetuned_acc"] is not None]
    if scored:
        return max(scored, key=lambda r: (r["finetuned_acc"], -(r["eval_loss_best"] or 0)))["job"]
    with_loss = [r for r in done if r["eval_loss_best"] is not None]
    return min(with_loss, key=lambda r: r["eval_loss_best"])["job"] if with_loss else None


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(rows: list[dict], best: str | None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(row[c]) for c in COLUMNS]
        if row["job"] == best:
            cells[0] = f"**{cells[0]} (best)**"
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\n\nAccuracy is GSM8K accuracy of generated answers graded by the package's by-value rule (the "
            "headline: first `#### N`, else the last explicit final statement, else the last number, compared by "
            "value), on the same n questions for baseline and fine-tuned, asked as `protocol` (the run's eval.prompt; "
            "each job's report.md has lm-eval's strict-match and flexible-extract beside it); 95% Wilson intervals; "
            "p: exact McNemar test; finetuned_loop_rate: share of fine-tuned answers caught in a repetition loop.")
    return "\n".join(lines) + note + "\n"


def to_csv(rows: list[dict], best: str | None) -> str:
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, "best"], lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{c: row[c] for c in COLUMNS}, "best": row["job"] == best})
    return handle.getvalue()


@dataclass
class Comparison:
    jobs: list[dict]
    rows: list[dict]
    best: str | None
    files: dict[str, str]  # file name -> text
    figures: dict[str, Figure]


def compare(sweep_dir: Path) -> Comparison:
    jobs = [read_job(d) for d in job_dirs(sweep_dir)]
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (0/, 1/, ...): is it a sweep directory?")
    rows = rows_of(jobs)
    best = best_job(rows)
    files = {"comparison.csv": to_csv(rows, best), "comparison.md": to_markdown(rows, best)}
    figures = {"accuracy_grid": plots.accuracy_grid(jobs), "val_loss_curves": plots.val_loss_curves(jobs)}
    return Comparison(jobs, rows, best, files, {k: v for k, v in figures.items() if v is not None})
