"""Fitted on the validation set after training: a temperature for the logits (calibrated
probabilities) and, for two classes, the decision threshold on p(class 1). Multi-label models get
both per class: each class's sigmoid is its own binary problem."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_expit, log_softmax

from ..cfg.settings import THRESHOLD_METRICS, TrainConfig
from ..models.transfer import TransferModel
from ..predict.metrics import binary_calibration_error, expected_calibration_error


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of logits / temperature (one logit: sigmoid, else softmax)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    labels = np.asarray(labels)
    if z.shape[1] == 1:
        sign = np.where(labels == 1, 1.0, -1.0)
        return float(-log_expit(sign * z[:, 0]).mean())
    return float(-log_softmax(z, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [0.05, 20] that minimises the NLL of
    logits / T. One parameter, so the ranking of the predictions (and ROC-AUC) never changes.
    Stays 1 when the validation set is perfectly separated (the NLL then falls without end as
    T -> 0, which would only make the model overconfident) or nothing improves."""
    if len(labels) == 0:
        return 1.0
    low, high = np.log(0.05), np.log(20.0)
    found = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(found.x))
    if found.x < low + 1e-2 or nll(logits, labels, best) >= nll(logits, labels, 1.0):
        return 1.0
    return best


def fit_temperatures(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """Multi-label: `fit_temperature` for each class's logit against its 0/1 column."""
    return [fit_temperature(logits[:, [j]], labels[:, j]) for j in range(logits.shape[1])]


def _score(tp, fp, n_pos: int, n_neg: int, metric: str) -> np.ndarray:
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    fn, tn = n_pos - tp, n_neg - fp
    tpr, tnr = tp / max(n_pos, 1), tn / max(n_neg, 1)
    if metric == "f1":
        return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    if metric == "balanced_accuracy":
        return (tpr + tnr) / 2
    return tpr + tnr - 1  # Youden's J = TPR - FPR = 2 * balanced accuracy - 1: the same rule


def threshold_scores(labels: np.ndarray, p1: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct decision rule `p1 >= t` on these scores: (thresholds, metric values).
    Thresholds sit halfway between neighbouring distinct scores; 0 (all positive) and just above
    the largest score (all negative) close the list."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"threshold metric must be one of {THRESHOLD_METRICS}, got {metric!r}")
    order = np.argsort(p1, kind="stable")
    p, y = np.asarray(p1, dtype=np.float64)[order], np.asarray(labels)[order] == 1
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(p) > 0) + 1, [len(p)]])  # first positive index
    positives_from = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])  # positives in p[i:]
    tp = positives_from[cuts]
    fp = (len(p) - cuts) - tp
    inner = (p[np.maximum(cuts - 1, 0)] + p[np.minimum(cuts, len(p) - 1)]) / 2
    thresholds = np.where(cuts == 0, 0.0, np.where(cuts == len(p), np.nextafter(p[-1], np.inf), inner))
    return thresholds, _score(tp, fp, int(y.sum()), int((~y).sum()), metric)


def score_at(labels: np.ndarray, p1: np.ndarray, threshold: float, metric: str) -> float:
    """`metric` of the rule p1 >= threshold."""
    y, positive = np.asarray(labels) == 1, np.asarray(p1) >= threshold
    return float(_score((y & positive).sum(), (~y & positive).sum(), int(y.sum()), int((~y).sum()), metric))


def choose_threshold(labels: np.ndarray, p1: np.ndarray, metric: str = "balanced_accuracy") -> dict:
    """The threshold that maximises `metric` on these (validation) scores; among equal scores the
    one nearest 0.5. Returns {"metric", "threshold", "score", "score_at_0.5"}."""
    if len(labels) == 0:
        raise ValueError("cannot choose a threshold without validation images")
    thresholds, scores = threshold_scores(labels, p1, metric)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    pick = best[np.argmin(np.abs(thresholds[best] - 0.5))]
    return {"metric": metric, "threshold": float(thresholds[pick]), "score": float(scores[pick]),
            "score_at_0.5": score_at(labels, p1, 0.5, metric)}


def calibrate(model: TransferModel, logits: np.ndarray, labels: np.ndarray,
              config: TrainConfig) -> tuple[np.ndarray, dict, dict | None]:
    """Fit the temperature (sets model.temperature) and, for two classes, the threshold on the
    validation logits; returns the calibrated probabilities and what was fitted."""
    if model.multilabel:
        return calibrate_labels(model, logits, labels, config)
    model.temperature = 1.0
    before = model.probabilities(torch.from_numpy(logits)).numpy()
    model.temperature = fit_temperature(logits, labels)
    probs = model.probabilities(torch.from_numpy(logits)).numpy()
    calibration = {"temperature": model.temperature, "method": "temperature scaling on the validation set",
                   "loss_before": nll(logits, labels), "loss_after": nll(logits, labels, model.temperature),
                   "ece_before": expected_calibration_error(labels, before),
                   "ece_after": expected_calibration_error(labels, probs)}
    if not model.binary:
        return probs, calibration, None
    if config.threshold_metric == "none":
        return probs, calibration, {"metric": "fixed", "threshold": config.threshold}
    return probs, calibration, choose_threshold(labels, probs[:, 1], config.threshold_metric)


def calibrate_labels(model: TransferModel, logits: np.ndarray, labels: np.ndarray,
                     config: TrainConfig) -> tuple[np.ndarray, dict, dict]:
    """Multi-label `calibrate`: a temperature per class (sets model.temperature) and a threshold
    per class, fixed (`threshold`) or chosen on validation (`threshold_metric`)."""
    model.temperature = 1.0
    before = model.probabilities(torch.from_numpy(logits)).numpy()
    temperatures = fit_temperatures(logits, labels)
    model.temperature = temperatures
    probs = model.probabilities(torch.from_numpy(logits)).numpy()
    scaled = logits / np.asarray(temperatures, dtype=np.float32)
    flat = labels.reshape(-1)
    calibration = {"temperature": temperatures, "method": "temperature scaling per class on the validation set",
                   "loss_before": nll(logits.reshape(-1, 1), flat), "loss_after": nll(scaled.reshape(-1, 1), flat),
                   "ece_before": binary_calibration_error(labels, before),
                   "ece_after": binary_calibration_error(labels, probs)}
    if config.threshold_metric == "none":
        return probs, calibration, {"metric": "fixed", "threshold": [config.threshold] * labels.shape[1]}
    chosen = [choose_threshold(labels[:, j], probs[:, j], config.threshold_metric) for j in range(labels.shape[1])]
    return probs, calibration, {"metric": config.threshold_metric, "threshold": [c["threshold"] for c in chosen],
                                "per_class": chosen}
