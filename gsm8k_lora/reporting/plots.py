"""Plots for the run directory (and W&B): each function returns a matplotlib `Figure`, or None when there
is nothing to draw; `records.write_figures` writes them. Figures are made without pyplot, so no backend
or other global state is set and no display is needed."""

from __future__ import annotations

import math

from matplotlib.figure import Figure

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


def _override(job: dict, key: str) -> str | None:
    return next((o.partition("=")[2] for o in job["overrides"] if o.partition("=")[0] == key), None)


def accuracy_grid(jobs: list[dict]) -> Figure | None:
    """Fine-tuned GSM8K accuracy over the learning-rate x epochs grid (bars when it is not a grid)."""
    scored = [j for j in jobs if "finetuned_gsm8k_by_value" in j["eval"]]
    if not scored:
        return None
    lrs = sorted({_override(j, "trainer.learning_rate") for j in scored} - {None}, key=float)
    epochs = sorted({_override(j, "trainer.num_train_epochs") for j in scored} - {None}, key=float)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    if len(lrs) > 1 and len(epochs) > 1:
        grid = [[math.nan] * len(lrs) for _ in epochs]
        for j in scored:
            lr, ep = _override(j, "trainer.learning_rate"), _override(j, "trainer.num_train_epochs")
            if lr in lrs and ep in epochs:
                grid[epochs.index(ep)][lrs.index(lr)] = j["eval"]["finetuned_gsm8k_by_value"]
        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto", vmin=0.0)
        for y, row in enumerate(grid):
            for x, value in enumerate(row):
                ax.text(x, y, "failed" if value != value else f"{value:.1%}", ha="center", va="center", color="w")
        ax.set_xticks(range(len(lrs)), lrs)
        ax.set_yticks(range(len(epochs)), epochs)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("epochs")
        fig.colorbar(image, ax=ax, label="GSM8K accuracy (by-value)")
    else:
        x = range(len(scored))  # positions, labelled with the job names (which read as numbers)
        ax.bar(x, [j["eval"]["finetuned_gsm8k_by_value"] for j in scored], label="fine-tuned")
        ax.plot(x, [j["eval"].get("baseline_gsm8k_by_value", math.nan) for j in scored], "k_",
                markersize=20, label="baseline")
        ax.set_xticks(x, [j["job"] for j in scored])
        ax.set_xlabel("job")
        ax.set_ylabel("GSM8K accuracy (by-value)")
        ax.legend()
    ax.set_title("Fine-tuned GSM8K accuracy (generated answers)")
    fig.tight_layout()
    return fig


def val_loss_curves(jobs: list[dict]) -> Figure | None:
    """Validation loss of every job; `jobs` carry their `history`."""
    drawn = [j for j in jobs if series(j.get("history", []), "eval_loss")]
    if not drawn:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.subplots()
    for job in drawn:
        points = series(job["history"], "eval_loss")
        label = " ".join(o for o in job["overrides"] if o.startswith(("trainer.", "lora."))) or job["job"]
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", markersize=3, label=f"{job['job']}: {label}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss of every run")
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
