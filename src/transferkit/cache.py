"""Train on what the frozen layers compute, computed once.

While a layer is frozen and in inference mode, its output depends only on the input image. So for
every training image we compute, once, the clean view plus K augmented views, and keep
- the pooled backbone features (phase 1 trains the head on them), and
- the activations at the freeze boundary, the input of the first trainable block (phase 2 trains
  only the backbone suffix and the head on them).
Each epoch draws one stored view per image. The arrays live in RAM up to a budget, then in a
disk-backed memmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import allocate
from .model import TransferModel, to_unit


def feature_chain(backbone: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The backbone's `forward_features` as a flat list of modules applied in turn, or None for
    architectures we cannot split (they train phase 2 without a boundary cache)."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    def blocks(prefix: str, stages) -> list[tuple[str, nn.Module]]:
        return [(f"{prefix}.{i}.{j}", block) for i, stage in enumerate(stages)
                for j, block in enumerate(stage)]

    if isinstance(backbone, EfficientNet):
        chain = [("conv_stem", backbone.conv_stem), ("bn1", backbone.bn1),
                 *blocks("blocks", backbone.blocks), ("conv_head", backbone.conv_head), ("bn2", backbone.bn2)]
    elif isinstance(backbone, MobileNetV3):
        chain = [("conv_stem", backbone.conv_stem), ("bn1", backbone.bn1), *blocks("blocks", backbone.blocks)]
    elif isinstance(backbone, ResNet):
        chain = [(n, getattr(backbone, n)) for n in ("conv1", "bn1", "act1", "maxpool")]
        chain += [(f"layer{i}.{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(backbone, f"layer{i}"))]
    else:
        return None
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():  # a safety net: the chain must reproduce forward_features exactly
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # global RNG untouched
        ok = torch.allclose(run_chain(chain, x), backbone.forward_features(x), atol=1e-5)
    backbone.train(was_training)
    return chain if ok else None


def run_chain(chain: list[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for _, module in chain:
        x = module(x)
    return x


def cut_index(chain: list[tuple[str, nn.Module]], layer_name: str | None) -> int:
    """The chain element holding `layer_name` (the first trainable layer); len(chain) if None."""
    if layer_name is None:
        return len(chain)
    for i, (name, _) in enumerate(chain):
        if layer_name == name or layer_name.startswith(name + "."):
            return i
    raise ValueError(f"layer {layer_name} is not in the backbone's feature chain")


@dataclass
class Views:
    """Per view (clean + K augmented) and per image: stored inputs of the trainable part."""

    inputs: np.ndarray  # (V, N, ...) float16/float32, RAM or memmap
    labels: np.ndarray
    forward: Callable[[torch.Tensor], torch.Tensor]  # stored inputs -> logits

    @property
    def num_views(self) -> int:
        return self.inputs.shape[0]


def extract(model: TransferModel, images: np.ndarray, views: int, cut: int | None,
            chain: list[tuple[str, nn.Module]] | None, batch_size: int, device,
            dtype=np.float16, in_ram: bool = True, spill_dir=None, autocast: bool = False,
            progress: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features (V, N, F) and, when `cut` is given, boundary activations (V, N, ...).

    View 0 is the clean image; views 1.. are drawn by the model's own augmentation (seeded by
    the caller through torch's global generator)."""
    n = len(images)
    pooled = boundary = None
    model.eval()
    with torch.inference_mode():
        for view in range(views):
            model.augment.train(view > 0)
            for start in range(0, n, batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
                x = model.normalize(model.augment(to_unit(x.permute(0, 3, 1, 2).to(device))))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    if chain is None:
                        b, f = None, model.features(x)
                    else:
                        b = run_chain(chain[:cut], x) if cut is not None else None
                        rest = run_chain(chain[cut:], b) if b is not None else run_chain(chain, x)
                        f = model.backbone.forward_head(rest, pre_logits=True)
                if pooled is None:
                    pooled = allocate((views, n, *f.shape[1:]), np.float32, in_ram, spill_dir)
                    if b is not None:
                        boundary = allocate((views, n, *b.shape[1:]), dtype, in_ram, spill_dir)
                pooled[view, start:start + len(x)] = f.float().cpu().numpy()
                if b is not None:
                    boundary[view, start:start + len(x)] = b.float().cpu().numpy().astype(dtype)
                if progress:
                    progress()
    model.augment.train(False)
    return pooled, boundary


def head_forward(model: TransferModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pooled features -> logits (phase 1)."""
    return lambda f: model.head(model.dropout(f))


def suffix_forward(model: TransferModel, chain, cut: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Boundary activations -> logits through the trainable suffix (phase 2)."""
    def forward(b: torch.Tensor) -> torch.Tensor:
        pooled = model.backbone.forward_head(run_chain(chain[cut:], b), pre_logits=True)
        return model.head(model.dropout(pooled))
    return forward


def cache_bytes(n_train: int, n_val: int, views: int, feature_dim: int, boundary_shape, itemsize=2) -> int:
    """Bytes the cache will take: pooled float32 plus boundary activations for all views."""
    per_view = feature_dim * 4 + (int(np.prod(boundary_shape)) * itemsize if boundary_shape else 0)
    return (n_train * views + n_val) * per_view
