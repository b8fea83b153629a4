"""The analysis report of a run or a sweep, built from the run directory's files alone.

`build(run_dir, price)` and `build_sweep(sweep_dir)` return the text of `report.md` and its figures; they
write nothing (the recipe and `python -m gsm8k_lora.report` write them). Every figure in the text is one
of the directory's figures or is computed from them here (`analysis.py`), never typed by hand.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from gsm8k_lora.evaluation import protocols
from gsm8k_lora.evaluation.diagnosis import ERROR_CATEGORIES, arithmetic_slips
from gsm8k_lora.evaluation.scoring import HEADLINE, LABELS, accuracy_by_steps
from gsm8k_lora.records import read_config, read_json, read_predictions, read_sweep
from gsm8k_lora.reporting import analysis, plots
from gsm8k_lora.reporting.compare import Comparison, compare, to_markdown
from gsm8k_lora.training.history import series


def load_run(run_dir: Path) -> dict:
    return {
        "config": read_config(run_dir),
        "environment": read_json(run_dir / "environment.json"),
        "metrics": read_json(run_dir / "metrics.json"),
        "history": read_json(run_dir / "log_history.json").get("log_history", []),
        "eval": read_json(run_dir / "eval_metrics.json"),
        "predictions": read_predictions(run_dir),
    }


def f(value, spec: str = ".4f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def during_training_rows(ecfg: dict, m: dict) -> str:
    if not ecfg.get("during_training"):
        return ""
    n = min(ecfg.get("during_training_limit") or 0, m.get("rows_validation") or 0)
    return f", GSM8K accuracy during training on {n} validation questions"


def overview(run: dict, price: float) -> list[str]:
    cfg, env, m = run["config"], run["environment"], run["metrics"]
    model, data, lora, tr = cfg.get("model", {}), cfg.get("data", {}), cfg.get("lora", {}), cfg.get("trainer", {})
    gpu_count = env.get("gpu_count", 0)
    gpu_hours, cost = analysis.cost_usd(m.get("train_runtime_s") or 0.0, gpu_count, price)
    cost_line = (f"- Cost: {gpu_hours:.3f} GPU-hours x ${price:.2f} per GPU-hour = **${cost:.2f}** "
                 f"(the price is `report.gpu_hour_price_usd`, an assumption to set to yours; training time only)"
                 if gpu_count else "- Cost: a CPU run, no GPU-hours.")
    return [
        "## 1. Overview",
        f"- Model: `{model.get('name_or_path')}` (dtype {model.get('dtype')}, 4-bit: {model.get('load_in_4bit')})",
        f"- Weights used: {m.get('model_weights') or 'not recorded'}",
        f"- System prompt: {m.get('system_prompt') or 'not recorded'}",
        weights_line(m),
        f"- Data: {data.get('source')} {data.get('path') or ''} — {m.get('rows_train')} train / "
        f"{m.get('rows_validation')} validation / {m.get('rows_test')} test rows; "
        f"{(m.get('rows_dropped_train') or 0) + (m.get('rows_dropped_test') or 0)} malformed rows dropped; "
        f"validation loss on {m.get('rows_validation_loss', m.get('rows_validation'))} validation rows"
        + during_training_rows(cfg.get("eval", {}), m),
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"bias={lora.get('bias')}, targets={lora.get('target_modules')}; {m.get('trainable_params')} trainable of "
        f"{m.get('total_params')} parameters",
        f"- Trainer: lr {tr.get('learning_rate')}, {length(tr, m)}, batch {tr.get('per_device_train_batch_size')} x "
        f"accumulation "
        f"{tr.get('gradient_accumulation_steps')}, bf16 {tr.get('bf16')}, early stopping patience "
        f"{tr.get('early_stopping_patience')}",
        f"- Hardware: {env.get('device')} ({gpu_count} GPU), {env.get('cpu_count')} CPU cores; "
        f"torch {env.get('packages', {}).get('torch')}, trl {env.get('packages', {}).get('trl')}",
        f"- Runtime: {f(m.get('train_runtime_s'), '.1f')} s training, {m.get('steps')} steps, "
        f"{m.get('tokens_seen')} tokens seen; stop: {m.get('stop_reason')}",
        cost_line,
    ]


def length(tr: dict, m: dict) -> str:
    """How long training was set to run, in the unit that decided it, and the steps it took."""
    planned = (f"{tr.get('num_train_epochs')} epochs" if (tr.get("max_steps") or -1) < 0
               else f"max_steps {tr.get('max_steps')}")
    return f"{planned} ({m.get('steps')} of {m.get('max_steps')} steps run)"


def weights_line(m: dict) -> str:
    loaded, full = m.get("weights_gib"), m.get("weights_gib_unquantised")
    if loaded is None or full is None:
        return "- Base weights: not recorded"
    def size(gib: float) -> str:
        return f"{gib:.3f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"

    saving = f", {1 - loaded / full:.0%} less" if loaded < full else ""
    return (f"- Base weights: {size(loaded)} as loaded, {size(full)} in {m.get('weights_unquantised_dtype')} "
            f"unquantised{saving}")


def loss_section(m: dict) -> list[str]:
    rows = ["| loss | first | last | best | decrease |", "|---|---|---|---|---|"]
    for key, name in (("train_loss", "train"), ("eval_loss", "validation")):
        rows.append(f"| {name} | {f(m.get(key + '_first'))} | {f(m.get(key + '_last'))} | {f(m.get(key + '_best'))} "
                    f"| {f(m.get(key + '_decrease_pct'), '.1f')}% |")
    return ["## 2. Loss", *rows, "", "![loss](loss.png)"]


def curve_section(run: dict) -> tuple[list[str], analysis.CurveReading]:
    reading = analysis.read_learning_curve(series(run["history"], "loss"), series(run["history"], "eval_loss"))
    early = run["metrics"].get("stop_reason") == "early_stopping"
    return ["## 3. Learning curve", f"- {reading.sentence}",
            f"- Early stopping {'fired' if early else 'did not fire'} "
            f"(stop reason: {run['metrics'].get('stop_reason')})."], reading


def token_accuracy_section(m: dict) -> list[str]:
    return ["## 4. Next-token accuracy (not GSM8K accuracy)",
            f"- Train next-token accuracy: first {f(m.get('train_token_accuracy_first'))}, last "
            f"{f(m.get('train_token_accuracy_last'))}; validation: first {f(m.get('eval_token_accuracy_first'))}, "
            f"last {f(m.get('eval_token_accuracy_last'))}.",
            "- This is the share of reference-solution tokens the model predicts as its top-1 next token under "
            "teacher forcing. It is not GSM8K accuracy (section 5): a model can predict most reference tokens and "
            "still get the final number wrong."]


RULE_TEXT = {  # what each rule extracts and how it compares, for the report's table
    "gsm8k_by_value": "first `#### N`, else the last explicit final statement, else the last number; compared by "
                      "value (`18.00` = `$18` = 18)",
    "gsm8k_by_value_strict": "the number after the first `####`, compared by value",
    "gsm8k_strict_match": "lm-eval's: first `#### (-?[0-9.,]+)`, exact string match",
    "gsm8k_flexible_extract": "lm-eval's: last `(-?[$0-9.,]{2,})\\|(-?[0-9]+)`, exact string match",
}


def gsm8k_section(ev: dict, cfg: dict) -> list[str]:
    if not ev:
        return ["## 5. GSM8K accuracy", "- Not evaluated (eval.enabled=false)."]
    ecfg = cfg.get("eval", {})
    prompt = ecfg["prompt"]
    out = ["## 5. GSM8K accuracy (generated answers, graded)",
           f"Protocol: {protocols.describe(ecfg)} (`eval.prompt={prompt}`); {ecfg['split']} split, "
           f"the same questions for both models. The headline is the by-value rule; lm-eval's figures are beside "
           f"it, computed as lm-eval computes them, to set against published lm-eval numbers.", "",
           "| figure | extraction rule | n | baseline [95% CI] | fine-tuned [95% CI] | difference (McNemar p) |",
           "|---|---|---|---|---|---|"]
    def cell(model: str, rule: str) -> str:
        key = f"{model}_{rule}"
        return f"{ev[key]:.1%} [{ev[key + '_ci95_low']:.1%}, {ev[key + '_ci95_high']:.1%}]" if key in ev else "n/a"

    def diff(short: str) -> str:
        key = f"paired_{short}_difference"
        return f"{ev[key]:+.1%} (p={ev[f'paired_{short}_mcnemar_p']:.3g})" if key in ev else "n/a"

    n = ev.get("finetuned_n", ev.get("baseline_n"))
    k = next((key.rpartition("@")[2] for key in ev if key.endswith(tuple("0123456789"))
              and "_gsm8k_maj@" in key), None)
    rules = dict(RULE_TEXT)
    if k is not None:  # sampled: the vote is the headline, the first sample one draw at the temperature
        rules = {f"gsm8k_maj@{k}": f"maj@{k}: the most common by-value answer of the {k} samples",
                 f"gsm8k_pass@{k}": f"pass@{k}: any of the {k} samples right, by value",
                 **{rule: f"{text} (the first sample)" for rule, text in RULE_TEXT.items()}}
    for rule, text in rules.items():
        headline = rule == (f"gsm8k_maj@{k}" if k is not None else HEADLINE)
        name = LABELS.get(rule, rule.removeprefix("gsm8k_")) + (" (the headline)" if headline else "")
        out.append(f"| {name} | {text} | {n} | {cell('baseline', rule)} | {cell('finetuned', rule)} | "
                   f"{diff(rule.removeprefix('gsm8k_'))} |")
    out += ["", "| model | answer format rate | ran to the token limit | repetition loops | mean tokens generated |",
            "|---|---|---|---|---|"]
    for model in ("baseline", "finetuned"):
        if f"{model}_n" in ev:
            rates = [ev.get(f"{model}_{k}", 0.0) for k in ("answer_format_rate", "hit_token_limit_rate",
                                                             "repetition_loop_rate")]
            out.append(f"| {model} | " + " | ".join(f"{r:.1%}" for r in rates)
                       + f" | {ev.get(f'{model}_generated_tokens_mean', 0):.0f} |")
    if "paired_answer_format_difference" in ev:
        out += ["", f"- Answer-format rate, fine-tuned minus baseline: {diff('answer_format')}."]
    if "paired_by_value_difference" in ev:
        after, before = ev["paired_by_value_only_finetuned_correct"], ev["paired_by_value_only_baseline_correct"]
        out += [f"- By-value, questions right only after fine-tuning: {after}; right only before: {before}."]
    if ev.get("note"):
        out.append(f"- {ev['note']}")
    return out


def failure_section(run: dict, by_steps: dict[str, list[tuple]]) -> list[str]:
    tuned = finetuned_records(run)
    if not tuned:
        return ["## 6. Where it fails", "- No predictions to analyse."]
    max_new = run["config"].get("eval", {}).get("max_new_tokens")  # for runs whose records lack hit_token_limit
    models = list(by_steps)
    rows = {}
    for model, groups in by_steps.items():
        for steps, n, acc, low, high in groups:
            rows.setdefault(steps, {"n": n})[model] = f"{acc:.1%} [{low:.1%}, {high:.1%}]"
    out = ["## 6. Where it fails", "By-value accuracy by the reasoning steps in the gold solution (95% intervals):",
           "", "| reasoning steps | questions | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models),
           *[f"| {s} | {r['n']} | " + " | ".join(r.get(m, "") for m in models) + " |" for s, r in sorted(rows.items())],
           "", "![accuracy by steps](accuracy_by_steps.png)", "",
           f"Why the {tuned[0]['model']} model's wrong answers are wrong:", "",
           "| error category | wrong answers |", "|---|---|"]
    breakdown = analysis.error_breakdown(tuned, max_new)
    out += [f"| {ERROR_CATEGORIES[k]} | {n} |" for k, n in breakdown["counts"].items()]
    for key, records in breakdown["examples"].items():
        out += ["", f"**{ERROR_CATEGORIES[key]}**"]
        for r in records:
            slips = arithmetic_slips(r["completion"])
            answered = (f"its last number {r['pred']}" if key == "no_final_answer" and r["pred"] is not None
                        else f"answered {r['pred']}")
            out += [f"- Q: {r['question']}  ", f"  gold {r['gold']}, {answered}"
                    + (f", false calculation `{slips[0]}`" if slips else "") + "  ",
                    "  completion: `" + r["completion"].replace("\n", " ⏎ ").replace("`", "'")[:400] + "`"]
    return out


def finetuned_records(run: dict) -> list[dict]:
    return [r for r in run["predictions"] if r["model"] == "finetuned"] or run["predictions"]


def build(run_dir: Path, price: float) -> tuple[str, dict[str, Figure]]:
    """The report of one run: its text and its figures (`loss` only where the run did not draw it)."""
    run = load_run(run_dir)
    if not run["metrics"]:
        raise FileNotFoundError(f"{run_dir} has no metrics.json: not a finished run directory")
    figures = {}
    if not (run_dir / "loss.png").exists():
        figures["loss"] = plots.loss_curves(run["history"])
    by_steps = {model: accuracy_by_steps([r for r in run["predictions"] if r["model"] == model])
                for model in ("baseline", "finetuned") if any(r["model"] == model for r in run["predictions"])}
    figures["accuracy_by_steps"] = plots.accuracy_by_steps(by_steps)
    curve_lines, reading = curve_section(run)
    early = run["metrics"].get("stop_reason") == "early_stopping"
    sections = [
        [f"# Report: {run_dir.name}", "", "Every figure below is read from this run directory's files."],
        overview(run, price), loss_section(run["metrics"]), curve_lines, token_accuracy_section(run["metrics"]),
        gsm8k_section(run["eval"], run["config"]), failure_section(run, by_steps),
        ["## 7. What to try next", *[f"- {s}" for s in analysis.next_steps(reading, early, run["eval"])]],
    ]
    text = "\n\n".join("\n".join(s) for s in sections) + "\n"
    return text, {name: fig for name, fig in figures.items() if fig is not None}


def build_sweep(sweep_dir: Path) -> tuple[str, dict[str, str], dict[str, Figure], Comparison]:
    """The report of a sweep: its text, the comparison files (name -> text), the figures it could draw (only
    those are linked) and the comparison itself (its rows are also the W&B summary run's table)."""
    comparison = compare(sweep_dir)
    sweep = read_sweep(sweep_dir)
    lines = [f"# Sweep report: {sweep.get('name', sweep_dir.name)}", "",
             f"W&B group: `{sweep['group']}`; swept: {', '.join(sweep.get('swept') or []) or 'nothing'}."
             if sweep else "", "", to_markdown(comparison)]
    failed = [r for r in comparison.rows if r["status"] != "done"]
    if failed:
        lines += ["## Jobs that did not finish", *[f"- job {r['job']} ({r['status']}): {r['error'] or 'no result'}"
                                                   for r in failed], ""]
    lines.append("## Learning curves")
    for row, job in zip(comparison.rows, comparison.jobs, strict=True):
        if job["history"]:
            reading = analysis.read_learning_curve(series(job["history"], "loss"), series(job["history"], "eval_loss"))
            lines.append(f"- job {row['job']} ({plots.job_label(row, comparison.swept)}): {reading.sentence}")
    for name, title in (("accuracy_grid", "accuracy over the grid"), ("val_loss_curves", "validation loss")):
        if name in comparison.figures:
            lines += ["", f"![{title}]({name}.png)"]
    return "\n".join(lines) + "\n", comparison.files, comparison.figures, comparison
