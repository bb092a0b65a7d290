"""Which images to label next, and which labels look wrong: the Python side of a labelling app.

Everything works on pooled backbone features, one row per image (what `TransferModel.features`
gives), so that a labelling session never runs the backbone twice. `labels` holds one int per
image, -1 for an image nobody has labelled yet. The head is transferkit's: a multinomial logistic
regression on the features (scikit-learn), refitted in a fraction of a second at these sizes.

- `suggest`: the k unlabelled images whose labels would teach the head most (active learning), or
  the most unusual ones by a score of each image (a run's OOD or anomaly score).
- `find_label_issues`: labelled images whose out-of-fold prediction disagrees confidently with
  their label (confident learning, Northcutt et al. 2021), most suspicious first.
- `cross_val_accuracy`: how good a head on the labels so far is, without a held-out set.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score

from ..utils.errors import DataError

UNLABELLED = -1
STRATEGIES = ("uncertainty", "diversity", "random", "ood", "anomaly")
SCORED = ("ood", "anomaly")  # the strategies that order by each image's score (`suggest`'s `scores`)
POOL_PER_PICK = 3  # batch uncertainty: k-center greedy among the 3k most uncertain images


class LabelIssue(NamedTuple):
    """A labelled image whose label the head doubts. `self_confidence`: the out-of-fold
    probability of `given_label` (low = suspicious)."""

    index: int
    given_label: int
    predicted_label: int
    self_confidence: float


def head() -> LogisticRegression:
    """transferkit's head on pooled features: multinomial logistic regression, L2-regularised
    (scikit-learn's default C=1), deterministic (lbfgs)."""
    return LogisticRegression(max_iter=1000)


def check_strategy(strategy) -> str:
    """`strategy` when it is one of STRATEGIES; a one-line error naming them otherwise."""
    if strategy not in STRATEGIES:
        raise DataError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return strategy


def suggest(features, labels, k: int, strategy: str = "uncertainty", seed: int = 0,
            probabilities=None, scores=None) -> np.ndarray:
    """Indices of the k unlabelled images (labels == -1) to label next, in the order picked.

    - "uncertainty": smallest margin between the two largest class probabilities. The
      probabilities are `probabilities` ((N, C), e.g. from the trained model) or, if None, those
      of a logistic-regression head fitted on the labelled images. A batch of the k smallest
      margins tends to hold near-duplicates (the same confusion k times), so for a batch the
      3k most uncertain images are candidates and k-center greedy (as "diversity") picks k of
      them that are far from the labelled images and from each other; k=1 still picks among the
      3 most uncertain. With no `probabilities` and fewer than 2 labelled classes no head can be
      fitted: uncertainty falls back to "diversity".
    - "diversity": k-center greedy (Sener & Savarese 2018) on L2-normalised features: each pick
      is the image farthest from the labelled images and the earlier picks. With no labels at all
      (cold start) the first pick is the image nearest the mean feature (a typical image, not an
      outlier), then greedy. Deterministic: `seed` is not used. It covers the whole feature
      space, outliers included: on varied classes it can need more labels than random (it does
      in tests/test_active.py), so it suits a cold start, and uncertainty uses it only among
      uncertain images.
    - "random": uniformly at random, reproducible with `seed`.
    - "ood" and "anomaly" (SCORED): the highest `scores` ((N,), one per image: a run's OOD score,
      how unlike its training images an image is, or an anomaly run's score) first; ties by
      position. The order is the score's alone: the labels only remove images from it.
    """
    features, labels = check_data(features, labels)
    unlabelled = np.flatnonzero(labels == UNLABELLED)
    check_k(k, len(unlabelled))
    check_strategy(strategy)
    if probabilities is not None:
        probabilities = check_probabilities(probabilities, len(labels))
    if strategy in SCORED:
        if scores is None:
            raise DataError(f"strategy {strategy!r} orders the images by their scores; none were given")
        scores = check_scores(scores, len(labels))
        return unlabelled[np.argsort(-scores[unlabelled], kind="stable")[:k]]
    if strategy == "random":
        return np.random.default_rng(seed).choice(unlabelled, size=k, replace=False)
    labelled = np.flatnonzero(labels != UNLABELLED)
    if strategy == "uncertainty" and (probabilities is not None or len(np.unique(labels[labelled])) >= 2):
        if probabilities is None:
            probabilities = head().fit(features[labelled], labels[labelled]).predict_proba(features)
        candidates = unlabelled[np.argsort(margins(probabilities[unlabelled]), kind="stable")]
        return k_center_greedy(features, labelled, candidates[:POOL_PER_PICK * k], k)
    return k_center_greedy(features, labelled, unlabelled, k)


def margins(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: near 0 where the head cannot decide."""
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def k_center_greedy(features: np.ndarray, centres: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """k of `candidates` picked one by one, each the farthest (Euclidean, L2-normalised features)
    from `centres` and the earlier picks. No centres: start from the candidate nearest the mean of
    all images. Ties go to the lower position in `candidates`."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    pool = unit[candidates]
    if len(centres):
        picks, nearest = [], np.min(distances(pool, unit[centres]), axis=1)
    else:
        first = int(np.argmin(distances(pool, unit.mean(axis=0, keepdims=True))[:, 0]))
        picks, nearest = [first], distances(pool, pool[first:first + 1])[:, 0]
        nearest[first] = -np.inf
    while len(picks) < k:
        pick = int(np.argmax(nearest))
        picks.append(pick)
        nearest = np.minimum(nearest, distances(pool, pool[pick:pick + 1])[:, 0])
        nearest[pick] = -np.inf  # never picked twice, even among duplicates
    return candidates[picks]


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances."""
    squared = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.sqrt(np.maximum(squared, 0))


def find_label_issues(features, labels, n_folds: int = 5, seed: int = 0, n_jobs: int | None = None
                      ) -> list[LabelIssue]:
    """Labelled images whose label looks wrong, most suspicious (lowest self-confidence) first.

    Confident learning (Northcutt et al. 2021) on out-of-fold probabilities (stratified
    `n_folds`-fold, logistic-regression head, so that no image judges its own label): the
    threshold t_j of class j is the mean probability of j over the images labelled j. An image
    labelled i is an issue when its probability of i is below t_i and some other class reaches
    its threshold (p_j >= t_j); the predicted label is the most probable such class. Unlabelled
    images (-1) are ignored; indices refer to the full `features`. `n_jobs`: folds fitted in
    parallel processes (joblib's; the same probabilities).
    """
    features, labels = check_data(features, labels)
    labelled, classes, y, p = out_of_fold(features, labels, n_folds, seed, n_jobs)
    thresholds = np.array([p[y == j, j].mean() for j in range(len(classes))])
    self_confidence = p[np.arange(len(y)), y]
    confident = np.where(p >= thresholds, p, -np.inf)
    predicted = np.argmax(confident, axis=1)
    issue = (self_confidence < thresholds[y]) & np.isfinite(confident.max(axis=1))
    order = np.flatnonzero(issue)[np.argsort(self_confidence[issue], kind="stable")]
    return [LabelIssue(int(labelled[i]), int(classes[y[i]]), int(classes[predicted[i]]),
                       float(self_confidence[i])) for i in order]


def out_of_fold(features: np.ndarray, labels: np.ndarray, n_folds: int, seed: int, n_jobs: int | None = None):
    """Out-of-fold class probabilities of the labelled images: (labelled indices, the classes,
    each image's class position, (n, C) probabilities with columns in class order)."""
    labelled = np.flatnonzero(labels != UNLABELLED)
    classes, y = np.unique(labels[labelled], return_inverse=True)
    p = cross_val_predict(head(), features[labelled], y, cv=folds(labels[labelled], n_folds, seed),
                          method="predict_proba", n_jobs=n_jobs)
    return labelled, classes, y, p


def cross_val_accuracy(features, labels, n_folds: int = 5, seed: int = 0) -> float:
    """Mean accuracy of the head over stratified `n_folds`-fold cross-validation on the labelled
    images: an estimate of how well the labels so far would train it, without a held-out set."""
    features, labels = check_data(features, labels)
    labelled = labels != UNLABELLED
    cv = folds(labels[labelled], n_folds, seed)
    return float(np.mean(cross_val_score(head(), features[labelled], labels[labelled], cv=cv)))


def folds(labels: np.ndarray, n_folds: int, seed: int) -> StratifiedKFold:
    """Shuffled stratified folds; every class needs at least `n_folds` labelled images so that
    each fold's training part sees it and each test part holds it."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise DataError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"need labelled images of at least 2 classes, got {len(classes)}")
    few = classes[counts < n_folds]
    if len(few):
        counts = dict(zip(classes.tolist(), counts.tolist()))
        raise DataError(f"class(es) {few.tolist()} have fewer than n_folds={n_folds} labelled images "
                        f"(counts {counts}); label more or lower n_folds")
    return StratifiedKFold(n_folds, shuffle=True, random_state=seed)


def check_data(features, labels) -> tuple[np.ndarray, np.ndarray]:
    """features (N, F) finite numbers, labels (N,) integers >= -1 (-1 = unlabelled)."""
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.number) or features.size == 0:
        raise DataError(f"features must be a non-empty 2-D numeric array (images, features), "
                        f"got shape {features.shape} and dtype {features.dtype}")
    if not np.isfinite(features).all():
        raise DataError("features hold NaN or infinite values")
    if labels.shape != (len(features),):
        raise DataError(f"labels must be a 1-D array with one label per image ({len(features)}), "
                        f"got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be integers (-1 = unlabelled), got dtype {labels.dtype}")
    if (labels < UNLABELLED).any():
        raise DataError(f"labels must be class indices >= 0 or -1 (unlabelled), got {labels.min()}")
    return features.astype(np.float64, copy=False), labels


def check_k(k: int, n_unlabelled: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}")
    if k > n_unlabelled:
        raise DataError(f"k={k} is more than the {n_unlabelled} unlabelled images")


def check_probabilities(probabilities, n: int) -> np.ndarray:
    """(N, C >= 2) finite probabilities, one row per image."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != n or probabilities.shape[1] < 2:
        raise DataError(f"probabilities must have shape ({n}, classes >= 2), got {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise DataError("probabilities hold NaN or infinite values")
    return probabilities


def check_scores(scores, n: int) -> np.ndarray:
    """(N,) finite scores, one per image."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise DataError(f"scores must have shape ({n},), one per image, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise DataError("scores hold NaN or infinite values")
    return scores
