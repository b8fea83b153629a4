"""The comparison of a sweep's runs, from what each job wrote in its directory (config, metrics, eval metrics,
log history, status markers, Hydra overrides) and the sweep's own record: one row per job with its swept values
and headline figures with their 95% intervals, the best run of each protocol marked. The same rows go to
`comparison.csv`, `comparison.md`, the sweep report and the W&B summary run's table (`tracking.py`), so the
local comparison and the dashboard's agree. Built here, written by the caller.

Runs asked in different ways are kept apart: a job's `protocol` names its prompt and decoding (greedy, or
maj@k of k samples at a temperature), its headline figure is that decoding's (maj@k when sampled), and the
best run is chosen within each protocol.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from gsm8k_lora import figures as F
from gsm8k_lora import naming
from gsm8k_lora.errors import DataError
from gsm8k_lora.figures import read
from gsm8k_lora.reporting import plots
from gsm8k_lora.rundir import read_config, read_json


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def read_overrides(job_dir: Path) -> list[str]:
    """The overrides Hydra recorded for a job (`.hydra/overrides.yaml`): a YAML list; DataError naming the file."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(overrides, list):
        raise DataError(f"{path}: expected a YAML list of overrides, got {type(overrides).__name__}")
    return [str(o) for o in overrides]


def read_job(job_dir: Path) -> dict:
    overrides = read_overrides(job_dir)
    failed = read_json(job_dir / "failed.json")
    status = "done" if (job_dir / "done.json").exists() else ("failed" if failed else "incomplete")
    return {"job": job_dir.name, "dir": job_dir, "status": status, "overrides": overrides or [],
            "config": read_config(job_dir), "metrics": read_json(job_dir / "metrics.json"),
            "eval": read_json(job_dir / "eval_metrics.json"), "wandb": read_json(job_dir / "wandb_run.json"),
            "history": read_json(job_dir / "log_history.json").get("log_history", []), "error": failed.get("error")}


def swept(sweep_dir: Path, jobs: list[dict]) -> list[str]:
    """The keys the sweep varied: from its record, else the override keys whose value differs between jobs."""
    recorded = read_json(sweep_dir / "sweep.json").get("swept")
    if recorded:
        return list(recorded)
    values: dict[str, set] = {}
    for job in jobs:
        for item in job["overrides"]:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1]


def headline(ev: dict) -> str:
    """The figure a job's protocol is judged by: maj@k when it sampled, else by-value."""
    return F.headline(F.sampled_k(ev))


def protocol(job: dict) -> str:
    ecfg = job["config"].get("eval") or {}
    if not ecfg:
        return ""
    samples = ecfg.get("num_samples", 1)
    decoding = "greedy" if samples == 1 else f"maj@{samples} of {samples} samples at T={ecfg.get('temperature')}"
    return f"{ecfg.get('prompt')}, {decoding}"


def row_of(job: dict, keys: list[str]) -> dict:
    m, ev = job["metrics"], job["eval"]
    values = {naming.override_key(o): o.partition("=")[2] for o in job["overrides"]}
    rule = headline(ev)
    pair = F.pair_name(rule)
    row = {"job": job["job"], "status": job["status"], **{naming.short(k): values.get(k) for k in keys},
           "protocol": protocol(job) if ev else None, "rule": rule if ev else None,
           "n": read(ev, F.figure("finetuned", "n")) or read(ev, F.figure("baseline", "n"))}
    for model in F.MODELS:
        row[model] = read(ev, F.figure(model, rule))
        row.update(zip(F.column_interval(model), (read(ev, bound) for bound in F.interval(model, rule)), strict=True))
    row.update({"difference": read(ev, F.paired(pair, "difference")),
                "mcnemar_p": read(ev, F.paired(pair, "mcnemar_p")),
                "finetuned_strict_match": read(ev, F.figure("finetuned", F.STRICT_MATCH.figure)),
                "finetuned_flexible_extract": read(ev, F.figure("finetuned", F.FLEXIBLE_EXTRACT.figure)),
                "finetuned_loop_rate": read(ev, F.figure("finetuned", "repetition_loop_rate")),
                "eval_loss_best": read(m, F.curve("eval_loss", "best")), "train_runtime_s": read(m, "train_runtime_s"),
                "wandb_run": job["wandb"].get("id"), "error": job["error"] or ""})
    return row


