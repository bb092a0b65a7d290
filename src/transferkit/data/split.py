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



def group_split(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int,
                classes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with every group (`groups`: one id per image; None or all different:
    `stratified_split` exactly) wholly on one side, stratified as far as whole groups allow.

    Greedy, reproducible for a seed: the groups in a seeded random order, larger ones first, each
    going to validation when that brings validation's per-class counts (and its size) closer to
    `fraction` of the data's; then a class missing from one side gets the smallest group that can
    move. A class whose images are all in one group cannot be on both sides: an error naming it."""
    if groups is None or len(np.unique(groups)) == len(groups):
        return stratified_split(labels, fraction, seed)
    from ..utils.errors import DataError

    onehot = labels if labels.ndim == 2 else np.eye(int(labels.max()) + 1, dtype=np.int64)[labels]
    onehot = np.hstack([onehot, (onehot.sum(1) == 0)[:, None]]).astype(np.float64)  # "no label" as a class
    names, inverse = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(names), onehot.shape[1]))
    np.add.at(counts, inverse, onehot)
    sizes = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    target = fraction * onehot.sum(0)
    scale = np.maximum(target, 1.0)
    total = fraction * len(labels)

    def error(v: np.ndarray, n: float) -> float:
        return float((((v - target) / scale) ** 2).sum() + ((n - total) / max(total, 1.0)) ** 2)

    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    side = np.zeros(len(names), dtype=bool)  # True: validation
    val, n_val = np.zeros(onehot.shape[1]), 0.0
    for g in order:
        if error(val + counts[g], n_val + sizes[g]) < error(val, n_val):
            side[g], val, n_val = True, val + counts[g], n_val + sizes[g]
    for c in range(onehot.shape[1] - 1):  # the real classes (not "no label")
        holders = np.flatnonzero(counts[:, c] > 0)
        if len(holders) == 0:
            continue
        if len(holders) == 1:
            name = classes[c] if classes else c
            raise DataError(f"class {name!r}: all of its images are in one group ({names[holders[0]]}), so a validation "
                            "split cannot hold it without splitting the group (give a validation set, or change the grouping)")
        for to_val in (True, False):
            if not (side[holders] == to_val).any():
                movable = holders[side[holders] != to_val]
                # the smallest group whose move leaves every class it holds on the side it leaves
                movable = movable[np.argsort(sizes[movable], kind="stable")]
                pick = next((g for g in movable if all(
                    (counts[(side == (not to_val)) & (np.arange(len(names)) != g), d] > 0).any()
                    for d in np.flatnonzero(counts[g, :-1] > 0) if d != c)), movable[0])
                side[pick] = to_val
    val_mask = side[inverse]
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def split_groups(data, group_by: str | None = None, duplicates: bool = True,
                 max_distance: int | None = None) -> tuple[np.ndarray | None, list[str]]:
    """The groups the validation split keeps together, as (N,) ids (None: every image alone), and
    what was found, as log lines: a CSV's `group` column, `group_by` (a regular expression on the
    path whose first group names the group; a path it does not match is a group of its own), and
    with `duplicates` the near-duplicate clusters of the decoded images (perceptual hashes within
    `max_distance` bits; exact copies were merged before). Groups that share an image are one."""
    import re

    from ..utils.errors import DataError
    from .phash import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_MATCH, clusters, match, near_pairs, phash, thumbnails

    n, notes, edges = len(data), [], []

    def join(names: list[str]) -> None:
        first: dict[str, int] = {}
        edges.extend((first.setdefault(name, i), i) for i, name in enumerate(names))

    if data.groups is not None:
        join(data.groups)
        named = len({g for g in data.groups if not g.startswith("\0")})
        notes.append(f"Validation split: {named} group(s) from the CSV's group column kept on one side")
    if group_by:
        pattern = re.compile(group_by)
        found = [pattern.search(path) for path in data.paths]
        names = [m.group(1) if m and m.group(1) else None for m in found]
        matched = sum(name is not None for name in names)
        if not matched:
            raise DataError(f"--group-by {group_by!r} names a group in none of the {n} paths "
                            f"(first path: {data.paths[0] if n else 'none'})")
        join([name if name is not None else f"\0{path}" for name, path in zip(names, data.paths)])
        alone = f"; {n - matched} path(s) it does not match are groups of their own" if matched < n else ""
        notes.append(f"Validation split: --group-by {group_by!r} found {len(set(names) - {None})} group(s) in "
                     f"{matched} path(s){alone}")
    if duplicates and data.images is not None and n > 1:
        bits = np.concatenate([phash(data.images[i:i + 512]) for i in range(0, n, 512)])
        pairs = near_pairs(bits, DEFAULT_MAX_DISTANCE if max_distance is None else max_distance)
        if len(pairs):  # confirmed by aligned thumbnails: look-alikes are not copies
            thumbs = np.concatenate([thumbnails(data.images[i:i + 512]) for i in range(0, n, 512)])
            pairs = pairs[match(thumbs, pairs[:, :2]) >= DEFAULT_MIN_MATCH]
        if len(pairs):
            near = clusters(n, pairs[:, :2])
            sizes = np.bincount(near)
            notes.append(f"Validation split: {int((sizes > 1).sum())} near-duplicate cluster(s) of "
                         f"{int(sizes[sizes > 1].sum())} images kept on one side (--no-group-duplicates: off)")
            edges.extend(map(tuple, pairs[:, :2]))
    if not edges:
        return None, notes
    ids = clusters(n, edges)
    return (None if len(np.unique(ids)) == n else ids), notes


def near_shared(train, val, max_distance: int | None = None) -> list[tuple[str, str, int]]:
    """(validation path, training path, bits) for each validation image whose perceptual hash is
    within `max_distance` bits of a training image's (the nearest one)."""
    from .phash import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_MATCH, HASH_BITS, match, nearest, phash, signs, thumbnails

    if not len(train) or not len(val):
        return []
    limit = DEFAULT_MAX_DISTANCE if max_distance is None else max_distance
    train_bits = np.concatenate([phash(train.images[i:i + 512]) for i in range(0, len(train), 512)])
    val_bits = np.concatenate([phash(val.images[i:i + 512]) for i in range(0, len(val), 512)])
    index, score = nearest(signs(train_bits), 3, queries=signs(val_bits), skip_self=False)
    distance = np.rint((HASH_BITS - score) / 2).astype(int)
    rows, cols = np.nonzero(distance <= limit)
    if not len(rows):
        return []
    thumbs = np.concatenate([thumbnails(val.images[i:i + 512]) for i in range(0, len(val), 512)]
                            + [thumbnails(train.images[i:i + 512]) for i in range(0, len(train), 512)])
    pairs = np.c_[rows, len(val) + index[rows, cols]]
    scores = match(thumbs, pairs)
    found = {}
    for (v, t), d, m in zip(pairs, distance[rows, cols], scores):
        if m >= DEFAULT_MIN_MATCH and v not in found:
            found[v] = (val.paths[v], train.paths[t - len(val)], int(d))
    return [found[v] for v in sorted(found)]
