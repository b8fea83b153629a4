"""The comparison of a sweep's runs, from what each job wrote in its directory (config, metrics, eval metrics,
predictions, log history, status markers, Hydra overrides) and the sweep's own record: a row per setting (the
swept values but the seed) with its headline figures, their 95% intervals or, over several seeds, their mean and
standard deviation, and its test against the best (`ranking.py`); and, where a setting ran several seeds, a row
per job below. The same rows go to `comparison.csv`, `comparison.md`, the sweep report and the W&B summary
run's table (`tracking.py`), so the local comparison and the dashboard's agree. Built here, written by the caller.

Runs asked in different ways are kept apart: a job's `protocol` names its prompt and decoding (greedy, or
maj@k of k samples at a temperature), its headline figure is that decoding's (maj@k when sampled), and the
settings are ranked within each protocol.
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
from gsm8k_lora.reporting import plots, ranking
from gsm8k_lora.reporting.ranking import Ranking
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
    fallback = job["config"].get("experiment_name") or "the one setting"
    row = {"level": "job", "dir": job["dir"], "setting": naming.setting_name(job["overrides"], keys, fallback),
           "job": job["job"],
           "status": job["status"], **{naming.short(k): values.get(k) for k in keys}, "seeds": None,
           "protocol": protocol(job) if ev else None, "rule": rule if ev else None,
           "n": read(ev, F.figure("finetuned", "n")) or read(ev, F.figure("baseline", "n")), "best": "",
           **{F.spread(c): None for c in F.SPREAD}, **dict.fromkeys(F.VS_BEST)}
    for model in F.MODELS:
        row[model] = read(ev, F.figure(model, rule))
        row.update(zip(F.column_interval(model), (read(ev, bound) for bound in F.interval(model, rule)), strict=True))
    row.update({"difference": read(ev, F.paired(pair, "difference")),
                "mcnemar_p": read(ev, F.paired(pair, "mcnemar_p")),
                "finetuned_strict_match": read(ev, F.figure("finetuned", F.STRICT_MATCH.figure)),
                "finetuned_flexible_extract": read(ev, F.figure("finetuned", F.FLEXIBLE_EXTRACT.figure)),
                "finetuned_loop_rate": read(ev, F.figure("finetuned", "repetition_loop_rate")),
                "eval_loss_best": read(m, F.curve("eval_loss", "best")), "train_runtime_s": read(m, "train_runtime_s"),
                "processes": read(m, "processes"), "global_batch": read(m, "global_batch"),
                "wandb_run": job["wandb"].get("id"), "error": job["error"] or ""})
    return row


@dataclass
class Comparison:
    jobs: list[dict]
    rows: list[dict]  # a row per job
    swept: list[str]  # short names of the swept keys (the seed among them where a sweep varied it)
    settings: list[dict]  # a row per (protocol, setting): its jobs' figures, its test against the best
    rankings: dict[str, Ranking]  # protocol -> its settings ranked
    files: dict[str, str]  # file name -> text
    plots: dict[str, Figure]  # only what could be drawn

    @property
    def columns(self) -> list[str]:
        return ["level", "setting", "job", "status", *self.swept, "seeds", "protocol", "rule", "n", *F.COMPARISON,
                *(F.spread(c) for c in F.SPREAD), *F.VS_BEST, "best", "wandb_run", "error"]

    @property
    def seeded(self) -> bool:
        """Whether a setting ran several seeds (its jobs then get rows of their own below the settings')."""
        return any((s["seeds"] or 0) > 1 for s in self.settings)

    @property
    def table(self) -> list[dict]:
        """The rows of comparison.csv and the W&B table: the settings, then, where they ran several seeds, the jobs."""
        return [*self.settings, *(self.rows if self.seeded else [])]

    def best_job(self, protocol_name: str) -> dict | None:
        return ranking.best_job(self.rankings[protocol_name], self.rows)

    @property
    def conclusion(self) -> str:
        """What the ranking concludes, each protocol's sentences (the W&B summary run's notes)."""
        lines = []
        for name, ranked in self.rankings.items():
            said = ranking.conclusion(ranked)
            lines += ([f"{name}:"] if len(self.rankings) > 1 and said else []) + said
        return "\n".join(lines)

    @property
    def summary_figures(self) -> dict:
        """The ranking's numbers for the W&B summary run, where the sweep asked in one way (numbers only)."""
        if len(self.rankings) != 1:
            return {}
        ranked = next(iter(self.rankings.values()))
        second = {} if ranked.tied else ranked.runner_up or {}  # in a tie, the tie says it all
        figures = {"settings": len(ranked.settings), "seeds": ranked.seeds, "tied_for_best": len(ranked.top),
                   "discordance": ranked.discordance, "minimum_detectable_difference": ranked.detectable,
                   "runner_up_difference": second.get("vs_best_difference"),
                   "runner_up_p_holm": second.get("vs_best_p_holm")}
        return {f"sweep/{k}": v for k, v in figures.items() if v is not None}

    @property
    def headline(self) -> str:
        """One line: each protocol's best setting, or its tie."""
        said = []
        for name, r in self.rankings.items():
            if r.reference is not None:
                said.append(f"tie of {', '.join(r.top)} ({name})" if r.tied else f"{r.reference} ({name})")
        return "; ".join(said) or "none"


def _cell(column: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        percent = column in ("baseline", "finetuned", "difference") or column.startswith("finetuned_")
        return f"{value:.1%}" if percent else f"{value:.4g}"
    return str(value)


def to_markdown(comparison: Comparison) -> str:
    """Per protocol: what to conclude (`ranking.conclusion`), a row per setting with its test against the best, and
    where settings ran several seeds, a row per job."""
    out = []
    for name, ranked in comparison.rankings.items():
        rule = ranked.rule or next((s["rule"] for s in ranked.settings if s["rule"]), None)
        out += [f"Protocol: {name or 'not evaluated'}" + (f"; accuracy: {ranking.rule_label(rule)}" if rule else ""),
                "", *ranking.conclusion(ranked), "", *_settings_table(ranked.settings, comparison.seeded), ""]
        if comparison.seeded:
            jobs = [r for r in comparison.rows if r["protocol"] == name]
            out += ["Per seed:", "", *_jobs_table(jobs, comparison.swept), ""]
    note = ("Accuracy: GSM8K accuracy of generated answers on the same n questions for baseline and fine-tuned, by "
            "the package's by-value rule (maj@k of the samples where the protocol sampled), with 95% Wilson "
            "intervals (over several seeds: mean ± standard deviation); difference: fine-tuned minus its own "
            "baseline, exact McNemar p; vs best: the setting's accuracy minus the best's on the same questions (and "
            "seeds), with its 95% interval (Bonett-Price), exact McNemar p and Holm's adjusted p over the settings "
            "compared; strict / flexible: lm-eval's rules on the fine-tuned answers; loops: share of fine-tuned "
            "answers caught in a repetition loop; processes (global batch): how many processes trained and the rows "
            "one optimizer step took, which another number of GPUs changes.")
    return "\n".join([*out, note]) + "\n"  # the note after a blank line: GitHub would read it as a table row


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _settings_table(settings: list[dict], seeded: bool) -> list[str]:
    head = ["setting", "job", "status", *(["seeds"] if seeded else []), "n", "baseline [95% CI]",
            "fine-tuned [95% CI]", "difference (McNemar p)", "vs best [95% CI]", "vs best p (Holm)",
            "lm-eval strict / flexible", "loops", "best eval loss", "processes (global batch)", "error"]
    out = [_row(head), "|" + "---|" * len(head)]
    for s in settings:
        label = {"best": f"**{s['setting']} (best)**", "tied": f"{s['setting']} (tied for best)",
                 "tied (reference)": f"{s['setting']} (tied for best; the reference)"}.get(s["best"], s["setting"])
        out.append(_row([label, s["job"], s["status"], *([str(s["seeds"])] if seeded else []), _cell("n", s["n"]),
                         _figure(s, "baseline"), _figure(s, "finetuned"), _difference(s), *_vs_best(s),
                         _lm_eval(s), _spread(s, "finetuned_loop_rate"), _spread(s, "eval_loss_best"), _scale(s),
                         s["error"]]))
    return out


def _jobs_table(rows: list[dict], swept: list[str]) -> list[str]:
    head = ["job", "status", *swept, "n", "baseline [95% CI]", "fine-tuned [95% CI]", "difference (McNemar p)",
            "lm-eval strict / flexible", "loops", "best eval loss", "error"]
    out = [_row(head), "|" + "---|" * len(head)]
    for r in rows:
        out.append(_row([r["job"], r["status"], *(_cell("", r[k]) for k in swept), _cell("n", r["n"]),
                         _figure(r, "baseline"), _figure(r, "finetuned"), _difference(r), _lm_eval(r),
                         _cell("finetuned_", r["finetuned_loop_rate"]), _cell("", r["eval_loss_best"]), r["error"]]))
    return out


def _scale(row: dict) -> str:
    """`2 (32)`: the processes that trained, and the rows one optimizer step took; runs of another scale differ."""
    return "" if row["processes"] is None else f"{row['processes']} ({row['global_batch']})"


def _figure(row: dict, model: str) -> str:
    """An accuracy with its 95% interval, or over several seeds its mean ± standard deviation."""
    if row[model] is None:
        return ""
    low, high = (row[column] for column in F.column_interval(model))
    if low is not None:
        return f"{row[model]:.1%} [{low:.1%}, {high:.1%}]"
    return _spread(row, model)


def _spread(row: dict, column: str) -> str:
    std = row.get(F.spread(column)) if column in F.SPREAD else None
    return _cell(column, row[column]) + ("" if std is None else f" ± {_cell(column, std)}")


def _difference(row: dict) -> str:
    if row["difference"] is None:
        return ""
    if row["mcnemar_p"] is None:  # a mean over seeds
        std = row[F.spread("difference")]
        return f"{row['difference']:+.1%}" + ("" if std is None else f" ± {std:.1%}")
    return f"{row['difference']:+.1%} (p={row['mcnemar_p']:.3g})"


def _vs_best(row: dict) -> tuple[str, str]:
    if row["best"] in ("best", "tied (reference)"):
        return ("reference", "")
    difference, low, high, p, holm = (row[c] for c in F.VS_BEST[:5])
    if difference is None:
        return ("", "")
    return (f"{difference:+.1%} [{low:+.1%}, {high:+.1%}]", f"{p:.3g} ({holm:.3g})")


def _lm_eval(row: dict) -> str:
    cells = [_spread(row, c) for c in ("finetuned_strict_match", "finetuned_flexible_extract")]
    return " / ".join(cells) if any(cells) else ""


def to_csv(comparison: Comparison) -> str:
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=comparison.columns, lineterminator="\r\n")
    writer.writeheader()
    for row in comparison.table:
        writer.writerow({c: row[c] for c in comparison.columns})
    return handle.getvalue()


def compare(sweep_dir: Path) -> Comparison:
    jobs = [read_job(d) for d in job_dirs(sweep_dir)]
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (0/, 1/, ...): is it a sweep directory?")
    keys = swept(sweep_dir, jobs)
    rows = [row_of(job, keys) for job in jobs]
    swept_short = [naming.short(k) for k in keys]
    settings = ranking.setting_rows(rows, swept_short)
    answered: dict[tuple, dict] = {}
    for row, job in zip(rows, jobs, strict=True):
        if row["status"] == "done" and job["eval"]:
            answered.setdefault((row["protocol"], row["setting"]), {}).update(ranking.answers(job))
    rankings = {}
    for name in dict.fromkeys(s["protocol"] for s in settings):
        rankings[name] = ranking.rank([s for s in settings if s["protocol"] == name],
                                      {label: a for (p, label), a in answered.items() if p == name})
    comparison = Comparison(jobs, rows, swept_short, settings, rankings, {}, {})
    comparison.files = {"comparison.csv": to_csv(comparison), "comparison.md": to_markdown(comparison)}
    drawn = {"accuracy_grid": plots.accuracy_grid(settings, [k for k in swept_short if k != ranking.SEED]),
             "val_loss_curves": plots.val_loss_curves(jobs, rows, comparison.swept)}
    comparison.plots = {k: v for k, v in drawn.items() if v is not None}
    return comparison
