"""Class imbalance: loss weights and a class-balanced order of training examples."""

from __future__ import annotations

import numpy as np
import torch

from ..utils.errors import ConfigError

def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """scikit-learn's "balanced" weights n / (C * n_c) per class; for multi-label (N, C) labels the
    `pos_weight` of each label's binary loss, negatives / positives (the balanced weights' ratio);
    None for "none"."""
    if mode == "none":
        return None
    if labels.ndim == 2:
        positives = labels.sum(0).astype(np.float64)
        return torch.tensor((len(labels) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def check_sampler(labels: np.ndarray, mode: str) -> None:
    """The balanced sampler draws classes of single-label data; ConfigError for multi-label data."""
    if mode == "balanced" and labels.ndim == 2:
        raise ConfigError("sampler balanced draws single-label classes; for multi-label data use class_weight "
                          "balanced (a pos_weight per label)")


def epoch_order(labels: np.ndarray, rng: np.random.Generator, mode: str) -> np.ndarray:
    """Indices of one epoch: a permutation ("none"), or as many draws with replacement where every
    class is equally likely ("balanced", PyTorch's WeightedRandomSampler with 1 / n_c weights)."""
    n = len(labels)
    if mode == "none":
        return rng.permutation(n)
    check_sampler(labels, mode)
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=p / p.sum())
