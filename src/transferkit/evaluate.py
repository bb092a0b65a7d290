"""Metrics of a model on labelled images (the arithmetic is scikit-learn's)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

from .model import TransferModel, predict_labels


def to_batch(batch: np.ndarray, device) -> torch.Tensor:
    """uint8 NHWC images become NCHW (channels-last memory); stored activations become float32."""
    x = torch.from_numpy(np.ascontiguousarray(batch))
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).to(device)
    return x.to(device, torch.float32)


def predict_inputs(model: TransferModel, inputs: np.ndarray, forward, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities (N, C) of `forward` (inputs -> logits) in inference mode, by batch."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            logits = forward(to_batch(inputs[start:start + batch_size], device))
            out.append(model.probabilities(logits).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), dtype=np.float32)


def predict_arrays(model: TransferModel, images: np.ndarray, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities (N, C) of the whole model for uint8 NHWC images."""
    return predict_inputs(model, images, model, batch_size, device)


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           threshold: float = 0.5) -> dict:
    """Accuracy, log loss, per-class precision/recall/F1/support, averages, confusion matrix."""
    y_true = np.asarray(y_true)
    y_pred = predict_labels(torch.from_numpy(np.asarray(probabilities)), threshold).numpy()
    labels = list(range(len(classes)))
    clipped = np.clip(probabilities, 1e-7, 1.0)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                     average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels)),
        "threshold": threshold if len(classes) == 2 else None,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "averages": averages,
        "confusion_matrix": {"labels": list(classes),
                             "rows_true_cols_predicted": confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    }
