"""The validation split: stratified, and iteratively stratified for multi-label data."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified by label, reproducible for a seed (every class needs two
    images: see `check_labels`). Multi-label (N, C) labels: iterative stratification (Sechidis et
    al. 2011), then every label is made present on both sides."""
    if labels.ndim == 2:
        return multilabel_split(labels, fraction, seed)
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    n_val = max(int(round(len(labels) * fraction)), int((counts > 0).sum()))
    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def multilabel_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """iterative-stratification's MultilabelStratifiedShuffleSplit, with "no label" stratified like
    a class; a label left wholly on one side (rare labels can be) then has one of its images moved
    across, the one whose other labels are the most common on the side it leaves."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    labels = np.hstack([labels, (labels.sum(1) == 0)[:, None]]).astype(np.uint8)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(labels)), labels))
    side = np.zeros(len(labels), dtype=bool)
    side[val] = True
    counts = labels.sum(0)
    for c in np.argsort(counts, kind="stable")[np.sort(counts) >= 2]:
        for to_val in (True, False):
            if not (labels[side == to_val, c]).any():
                donors = np.flatnonzero((side != to_val) & (labels[:, c] == 1))
                others = labels[side != to_val].sum(0)
                pick = donors[np.argmax([others[labels[d] == 1].min() for d in donors])]
                side[pick] = to_val
    return np.flatnonzero(~side), np.flatnonzero(side)