def best_jobs(rows: list[dict]) -> dict[str, str]:
    """The best done job of each protocol: highest fine-tuned headline accuracy (the lower validation loss breaks a
    tie); without evaluation, the lowest validation loss."""
    best: dict[str, str] = {}
    done = [r for r in rows if r["status"] == "done"]
    for name in dict.fromkeys(r["protocol"] for r in done):
        group = [r for r in done if r["protocol"] == name]
        scored = [r for r in group if r["finetuned"] is not None]
        if scored:
            best[name] = max(scored, key=lambda r: (r["finetuned"], -(r["eval_loss_best"] or 0)))["job"]
        elif with_loss := [r for r in group if r["eval_loss_best"] is not None]:
            best[name] = min(with_loss, key=lambda r: r["eval_loss_best"])["job"]
    return best


@dataclass
class Comparison:
    jobs: list[dict]
    rows: list[dict]
    swept: list[str]  # short names of the swept keys: the rows' first columns after job and status
    best: dict[str, str]  # protocol -> its best job
    files: dict[str, str]  # file name -> text
    plots: dict[str, Figure]  # only what could be drawn

    @property
    def columns(self) -> list[str]:
        return ["job", "status", *self.swept, "protocol", "rule", "n", *F.COMPARISON, "wandb_run", "error"]


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        percent = column in ("baseline", "finetuned", "difference") or column.startswith("finetuned_")
        return f"{value:.1%}" if percent else f"{value:.4g}"
    return str(value)


def to_markdown(comparison: Comparison) -> str:
    """One table per protocol, each with its best run marked; accuracies with their 95% intervals."""
    head = ["job", "status", *comparison.swept, "n", "baseline [95% CI]", "fine-tuned [95% CI]",
            "difference (McNemar p)", "lm-eval strict / flexible", "loops", "best eval loss", "error"]
    out = []
    for name in dict.fromkeys(r["protocol"] for r in comparison.rows):
        rows = [r for r in comparison.rows if r["protocol"] == name]
        rule = next((r["rule"] for r in rows if r["rule"]), None)
        out += [f"Protocol: {name or 'not evaluated'}" + (f"; accuracy: {rule}" if rule else ""), "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            job = f"**{r['job']} (best)**" if comparison.best.get(name) == r["job"] else r["job"]
            cells = [job, r["status"], *(_cell("", r[k]) for k in comparison.swept), _cell("n", r["n"]),
                     _interval(r, "baseline"), _interval(r, "finetuned"),
                     "" if r["difference"] is None else f"{r['difference']:+.1%} (p={r['mcnemar_p']:.3g})",
                     " / ".join(_cell("finetuned_", r[k]) for k in ("finetuned_strict_match",
                                                                    "finetuned_flexible_extract")),
                     _cell("finetuned_", r["finetuned_loop_rate"]), _cell("", r["eval_loss_best"]), r["error"]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    note = ("Accuracy: GSM8K accuracy of generated answers on the same n questions for baseline and fine-tuned, by "
            "the package's by-value rule (maj@k of the samples where the protocol sampled), with 95% Wilson "
            "intervals; p: exact McNemar test; strict / flexible: lm-eval's rules on the fine-tuned answers; loops: "
            "share of fine-tuned answers caught in a repetition loop.")
    return "\n".join(out) + note + "\n"


def _interval(row: dict, model: str) -> str:
    if row[model] is None:
        return ""
    low, high = (row[column] for column in F.column_interval(model))
    return f"{row[model]:.1%}" + ("" if low is None else f" [{low:.1%}, {high:.1%}]")


def to_csv(comparison: Comparison) -> str:
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=[*comparison.columns, "best"], lineterminator="\r\n")
    writer.writeheader()
    for row in comparison.rows:
        writer.writerow({**{c: row[c] for c in comparison.columns},
                         "best": comparison.best.get(row["protocol"]) == row["job"]})
    return handle.getvalue()


def compare(sweep_dir: Path) -> Comparison:
    jobs = [read_job(d) for d in job_dirs(sweep_dir)]
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (0/, 1/, ...): is it a sweep directory?")
    keys = swept(sweep_dir, jobs)
    rows = [row_of(job, keys) for job in jobs]
    comparison = Comparison(jobs, rows, [naming.short(k) for k in keys], best_jobs(rows), {}, {})
    comparison.files = {"comparison.csv": to_csv(comparison), "comparison.md": to_markdown(comparison)}
    drawn = {"accuracy_grid": plots.accuracy_grid(rows, comparison.swept),
               "val_loss_curves": plots.val_loss_curves(jobs, rows, comparison.swept)}
    comparison.plots = {k: v for k, v in drawn.items() if v is not None}
    return comparison
