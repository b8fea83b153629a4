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
