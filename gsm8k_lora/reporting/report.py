"""The analysis report of a run or a sweep, built from the run directory's files alone.

`build(run_dir, price)` and `build_sweep(sweep_dir)` return the text of `report.md` and its plots; they
write nothing (the recipe and `python -m gsm8k_lora.report` write them). Every figure in the text is one
of the directory's figures or is computed from them here (`analysis.py`), never typed by hand.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from gsm8k_lora import figures as F
from gsm8k_lora import parallel
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.evaluation.diagnosis import ERROR_CATEGORIES, arithmetic_slips
from gsm8k_lora.evaluation.scoring import CONTEXT_LABELS, accuracy_by_steps
from gsm8k_lora.figures import read
from gsm8k_lora.reporting import analysis, plots
from gsm8k_lora.reporting.compare import Comparison, compare, to_markdown
from gsm8k_lora.rundir import read_config, read_json, read_predictions, read_sweep
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
    n = min(ecfg.get("during_training_limit") or 0, read(m, 'rows_validation') or 0)
    return f", GSM8K accuracy during training on {n} validation questions"


def overview(run: dict, price: float) -> list[str]:
    cfg, env, m = run["config"], run["environment"], run["metrics"]
    model, data, lora, tr = cfg.get("model", {}), cfg.get("data", {}), cfg.get("lora", {}), cfg.get("trainer", {})
    processes = read(m, "processes") or 1
    gpu_count = processes if env.get("gpu_count") else 0  # one GPU a process (a plain launch keeps to one)
    gpu_hours, cost = analysis.cost_usd(read(m, 'train_runtime_s') or 0.0, gpu_count, price)
    cost_line = (f"- Cost: {gpu_hours:.3f} GPU-hours x ${price:.2f} per GPU-hour = **${cost:.2f}** "
                 f"(the price is `report.gpu_hour_price_usd`, an assumption to set to yours; training time only)"
                 if gpu_count else "- Cost: a CPU run, no GPU-hours.")
    return [
        "## 1. Overview",
        f"- Model: `{model.get('name_or_path')}` (dtype {model.get('dtype')}, 4-bit: {model.get('load_in_4bit')})",
        f"- Weights used: {read(m, 'model_weights') or 'not recorded'}",
        f"- System prompt: {read(m, 'system_prompt') or 'not recorded'}",
        weights_line(m),
        f"- Data: {data.get('source')} {data.get('path') or ''} — {read(m, 'rows_train')} train / "
        f"{read(m, 'rows_validation')} validation / {read(m, 'rows_test')} test rows; "
        f"{(read(m, 'rows_dropped_train') or 0) + (read(m, 'rows_dropped_test') or 0)} malformed rows dropped; "
        f"validation loss on {read(m, 'rows_validation_loss') or read(m, 'rows_validation')} validation rows"
        + during_training_rows(cfg.get("eval", {}), m),
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"bias={lora.get('bias')}, targets={lora.get('target_modules')}; {read(m, 'trainable_params')} trainable of "
        f"{read(m, 'total_params')} parameters",
        f"- Trainer: lr {tr.get('learning_rate')}, {length(tr, m)}, batch {tr.get('per_device_train_batch_size')} x "
        f"accumulation {tr.get('gradient_accumulation_steps')} x {processes} process{'es' * (processes > 1)} = "
        f"{read(m, 'global_batch') or 'n/a'} rows a step, {read(m, 'steps_per_epoch') or 'n/a'} steps an epoch; "
        f"bf16 {tr.get('bf16')}, early stopping patience {tr.get('early_stopping_patience')}",
        f"- Hardware: {env.get('device')} ({gpu_count} GPU), {env.get('cpu_count')} CPU cores, "
        f"{scale_words(m)}; "
        f"torch {env.get('packages', {}).get('torch')}, trl {env.get('packages', {}).get('trl')}",
        f"- Runtime: {f(read(m, 'train_runtime_s'), '.1f')} s training, {read(m, 'steps')} steps, "
        f"{read(m, 'tokens_seen')} tokens seen; stop: {read(m, 'stop_reason')}",
        cost_line,
    ]


def scale_words(m: dict) -> str:
    """How many processes trained, launched by what (`parallel.describe`), from metrics.json's scale."""
    scale = parallel.recorded({"scale": {k: read(m, k) for k in F.SCALE if read(m, k) is not None}})
    return parallel.describe(scale) if scale else "1 process"


