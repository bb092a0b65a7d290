"""Batched inference of a TransferModel (or any part of it) in inference mode."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .transfer import TransferModel


def to_batch(batch: np.ndarray, device) -> torch.Tensor:
    """uint8 NHWC images become NCHW (channels-last memory); stored activations become float32."""
    x = torch.from_numpy(np.require(batch, requirements=["C", "W"]))  # a writable, contiguous copy only if needed
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).to(device)
    return x.to(device, torch.float32)


def predict_logits(model: TransferModel, inputs: np.ndarray,
                   forward: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """Logits (N, 1 or C) of `forward` (stored inputs -> logits; default: the whole model on uint8
    NHWC images) in inference mode, by batch."""
    forward = forward or model
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            out.append(forward(to_batch(inputs[start:start + batch_size], device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), dtype=np.float32)


def predict_proba(model: TransferModel, inputs: np.ndarray,
                  forward: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 64,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Calibrated class probabilities (N, C) of `predict_logits`."""
    return model.probabilities(torch.from_numpy(predict_logits(model, inputs, forward, batch_size, device))).numpy()
