"""The PyTorch engine: a trained TransferModel with its class names and metadata (model.json)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..models.fold import fold_batchnorm
from ..models.inference import predict_proba
from ..models.transfer import TransferModel
from .engine import Engine


class Classifier(Engine):
    """What `predict` needs: the model, its class names and the metadata of `model.json`."""

    name = "torch"

    def __init__(self, model: TransferModel, classes: list[str], meta: dict):
        self.model, self.classes, self.meta = model.eval(), list(classes), dict(meta)
        temperature = self.meta["temperature"]  # multi-label: one per class
        self.model.temperature = [float(t) for t in temperature] if isinstance(temperature, list) else float(temperature)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def folded(self) -> torch.nn.Module:
        """The backbone with BatchNorm folded into its convolutions: the same probabilities, faster."""
        return fold_batchnorm(self.model.backbone)

    def _proba(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_proba(self.model, images, lambda x: self.model(x, self.folded), batch_size, self.device)