def length(tr: dict, m: dict) -> str:
    """How long training was set to run, in the unit that decided it, and the steps it took."""
    planned = (f"{tr.get('num_train_epochs')} epochs" if (tr.get("max_steps") or -1) < 0
               else f"max_steps {tr.get('max_steps')}")
    return f"{planned} ({read(m, 'steps')} of {read(m, 'max_steps')} steps run)"


def weights_line(m: dict) -> str:
    loaded, full = read(m, 'weights_gib'), read(m, 'weights_gib_unquantised')
    if loaded is None or full is None:
        return "- Base weights: not recorded"
    def size(gib: float) -> str:
        return f"{gib:.3f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"

    saving = f", {1 - loaded / full:.0%} less" if loaded < full else ""
    return (f"- Base weights: {size(loaded)} as loaded, {size(full)} in {read(m, 'weights_unquantised_dtype')} "
            f"unquantised{saving}")


def loss_section(m: dict) -> list[str]:
    rows = ["| loss | first | last | best | decrease |", "|---|---|---|---|---|"]
    for curve, name in (("train_loss", "train"), ("eval_loss", "validation")):
        first, last, best, decrease = (read(m, F.curve(curve, stat)) for stat in ("first", "last", "best",
                                                                                   "decrease_pct"))
        rows.append(f"| {name} | {f(first)} | {f(last)} | {f(best)} | {f(decrease, '.1f')}% |")
    return ["## 2. Loss", *rows, "", "![loss](loss.png)"]


def curve_section(run: dict) -> tuple[list[str], analysis.CurveReading]:
    reading = analysis.read_learning_curve(series(run["history"], "loss"), series(run["history"], "eval_loss"))
    early = read(run['metrics'], 'stop_reason') == "early_stopping"
    return ["## 3. Learning curve", f"- {reading.sentence}",
            f"- Early stopping {'fired' if early else 'did not fire'} "
            f"(stop reason: {read(run['metrics'], 'stop_reason')})."], reading


def token_accuracy_section(m: dict) -> list[str]:
    return ["## 4. Next-token accuracy (not GSM8K accuracy)",
            f"- Train next-token accuracy: first {f(read(m, 'train_token_accuracy_first'))}, last "
            f"{f(read(m, 'train_token_accuracy_last'))}; validation: first {f(read(m, 'eval_token_accuracy_first'))}, "
            f"last {f(read(m, 'eval_token_accuracy_last'))}.",
            "- This is the share of reference-solution tokens the model predicts as its top-1 next token under "
            "teacher forcing. It is not GSM8K accuracy (section 5): a model can predict most reference tokens and "
            "still get the final number wrong."]


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
    def cell(model: str, name: str) -> str:
        value = read(ev, F.figure(model, name))
        if value is None:
            return "n/a"
        low, high = (read(ev, bound) for bound in F.interval(model, name))
        return f"{value:.1%} [{low:.1%}, {high:.1%}]"

    def diff(pair: str) -> str:
        value = read(ev, F.paired(pair, "difference"))
        return "n/a" if value is None else f"{value:+.1%} (p={read(ev, F.paired(pair, 'mcnemar_p')):.3g})"

    n = read(ev, F.figure("finetuned", "n")) or read(ev, F.figure("baseline", "n"))
    k = F.sampled_k(ev)
    rows = {rule.figure: (rule.label, rule.reads) for rule in F.RULES}
    if k is not None:  # sampled: the vote is the headline, the first sample one draw at the temperature
        rows = {F.majority(k): (f"maj@{k}", f"maj@{k}: the most common by-value answer of the {k} samples"),
                F.any_of(k): (f"pass@{k}", f"pass@{k}: any of the {k} samples right, by value"),
                **{name: (label, f"{text} (the first sample)") for name, (label, text) in rows.items()}}
    for name, (label, text) in rows.items():
        headline = " (the headline)" if name == F.headline(k) else ""
        out.append(f"| {label}{headline} | {text} | {n} | {cell('baseline', name)} | {cell('finetuned', name)} | "
                   f"{'n/a' if name == F.any_of(k or 0) else diff(F.pair_name(name))} |")  # pass@k is not paired
    out += ["", "| model | answer format rate | ran to the token limit | repetition loops | mean tokens generated |",
            "|---|---|---|---|---|"]
    for model in F.MODELS:
        if read(ev, F.figure(model, "n")) is not None:
            rates = [read(ev, F.figure(model, rate)) or 0.0 for rate in F.RATES]
            out.append(f"| {model} | " + " | ".join(f"{r:.1%}" for r in rates)
                       + f" | {read(ev, F.figure(model, F.GENERATED_TOKENS_MEAN)) or 0:.0f} |")
    out += context_rows(ev)
    if read(ev, F.paired(F.ANSWER_FORMAT, "difference")) is not None:
        out += ["", f"- Answer-format rate, fine-tuned minus baseline: {diff(F.ANSWER_FORMAT)}."]
    by_value = F.HEADLINE.pair
    if read(ev, F.paired(by_value, "difference")) is not None:
        after, before = (read(ev, F.paired(by_value, stat)) for stat in ("only_finetuned_correct",
                                                                         "only_baseline_correct"))
        out += [f"- By-value, questions right only after fine-tuning: {after}; right only before: {before}."]
    if read(ev, "note"):
        out.append(f"- {ev['note']}")
    return out


