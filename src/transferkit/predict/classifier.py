"""The PyTorch engine: a trained TransferModel with its class names and metadata (model.json)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..models.fold import fold_batchnorm
from ..models.inference import predict_logits, predict_proba
from ..models.transfer import TransferModel, to_unit
from ..openworld.ood import OodScorer
from .engine import Engine, OpenWorld


class Classifier(Engine):
    """What `predict` needs: the model, its class names and the metadata of `model.json`; with
    `scorer` (the run's fitted OOD score) every prediction also says how unusual its image is."""

    name = "torch"

    def __init__(self, model: TransferModel, classes: list[str], meta: dict, scorer: OodScorer | None = None):
        self.model, self.classes, self.meta = model.eval(), list(classes), dict(meta)
        temperature = self.meta["temperature"]  # multi-label: one per class
        self.model.temperature = [float(t) for t in temperature] if isinstance(temperature, list) else float(temperature)
        self.set_scorer(scorer)

    def set_scorer(self, scorer: OodScorer | None) -> None:
        """The OOD score (None: a run trained before it) and what the run's model.json says of it."""
        self.scorer = scorer
        entry = self.meta.get("ood") or {}
        self.open_world = OpenWorld(
            ood_scores=None if scorer is None else scorer.val_scores, keep=float(entry.get("keep", 0.95)),
            conformal_scores=None if scorer is None or "conformal" not in self.meta
            else scorer.extra.get("conformal_scores"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def folded(self) -> torch.nn.Module:
        """The backbone with BatchNorm folded into its convolutions: the same probabilities, faster."""
        return fold_batchnorm(self.model.backbone)

    def _proba(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return predict_proba(self.model, images, lambda x: self.model(x, self.folded), batch_size, self.device)

    def features_logits(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """The pooled features (N, D) (the penultimate layer) and the logits of uint8 images, in one pass."""
        model = self.model

        def both(x: torch.Tensor) -> torch.Tensor:
            features = model.features(model.normalize(to_unit(x)), self.folded)
            return torch.cat([features, model.head(features)], 1)

        out = predict_logits(model, images, both, batch_size, self.device)
        return out[:, :model.head.in_features], np.ascontiguousarray(out[:, model.head.in_features:])

    def _outputs(self, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.scorer is None:
            return self._proba(images, batch_size), None
        features, logits = self.features_logits(images, batch_size)
        probs = self.model.probabilities(torch.from_numpy(logits)).numpy()
        return probs, self.scorer.score(features, logits)
