"""Figures: the learning curves users of the seed know (accuracy and loss, both phases), the
confusion matrix, ROC / precision-recall curves (per class for multi-label models), the
reliability diagram, and histograms of scores (OOD, anomaly) against their threshold."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

# Figures are made with matplotlib's object API (Figure, not pyplot), which needs no backend: the
# caller's backend and pyplot state stay untouched. Files are PNG whatever their name.


def figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kwargs)


def save(fig: Figure, path: Path | BinaryIO) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def learning_curves(history: list[dict], path: Path | BinaryIO, fine_tune_start: float | None = None) -> None:
    """Training and validation accuracy (top) and loss (bottom) per epoch; a vertical line marks
    where fine-tuning starts."""
    epochs = [r["epoch"] for r in history]
    fig, axes = figure((8, 8), 2, 1, sharex=True)
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
    save(fig, path)


def confusion_figure(matrix: list[list[int]], classes: list[str], path: Path | BinaryIO) -> None:
    """Counts and row percentages (the recall of each true class), true classes as rows."""
    counts = np.asarray(matrix)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = 1.2 + 0.9 * len(classes)
    fig, ax = figure((side + 1.6, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=10,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30 if len(classes) > 3 else 0, ha="right" if len(classes) > 3 else "center")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    save(fig, path)


def binary_curves(y_true: np.ndarray, p1: np.ndarray, threshold: float, positive: str,
                  path: Path | BinaryIO) -> None:
    """ROC and precision-recall curves of p(positive) with the operating threshold marked, and the
    reliability diagram of the top-label confidence."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fig, axes = figure((13, 4.2), 1, 3)
    fpr, tpr, _ = roc_curve(y_true, p1)
    predicted = p1 >= threshold
    pos, neg = y_true == 1, y_true == 0
    op_tpr, op_fpr = predicted[pos].mean(), predicted[neg].mean()
    axes[0].plot(fpr, tpr, lw=2, label=f"ROC (AUC {auc(fpr, tpr):.3f})")
    axes[0].plot([0, 1], [0, 1], ":", color="grey", label="chance")
    axes[0].plot([op_fpr], [op_tpr], "o", color="crimson", label=f"threshold {threshold:.3f}")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate (recall)",
                title=f"ROC, positive class: {positive}")
    precision, recall, _ = precision_recall_curve(y_true, p1)
    op_precision = pos[predicted].mean() if predicted.any() else 1.0
    axes[1].plot(recall, precision, lw=2, label="precision-recall")
    axes[1].axhline(pos.mean(), linestyle=":", color="grey", label=f"chance ({pos.mean():.2f})")
    axes[1].plot([op_tpr], [op_precision], "o", color="crimson", label=f"threshold {threshold:.3f}")
    axes[1].set(xlabel="recall", ylabel="precision", title=f"Precision-recall, positive: {positive}")
    confidence = np.maximum(p1, 1 - p1)
    correct = (p1 >= 0.5) == pos
    bins = min(10, max(2, len(y_true) // 20))
    frac, mean = calibration_curve(correct.astype(int), confidence, n_bins=bins, strategy="quantile")
    axes[2].plot([0.5, 1], [0.5, 1], ":", color="grey", label="perfect calibration")
    axes[2].plot(mean, frac, "o-", lw=2, label="this model")
    axes[2].set(xlabel="confidence (top class)", ylabel="observed accuracy", title="Reliability")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    save(fig, path)


def label_pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: list[str], thresholds: list[float],
                    path: Path | BinaryIO) -> None:
    """Multi-label: each class's precision-recall curve, its operating threshold marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = figure((6.5, 5))
    for j, name in enumerate(classes):
        truth = y_true[:, j] == 1
        if not truth.any():
            continue
        precision, recall, _ = precision_recall_curve(truth, probs[:, j])
        line, = ax.plot(recall, precision, lw=2,
                        label=f"{name} (AP {average_precision_score(truth, probs[:, j]):.3f})")
        decided = probs[:, j] >= thresholds[j]
        ax.plot([decided[truth].mean()], [truth[decided].mean() if decided.any() else 1.0], "o",
                color=line.get_color())
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall per class (dots: thresholds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    save(fig, path)


def score_histograms(groups: list[tuple[str, np.ndarray]], threshold: float, score_name: str,
                     path: Path | BinaryIO) -> None:
    """One histogram per (legend, scores) group on shared bins, each as the share of its own images
    (sets of different sizes compare), and a vertical line at the threshold."""
    fig, ax = figure((9, 4.8))
    present = [(name, np.asarray(s, dtype=np.float64)) for name, s in groups if len(s)]
    values = np.concatenate([s for _, s in present] + [np.array([threshold], dtype=np.float64)])
    bins = np.histogram_bin_edges(values, bins=int(np.clip(len(values) // 4, 10, 50)))
    for (name, scores), colour in zip(present, ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        weights = np.full(len(scores), 1 / len(scores))
        ax.hist(scores, bins=bins, weights=weights, histtype="stepfilled", alpha=0.3, color=colour)
        ax.hist(scores, bins=bins, weights=weights, histtype="step", lw=1.8, color=colour, label=name)
    ax.axvline(threshold, color="crimson", linestyle="--", lw=1.8, label=f"threshold {threshold:.4f}")
    ax.set(xlabel=f"{score_name} (higher: more unusual)", ylabel="share of the set's images")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)  # below: no data hidden
    save(fig, path)
