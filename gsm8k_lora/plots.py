"""PNG plots for the run directory (and W&B). matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gsm8k_lora.metrics import series  # noqa: E402


def loss_curves(history: list[dict], path: Path, title: str = "Loss") -> Path | None:
    train, val = series(history, "loss"), series(history, "eval_loss")
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for points, label, style in ((train, "train loss", "-"), (val, "validation loss", "o-")):
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _override(job: dict, key: str) -> str | None:
    return next((o.partition("=")[2] for o in job["overrides"] if o.partition("=")[0] == key), None)


def accuracy_grid(jobs: list[dict], path: Path) -> Path | None:
    """Fine-tuned GSM8K accuracy over the learning-rate x epochs grid (bars when it is not a grid)."""
    scored = [j for j in jobs if "finetuned_gsm8k_by_value" in j["eval"]]
    if not scored:
        return None
    lrs = sorted({_override(j, "trainer.learning_rate") for j in scored} - {None}, key=float)
    epochs = sorted({_override(j, "trainer.num_train_epochs") for j in scored} - {None}, key=float)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if len(lrs) > 1 and len(epochs) > 1:
        grid = [[float("nan")] * len(lrs) for _ in epochs]
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
        labels = [j["job"] for j in scored]
        ax.bar(labels, [j["eval"]["finetuned_gsm8k_by_value"] for j in scored], label="fine-tuned")
        ax.plot(labels, [j["eval"].get("baseline_gsm8k_by_value", float("nan")) for j in scored], "k_",
                markersize=20, label="baseline")
        ax.set_xlabel("job")
        ax.set_ylabel("GSM8K accuracy (by-value)")
        ax.legend()
    ax.set_title("Fine-tuned GSM8K accuracy (generated answers)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def val_loss_curves(jobs: list[dict], path: Path) -> Path | None:
    import json

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    drawn = 0
    for job in jobs:
        history_file = job["dir"] / "log_history.json"
        if not history_file.exists():
            continue
        points = series(json.loads(history_file.read_text())["log_history"], "eval_loss")
        label = " ".join(o for o in job["overrides"] if o.startswith(("trainer.", "lora."))) or job["job"]
        ax.plot([s for s, _ in points], [v for _, v in points], "o-", markersize=3, label=f"{job['job']}: {label}")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss of every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy_by_steps(rows: list[tuple[int, int, float]], path: Path) -> Path | None:
    """GSM8K accuracy by the number of reasoning steps in the gold solution, with question counts."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [str(s) for s, _, _ in rows]
    bars = ax.bar(steps, [a for _, _, a in rows])
    for bar, (_, n, _) in zip(bars, rows, strict=True):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xlabel("reasoning steps in the gold solution")
    ax.set_ylabel("GSM8K accuracy (by-value)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Accuracy by problem length")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
