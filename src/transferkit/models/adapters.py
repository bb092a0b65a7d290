"""Per-architecture knowledge, as a table of adapters (fastai's per-architecture table): how a
backbone's layers are listed (what `fine_tune_at` counts), where fine-tuning starts by default, and
how `forward_features` cuts into a chain of blocks (what the boundary cache needs). The first
adapter whose `matches` accepts a model is its adapter; `generic` accepts every model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import keras

Layers = list[tuple[str, nn.Module]]


def own_layers(model: nn.Module) -> Layers:
    """Modules that own parameters or buffers (convolutions, norms, linear layers...), in
    definition order, classifier excluded (the model is built without one)."""
    layers = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None:
            layers.append((name or "(stem)", module))
    return layers


def last_quarter(layers: Layers, fraction: float = 0.75) -> str:
    """The first block boundary at or after `fraction` of the layers (the seed: 120 of 154)."""
    start = min(int(len(layers) * fraction), len(layers) - 1)
    for i in range(max(start, 1), len(layers)):
        if layers[i][0].rsplit(".", 1)[0] != layers[i - 1][0].rsplit(".", 1)[0]:
            return layers[i][0]
    return layers[start][0]


def _blocks(prefix: str, stages) -> Layers:
    return [(f"{prefix}.{i}.{j}", block) for i, stage in enumerate(stages) for j, block in enumerate(stage)]


def efficientnet_chain(model: nn.Module) -> Layers:
    return [("conv_stem", model.conv_stem), ("bn1", model.bn1), *_blocks("blocks", model.blocks),
            ("conv_head", model.conv_head), ("bn2", model.bn2)]


def mobilenetv3_chain(model: nn.Module) -> Layers:
    return [("conv_stem", model.conv_stem), ("bn1", model.bn1), *_blocks("blocks", model.blocks)]


def resnet_chain(model: nn.Module) -> Layers:
    chain = [(n, getattr(model, n)) for n in ("conv1", "bn1", "act1", "maxpool")]
    return chain + [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(model, f"layer{i}"))]


def _is(class_name: str, module: str) -> Callable[[nn.Module], bool]:
    def matches(model: nn.Module) -> bool:
        import importlib

        return isinstance(model, getattr(importlib.import_module(module), class_name))
    return matches


@dataclass(frozen=True)
class Adapter:
    """What transferkit knows about one family of architectures."""

    name: str
    matches: Callable[[nn.Module], bool]
    layers: Callable[[nn.Module], Layers] = own_layers
    default_fine_tune_at: Callable[[Layers], str] = last_quarter
    chain: Callable[[nn.Module], Layers] | None = None  # None: cannot be cut; phase 2 runs the full model


ADAPTERS: list[Adapter] = [
    # Keras MobileNetV2 numerics (a timm EfficientNet-class model): Keras's 154 layers, so indices
    # count as in the seed, and the seed's fine_tune_at = 120 by default.
    Adapter("keras-mobilenetv2", keras.is_keras_mobilenetv2, keras.keras_layers,
            lambda layers: keras.DEFAULT_FINE_TUNE_AT, efficientnet_chain),
    Adapter("efficientnet", _is("EfficientNet", "timm.models.efficientnet"), chain=efficientnet_chain),
    Adapter("mobilenetv3", _is("MobileNetV3", "timm.models.mobilenetv3"), chain=mobilenetv3_chain),
    Adapter("resnet", _is("ResNet", "timm.models.resnet"), chain=resnet_chain),
    Adapter("generic", lambda model: True),
]


def adapter_for(model: nn.Module) -> Adapter:
    return next(a for a in ADAPTERS if a.matches(model))


def list_layers(model: nn.Module) -> Layers:
    """The base model's layers with the indices that `fine_tune_at` counts."""
    return adapter_for(model).layers(model)
