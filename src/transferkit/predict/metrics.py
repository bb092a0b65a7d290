"""Every metric of a model on labelled images (the arithmetic is scikit-learn's), its interval and
its calibration error, and the decision rule that turns probabilities into labels. No torch."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    hamming_loss,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)


def predict_labels(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class indices; two classes use p(class 1) >= threshold (not the logit, unlike Keras)."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def predict_sets(probabilities: np.ndarray, thresholds) -> np.ndarray:
    """Multi-label decisions (N, C) of 0/1: each class's probability against its own threshold."""
    return (np.asarray(probabilities) >= np.asarray(thresholds, dtype=np.float64)).astype(np.uint8)


def indicators(y_true: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as a 0/1 matrix (N, C): class indices one-hot; a multi-label matrix as it is."""
    y_true = np.asarray(y_true)
    return y_true if y_true.ndim == 2 else np.eye(num_classes, dtype=np.uint8)[y_true]


def mean_average_precision(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Macro mean of each class's average precision (one-vs-rest for single-label data), over the
    classes that have a positive image (the others have none)."""
    truth = indicators(y_true, np.asarray(probabilities).shape[1])
    present = truth.sum(0) > 0
    if not present.any():
        return 0.0
    return float(average_precision_score(truth[:, present], np.asarray(probabilities)[:, present], average="macro"))


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): the bin-size-weighted mean |accuracy - confidence| over
    `bins` equal-width confidence bins."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(y_true)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def binary_calibration_error(y_true: np.ndarray, p: np.ndarray) -> float:
    """ECE of independent yes/no decisions (multi-label): every (image, class) pair's probability
    against its 0/1 truth."""
    p = np.asarray(p, dtype=np.float64).ravel()
    return expected_calibration_error(np.asarray(y_true).ravel(), np.stack([1 - p, p], 1))


def epoch_metrics(y_true: np.ndarray, probabilities: np.ndarray, threshold) -> dict:
    """What each epoch records of validation: loss, accuracy (subset accuracy for multi-label) and
    mAP, the numbers of those names in `evaluation_metrics`, in a third of its time (the rest of
    its metrics are for the kept model only)."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        y_pred = predict_sets(probabilities, threshold)
        loss = log_loss(y_true.ravel(), np.clip(probabilities.ravel(), 1e-7, 1 - 1e-7), labels=[0, 1])
    else:
        probabilities = np.asarray(probabilities)
        y_pred = predict_labels(probabilities, threshold)
        clipped = np.clip(probabilities, 1e-7, 1.0)
        loss = log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=list(range(probabilities.shape[1])))
    return {"loss": float(loss), "accuracy": float(accuracy_score(y_true, y_pred)),
            "map": mean_average_precision(y_true, probabilities)}


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           threshold: float = 0.5) -> dict:
    """Accuracy (with its 95 % Wilson interval), balanced accuracy, log loss, ECE, per-class
    precision/recall/F1/support, averages, confusion matrix; ROC-AUC and average precision for
    two classes (class 1 positive), top-k accuracy for more."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities)
    y_pred = predict_labels(probabilities, threshold)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                     average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    correct = int((y_pred == y_true).sum())
    present = len(np.unique(y_true)) > 1
    headline = epoch_metrics(y_true, probabilities, threshold)
    metrics = {
        "n": int(len(y_true)),
        "accuracy": headline["accuracy"],
        "accuracy_ci95": list(wilson_interval(correct, len(y_true))),
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,
        "loss": headline["loss"],
        "ece": expected_calibration_error(y_true, probabilities),
        "map": headline["map"],
        "threshold": threshold if len(classes) == 2 else None,
    }
    if len(classes) == 2:
        metrics["roc_auc"] = float(roc_auc_score(y_true, probabilities[:, 1])) if present else None
        metrics["average_precision"] = (float(average_precision_score(y_true, probabilities[:, 1]))
                                        if present else None)
        metrics["positive_class"] = classes[1]
    else:
        metrics["top_k_accuracy"] = {str(k): float(top_k_accuracy_score(y_true, probabilities, k=k, labels=labels))
                                     for k in range(2, min(5, len(classes) - 1) + 1)}
    metrics.update({
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "averages": averages,
        "confusion_matrix": {"labels": list(classes),
                             "rows_true_cols_predicted": confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    })
    return metrics


def multilabel_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], thresholds) -> dict:
    """Multi-label data (0/1 truth (N, C)): mean average precision (macro), subset accuracy (with
    its 95 % Wilson interval), Hamming loss, micro/macro/samples F1, per-class precision/recall/F1/
    AP/support, label cardinality of truth and prediction, mean BCE loss and ECE over all
    (image, class) pairs."""
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities, dtype=np.float64)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(classes),))
    y_pred = predict_sets(probabilities, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    averages = {}
    for average in ("micro", "macro", "samples"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    ap = [float(average_precision_score(y_true[:, i], probabilities[:, i])) if y_true[:, i].any() else None
          for i in range(len(classes))]
    present = [a for a in ap if a is not None]
    exact = int((y_pred == y_true).all(1).sum())
    headline = epoch_metrics(y_true, probabilities, thresholds)
    return {
        "task": "multilabel",
        "n": int(len(y_true)),
        "map": float(np.mean(present)) if present else 0.0,  # mean_average_precision, from the classes' APs
        "accuracy": headline["accuracy"],  # subset accuracy: every label right
        "accuracy_ci95": list(wilson_interval(exact, len(y_true))),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "f1_micro": averages["micro"]["f1"],
        "f1_macro": averages["macro"]["f1"],
        "loss": headline["loss"],
        "ece": binary_calibration_error(y_true, probabilities),
        "label_cardinality": {"true": float(y_true.sum(1).mean()), "predicted": float(y_pred.sum(1).mean())},
        "thresholds": {c: float(t) for c, t in zip(classes, thresholds)},
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "average_precision": ap[i], "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "averages": averages,
    }


def evaluation_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], threshold) -> dict:
    """`multilabel_metrics` for a 0/1 matrix of labels, else `classification_metrics`."""
    if np.asarray(y_true).ndim == 2:
        return multilabel_metrics(y_true, probabilities, classes, threshold)
    return classification_metrics(y_true, probabilities, classes, threshold)
