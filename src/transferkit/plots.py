"""The learning-curve figure users of the seed know: accuracy and loss, both phases."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def learning_curves(history: list[dict], path: Path, fine_tune_start: float | None = None) -> None:
    """Training and validation accuracy (top) and loss (bottom) per epoch; a vertical line marks
    where fine-tuning starts."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for ax, key, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label=f"Training {key}")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label=f"Validation {key}")
        if fine_tune_start is not None:
            ax.axvline(fine_tune_start, color="grey", linestyle="--", label="Start fine-tuning")
        ax.set_title(f"Training and validation {key}")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if key == "accuracy" else "upper right")
    axes[1].set_xlabel("epoch")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
