"""Split conformal prediction sets: adaptive prediction sets (APS, Romano, Sesia and Candes,
NeurIPS 2020) calibrated on the validation split, so that the set of an exchangeable image
contains its true class with probability at least `coverage`.

Written by hand (the few lines below) rather than through MAPIE, crepes or TorchCP: they would
add a dependency (and, for MAPIE, scikit-learn estimator wrappers) for one quantile and one
cumulative sum, and none of them draws the randomisation from the image itself, which makes a
set the same every time an image is predicted, by every engine.

The score of a calibration image is the probability mass of the classes ranked above its true
class plus u times its true class's probability, u in [0, 1): with u drawn independently of the
label, the scores are continuous and the coverage is close to the target (without u, APS
over-covers a confident model heavily: a two-class model's wrong answers all score 1). Here u is
a function of the decoded image's pixels (their SHA-256), so it is independent of the label and
reproducible. The set of a new image is every class whose own score would be at most the
calibrated threshold, and always the predicted class (a set is never empty); the calibration
scores are those of these sets (0 where the model's answer is right), so the threshold fits them. Single-label runs
only: a multi-label run's classes each have their own yes/no decision, and it gets no sets.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

METHOD = "aps"
DEFAULT_COVERAGE = 0.9  # what model.json (and the ONNX metadata) record the threshold of


def tie_breaks(images: np.ndarray) -> np.ndarray:
    """u in [0, 1) for each uint8 image (N, S, S, 3): from the SHA-256 of its pixels."""
    out = np.empty(len(images), dtype=np.float64)
    for i, image in enumerate(images):
        digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
        out[i] = int.from_bytes(digest[:7], "big") / 2.0**56
    return out


def _ranked(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes of each row by falling probability (ties: the lower index first) and the mass
    of the classes before each class in that order, indexed by class."""
    p = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, 1)
    before_ranked = np.cumsum(ranked, 1) - ranked
    before = np.empty_like(p)
    np.put_along_axis(before, order, before_ranked, 1)
    return order, before


def scores(probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray,
           predicted: np.ndarray | None = None) -> np.ndarray:
    """APS conformity scores of calibration images with true class indices `labels`. With
    `predicted` (the classes the model answers), the scores of the sets that always hold the
    predicted class: 0 where it is the true one (such a set covers it at any threshold), so that
    the threshold is calibrated for the sets `sets` builds and their coverage stays close to the
    target (without it they over-cover by about the share of images whose textbook set is empty)."""
    p = np.asarray(probabilities, dtype=np.float64)
    _, before = _ranked(p)
    rows = np.arange(len(p))
    found = before[rows, labels] + np.asarray(u) * p[rows, labels]
    if predicted is not None:
        found[np.asarray(predicted) == np.asarray(labels)] = 0.0
    return found


def threshold(calibration_scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest calibration score; inf (every class) when there are
    too few images for that coverage."""
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    rank = math.ceil((len(s) + 1) * coverage - 1e-9)
    return float("inf") if rank > len(s) else float(s[rank - 1])


def sets(probabilities: np.ndarray, q: float, u: np.ndarray, predicted: np.ndarray | None = None,
         never_empty: bool = True) -> np.ndarray:
    """(N, C) membership: class j is in the set when the mass before it plus u times its own
    probability is at most `q`; the predicted class (default: the most probable) always is, unless
    `never_empty` is off (the textbook randomised APS, whose coverage is exactly the target: a
    set never empty covers at least as often, and at least as often as the model is right)."""
    p = np.asarray(probabilities, dtype=np.float64)
    _, before = _ranked(p)
    member = before + np.asarray(u)[:, None] * p <= q
    if never_empty:
        predicted = p.argmax(1) if predicted is None else np.asarray(predicted)
        member[np.arange(len(p)), predicted] = True
    return member


def naive_sets(probabilities: np.ndarray, mass: float) -> np.ndarray:
    """The uncalibrated baseline: the most probable classes until their probabilities add up to
    `mass`."""
    p = np.asarray(probabilities, dtype=np.float64)
    _, before = _ranked(p)
    return before < mass


def summary(member: np.ndarray, labels: np.ndarray, coverage: float | None = None) -> dict:
    """Empirical coverage (with its 95 % Wilson interval) and the mean set size (with a 95 %
    normal interval) of sets on labelled images."""
    member = np.asarray(member, dtype=bool)
    n = len(member)
    hits = int(member[np.arange(n), np.asarray(labels)].sum()) if n else 0
    size = member.sum(1).astype(np.float64)
    half = 1.959964 * size.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {"target": coverage, "coverage": hits / n if n else float("nan"),
            "coverage_ci95": wilson(hits, n), "mean_set_size": float(size.mean()) if n else float("nan"),
            "mean_set_size_ci95": [float(size.mean() - half), float(size.mean() + half)] if n > 1 else None, "n": n}


def wilson(successes: int, n: int) -> list[float]:
    """95 % Wilson score interval of a proportion (scipy's)."""
    if n == 0:
        return [0.0, 1.0]
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]
