"""The seed's model: augmentation -> backbone preprocessing -> frozen backbone -> global average
pooling -> dropout -> a new linear layer, with the freezing rules of the seed's two phases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.errors import ConfigError
from .adapters import list_layers
from .backbones import Preprocess, is_batchnorm


class Augment(nn.Module):
    """Random horizontal flip and random rotation, per image, active only in training.

    `rotation` is a fraction of a full turn, as in Keras's `RandomRotation(0.2)`: angles are drawn
    uniformly from [-0.2 * 360, +0.2 * 360] degrees; uncovered corners are filled by reflection
    (Keras's default fill mode).
    """

    def __init__(self, flip: bool = True, rotation: float = 0.2):
        super().__init__()
        if not 0.0 <= rotation <= 0.5:
            raise ConfigError(f"rotation must be a fraction of a full turn in [0, 0.5], got {rotation}")
        self.flip, self.rotation = flip, rotation

    def forward(self, x: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """Augment a batch; `seeds` (one per image) make each image's draw reproducible on its own."""
        if not self.training or (not self.flip and self.rotation == 0):
            return x
        n = x.shape[0]
        if seeds is None:
            u = torch.rand(n, 2)
        else:
            u = torch.stack([torch.rand(2, generator=torch.Generator().manual_seed(s)) for s in seeds])
        angle = (u[:, 0] * 2 - 1) * (self.rotation * 2 * math.pi)
        sign = torch.where(u[:, 1] < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        if self.rotation == 0:
            return torch.where((sign < 0).view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(n)
        # Inverse map from output to input coordinates; the flip negates the input's x.
        theta = torch.stack([torch.stack([cos * sign, -sin * sign, zero], 1),
                             torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def extra_repr(self) -> str:
        return f"flip={self.flip}, rotation={self.rotation}"


class TransferModel(nn.Module):
    """Input: uint8 (or [0, 1] float) RGB images, NCHW. Output: 1 logit (two classes) or C logits
    (more classes, or `multilabel`: one independent sigmoid per class).

    The backbone starts frozen. `unfreeze_from(k)` makes layers k.. trainable, as the seed's
    `for layer in base_model.layers[:fine_tune_at]: layer.trainable = False`. Every backbone layer
    runs in inference mode (the seed's `base_model(x, training=False)`): BatchNorm statistics never
    change, unless `train_bn` lets the unfrozen BatchNorm layers update theirs.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, preprocess: Preprocess,
                 dropout: float = 0.2, flip: bool = True, rotation: float = 0.2,
                 train_bn: bool = False, multilabel: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"need at least two classes, got {num_classes}")
        self.num_classes, self.train_bn, self.multilabel = num_classes, train_bn, multilabel
        self.temperature = 1.0  # calibration: probabilities use logits / temperature (multilabel: one per class)
        self.augment = Augment(flip, rotation)
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, 1 if self.binary else num_classes)
        self.layers = list_layers(backbone)
        self.trainable_from = len(self.layers)
        self.unfreeze_from(len(self.layers))

    @property
    def binary(self) -> bool:
        """Two classes, one label each: one logit."""
        return self.num_classes == 2 and not self.multilabel

    def unfreeze_from(self, index: int) -> None:
        """Layers [index:] trainable, [:index] frozen; index == len(layers) freezes the backbone."""
        self.trainable_from = index
        for i, (_, module) in enumerate(self.layers):
            for param in module.parameters(recurse=False):
                param.requires_grad_(i >= index)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        self.backbone.eval()  # the seed's training=False: no dropout/BN updates in the backbone
        if mode and self.train_bn:
            for i, (_, module) in enumerate(self.layers):
                if i >= self.trainable_from and is_batchnorm(module):
                    module.train()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images to the backbone's normalised input."""
        return (to_unit(x) - self.mean) / self.std

    def features(self, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Pooled backbone features of normalised images (global average pooling for CNNs);
        `backbone`: another copy of it (in inference, one with BatchNorm folded)."""
        backbone = self.backbone if backbone is None else backbone
        return backbone.forward_head(backbone.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        x = self.normalize(self.augment(to_unit(x)))
        return self.head(self.dropout(self.features(x, backbone)))

    def loss(self, logits: torch.Tensor, target: torch.Tensor,
             class_weight: torch.Tensor | None = None) -> torch.Tensor:
        """BCE on the logit for two classes, cross-entropy for more; the mean over the batch, or
        with `class_weight` (one per class) the weighted mean, as PyTorch's `weight=`. Multilabel:
        BCE on every class's logit against the 0/1 targets (N, C), the mean over both, with
        `class_weight` as PyTorch's `pos_weight`."""
        if self.multilabel:
            pos_weight = None if class_weight is None else class_weight.to(logits.device)
            return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=pos_weight)
        if self.binary:
            losses = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
        else:
            losses = F.cross_entropy(logits, target, reduction="none")
        if class_weight is None:
            return losses.mean()
        w = class_weight.to(losses.device)[target]
        return (losses * w).sum() / w.sum()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) class probabilities of logits / temperature; one logit: p(class 1) = sigmoid;
        multilabel: each class's own sigmoid (its own temperature)."""
        if self.multilabel:
            temperature = torch.as_tensor(self.temperature, dtype=logits.dtype, device=logits.device)
            return torch.sigmoid(logits / temperature)
        logits = logits / self.temperature
        if self.binary:
            p = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(logits, dim=1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [0, 1]; floats pass through."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x