def context_rows(ev: dict) -> list[str]:
    """How many answers the model's context bounded, per model (`figures.COUNTS`; n/a for runs made before they
    were counted)."""
    out = ["", "| model | " + " | ".join(CONTEXT_LABELS.values()) + " |", "|---|" + "---|" * len(CONTEXT_LABELS)]
    for model in F.MODELS:
        if read(ev, F.figure(model, "n")) is not None:
            out.append(f"| {model} | " + " | ".join(f(read(ev, F.figure(model, c)), "d") for c in CONTEXT_LABELS)
                       + " |")
    return out


def failure_section(run: dict, by_steps: dict[str, list[tuple]]) -> list[str]:
    tuned = finetuned_answers(run)
    if not tuned:
        return ["## 6. Where it fails", "- No predictions to analyse."]
    max_new = run["config"].get("eval", {}).get("max_new_tokens")  # for runs whose answers lack hit_token_limit
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
    for key, answers in breakdown["examples"].items():
        out += ["", f"**{ERROR_CATEGORIES[key]}**"]
        for r in answers:
            slips = arithmetic_slips(r["completion"])
            answered = (f"its last number {r['pred']}" if key == "no_final_answer" and r["pred"] is not None
                        else f"answered {r['pred']}")
            out += [f"- Q: {r['question']}  ", f"  gold {r['gold']}, {answered}"
                    + (f", false calculation `{slips[0]}`" if slips else "") + "  ",
                    "  completion: `" + r["completion"].replace("\n", " ⏎ ").replace("`", "'")[:400] + "`"]
    return out


def finetuned_answers(run: dict) -> list[dict]:
    return [r for r in run["predictions"] if r["model"] == "finetuned"] or run["predictions"]


def build(run_dir: Path, price: float) -> tuple[str, dict[str, Figure]]:
    """The report of one run: its text and its plots (`loss` only where the run did not draw it)."""
    run = load_run(run_dir)
    if not run["metrics"]:
        raise FileNotFoundError(f"{run_dir} has no metrics.json: not a finished run directory")
    drawn = {}
    if not (run_dir / "loss.png").exists():
        drawn["loss"] = plots.loss_curves(run["history"])
    by_steps = {model: accuracy_by_steps([r for r in run["predictions"] if r["model"] == model])
                for model in F.MODELS if any(r["model"] == model for r in run["predictions"])}
    drawn["accuracy_by_steps"] = plots.accuracy_by_steps(by_steps)
    curve_lines, reading = curve_section(run)
    early = read(run['metrics'], 'stop_reason') == "early_stopping"
    sections = [
        [f"# Report: {run_dir.name}", "", "Every figure below is read from this run directory's files."],
        overview(run, price), loss_section(run["metrics"]), curve_lines, token_accuracy_section(run["metrics"]),
        gsm8k_section(run["eval"], run["config"]), failure_section(run, by_steps),
        ["## 7. What to try next", *[f"- {s}" for s in analysis.next_steps(reading, early, run["eval"])]],
    ]
    text = "\n\n".join("\n".join(s) for s in sections) + "\n"
    return text, {name: plot for name, plot in drawn.items() if plot is not None}


def build_sweep(sweep_dir: Path) -> tuple[str, dict[str, str], dict[str, Figure], Comparison]:
    """The report of a sweep: its text, the comparison files (name -> text), the plots it could draw (only
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
        if name in comparison.plots:
            lines += ["", f"![{title}]({name}.png)"]
    return "\n".join(lines) + "\n", comparison.files, comparison.plots, comparison
