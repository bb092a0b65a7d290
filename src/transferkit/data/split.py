"""The validation split: stratified, and iteratively stratified for multi-label data. Every split
leaves at least one image of every class on both sides, or is refused with one line."""

from __future__ import annotations

import math

import numpy as np

from ..utils.errors import DataError


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified by label, reproducible for a seed (every class needs two
    images: see `check_labels`). Multi-label (N, C) labels: iterative stratification (Sechidis et
    al. 2011), then every label is made present on both sides. DataError when `fraction` leaves a
    class without a training or a validation image (`split_problem` says which)."""
    problem = split_problem(labels, fraction, seed)
    if problem:
        raise DataError(problem)
    return _split(labels, fraction, seed)


def split_problem(labels: np.ndarray, fraction: float, seed: int, classes: list[str] | None = None) -> str | None:
    """Why the split of `labels` at `fraction` cannot be used (a class left without a training or a
    validation image), as one line; None when every class is on both sides. `classes` names the
    label indices in the message."""
    labels = np.asarray(labels)
    n_classes = labels.shape[1] if labels.ndim == 2 else int(labels.max(initial=-1)) + 1
    counts = labels.sum(0) if labels.ndim == 2 else np.bincount(labels, minlength=n_classes)
    names = classes or [str(c) for c in range(n_classes)]
    present = np.flatnonzero(counts > 0)
    if len(present):
        n_val = _n_val(labels, fraction) if labels.ndim == 1 else math.ceil(len(labels) * fraction)
        n_train, needed = len(labels) - n_val, len(present) if labels.ndim == 1 else 1
        if n_train < needed:  # the splitter cannot even draw it
            return (f"val_split {fraction:g} leaves {max(n_train, 0)} training image(s) of {len(labels)} for "
                    f"{len(present)} classes; every class needs one on both sides: lower --val-split, or give a "
                    "validation set (--val-dir)")
    try:
        train, val = _split(labels, fraction, seed)
    except ValueError as exc:  # the splitter's own refusal of sizes it cannot draw
        return f"val_split {fraction:g} cannot split {len(labels)} images ({str(exc).splitlines()[0]})"
    for side, index in (("training", train), ("validation", val)):
        has = labels[index].sum(0) > 0 if labels.ndim == 2 else np.bincount(labels[index], minlength=n_classes) > 0
        missing = [c for c in present if not has[c]]
        if missing:
            return _message(fraction, names, counts, missing, side)
    return None


def _message(fraction: float, names: list[str], counts: np.ndarray, missing, side: str) -> str:
    shown = [names[c] for c in missing]
    smallest = int(counts[counts > 0].min())
    direction = "lower" if side == "training" else "raise"
    return (f"val_split {fraction:g} leaves no {side} image of class(es) {shown} (the smallest class has "
            f"{smallest} images); {direction} --val-split, or give a validation set (--val-dir)")


def _n_val(labels: np.ndarray, fraction: float) -> int:
    return max(int(round(len(labels) * fraction)), int((np.bincount(labels) > 0).sum()))


def _split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if labels.ndim == 2:
        return multilabel_split(labels, fraction, seed)
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=_n_val(labels, fraction), stratify=labels, random_state=seed)
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
