"""Plots for the run directory (and W&B): each function returns a matplotlib `Figure`, or None when there
is nothing to draw; `rundir.write_plots` writes them. Figures are made without pyplot, so no backend
or other global state is set and no display is needed."""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from gsm8k_lora import figures as F
from gsm8k_lora.training.history import series


def loss_curves(history: list[dict], title: str = "Loss") -> Figure | None:
    train, val = series(history, "loss"), series(history, "eval_loss")
    if not train and not val:
        return None
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    for points, label, style in ((train, "train loss", "-"), (val, "validation loss", "o-")):
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def job_label(row: dict, swept: list[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in swept if row.get(k) is not None) or f"job {row['job']}"


def _bounds(row: dict, model: str) -> tuple[float, float]:
    """How far below and above a setting's accuracy its bar reaches: its 95% interval, or over several seeds one
    standard deviation each way."""
    low, high = (row[c] for c in F.column_interval(model))
    if low is not None:
        return (row[model] - low, high - row[model])
    std = row.get(F.spread(model)) or 0.0
    return (std, std)


def _cell_text(row: dict) -> str:
    low, high = (row[c] for c in F.column_interval("finetuned"))
    if low is not None:
        return f"{row['finetuned']:.1%}\n[{low:.1%}, {high:.1%}]"
    std = row.get(F.spread("finetuned"))
    return f"{row['finetuned']:.1%}" + ("" if std is None else f"\n± {std:.1%}")


def accuracy_grid(settings: list[dict], swept: list[str]) -> Figure | None:
    """Fine-tuned GSM8K accuracy of every setting (its protocol's headline figure) with its 95% interval, or over
    several seeds its mean +- standard deviation: a heat map over learning rate x epochs where the sweep varied
    both, else a bar per setting beside its baseline. `swept`: the swept keys but the seed."""
    scored = [r for r in settings if r["finetuned"] is not None]
    if not scored:
        return None
    rule, n, seeds = scored[0]["rule"], scored[0]["n"], max(r.get("seeds") or 1 for r in scored)
    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    ax = fig.subplots()
    lrs = sorted({r["lr"] for r in scored if r.get("lr")}, key=float) if "lr" in swept else []
    epochs = sorted({r["epochs"] for r in scored if r.get("epochs")}, key=float) if "epochs" in swept else []
    if len(lrs) > 1 and len(epochs) > 1 and len(swept) == 2:
        grid = [[math.nan] * len(lrs) for _ in epochs]
        for r in scored:
            grid[epochs.index(r["epochs"])][lrs.index(r["lr"])] = r["finetuned"]
        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto", vmin=0.0)
        for r in scored:
            ax.text(lrs.index(r["lr"]), epochs.index(r["epochs"]), _cell_text(r), ha="center", va="center",
                    color="w", fontsize=8)
        ax.set_xticks(range(len(lrs)), lrs)
        ax.set_yticks(range(len(epochs)), epochs)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("epochs")
        fig.colorbar(image, ax=ax, label="fine-tuned GSM8K accuracy")
    else:
        x = range(len(scored))  # positions, labelled with each setting's swept values
        for offset, model in ((-0.2, "baseline"), (0.2, "finetuned")):
            have = [(i, r) for i, r in zip(x, scored, strict=True) if r[model] is not None]
            if have:
                errors = [_bounds(r, model) for _, r in have]
                ax.bar([i + offset for i, _ in have], [r[model] for _, r in have], 0.4, label=model,
                       yerr=[[e[0] for e in errors], [e[1] for e in errors]], capsize=3)
        ax.set_xticks(list(x), [job_label(r, swept) for r in scored], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("GSM8K accuracy")
        ax.set_ylim(0, 1.05)
        ax.legend()
    spread = "95% intervals" if seeds == 1 else f"mean ± std over {seeds} seeds"
    # two lines: one holding the rule, n and the spread ran past the figure's right edge beside the colour bar
    ax.set_title(f"Fine-tuned GSM8K accuracy over the sweep\n{rule}, n={n}, {spread}", fontsize=10)
    fig.tight_layout()
    return fig


def val_loss_curves(jobs: list[dict], rows: list[dict], swept: list[str]) -> Figure | None:
    """Validation loss of every job over its steps, labelled by its swept values."""
    drawn = [(j, r) for j, r in zip(jobs, rows, strict=True) if series(j.get("history", []), "eval_loss")]
    if not drawn:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for job, row in drawn:
        points = series(job["history"], "eval_loss")
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", markersize=3,
                label=f"{job['job']}: {job_label(row, swept)}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss of every run of the sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_by_steps(by_model: dict[str, list[tuple[int, int, float, float, float]]]) -> Figure | None:
    """By-value GSM8K accuracy of each model by the number of reasoning steps in the gold solution, with 95%
    intervals and question counts; titled to read alone (W&B shows it without the report)."""
    by_model = {name: rows for name, rows in by_model.items() if rows}
    if not by_model:
        return None
    steps = sorted({row[0] for rows in by_model.values() for row in rows})
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.subplots()
    width = 0.8 / len(by_model)
    for index, (name, rows) in enumerate(by_model.items()):
        found = {row[0]: row for row in rows}
        x = [steps.index(s) + (index - (len(by_model) - 1) / 2) * width for s in found]
        values = [row[2] for row in found.values()]
        errors = [[v - row[3] for v, row in zip(values, found.values(), strict=True)],
                  [row[4] - v for v, row in zip(values, found.values(), strict=True)]]
        ax.bar(x, values, width, yerr=errors, capsize=3, label=name)
    counts = {row[0]: row[1] for rows in by_model.values() for row in rows}
    ax.set_xticks(range(len(steps)), [f"{s}\n(n={counts[s]})" for s in steps])
    ax.set_xlabel("reasoning steps in the gold solution (questions)")
    ax.set_ylabel("GSM8K accuracy, by-value")
    ax.set_ylim(0, 1.05)
    ax.set_title("GSM8K accuracy by problem length, baseline and fine-tuned (95% intervals)")
    ax.legend()
    fig.tight_layout()
    return fig
