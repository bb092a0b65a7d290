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

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
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


def cut_index(chain: list[tuple[str, nn.Module]], layer_name: str) -> int:
    """The chain element holding `layer_name` (the first trainable layer)."""
    for i, (name, _) in enumerate(chain):
        if layer_name == name or layer_name.startswith(name + "."):
            return i
    raise ValueError(f"layer {layer_name} is not in the backbone's feature chain")


def boundary_layer(backbone: nn.Module, layers: list[tuple[str, nn.Module]], index: int) -> str | None:
    """The module name (in `backbone`) of the first layer at or after `index` that owns parameters,
    or None. Layer lists may hold weightless layers under their own names (Keras's, see keras.py)."""
    names = {id(module): name for name, module in backbone.named_modules()}
    for _, module in layers[index:]:
        if next(module.parameters(recurse=False), None) is not None:
            return names[id(module)]
    return None


@dataclass
class Views:
    """Per view (clean + K augmented) and per image: stored inputs of the trainable part."""

    inputs: np.ndarray  # (V, N, ...) float16/float32, RAM or memmap
    labels: np.ndarray
    forward: Callable[[torch.Tensor], torch.Tensor]  # stored inputs -> logits

    @property
    def num_views(self) -> int:
        return self.inputs.shape[0]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transferkit"


def image_key(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:32]


def view_seed(key: str, view: int) -> int:
    """Augmentation seed of one view of one image: a function of its content and the view index,
    so the same image gets the same views in every run (and cached views can be reused)."""
    return int(hashlib.sha256(f"{key}:{view}".encode()).hexdigest()[:15], 16)


class FeatureStore:
    """Views computed by earlier runs, on disk, shared between runs: one .npz per image and view,
    in a folder keyed by everything that determines them (backbone, weights, size, augmentation,
    cut point, storage type). Writes are atomic (safe when runs share it); the oldest files are
    evicted past `cap_bytes`. Loaded with allow_pickle=False."""

    VERSION = 1

    def __init__(self, root: str | Path, settings: dict, cap_bytes: int = 20 << 30):
        self.root, self.cap_bytes = Path(root), cap_bytes
        digest = hashlib.sha256(json.dumps({**settings, "v": self.VERSION}, sort_keys=True).encode())
        self.dir = self.root / digest.hexdigest()[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        self.hits = 0

    def _path(self, key: str, view: int) -> Path:
        return self.dir / f"{key}-{view}.npz"

    def load(self, key: str, view: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        try:
            with np.load(self._path(key, view), allow_pickle=False) as f:
                found = f["pooled"], (f["boundary"] if "boundary" in f else None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        self.hits += 1
        return found

    def save(self, key: str, view: int, pooled: np.ndarray, boundary: np.ndarray | None) -> None:
        arrays = {"pooled": pooled} if boundary is None else {"pooled": pooled, "boundary": boundary}
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, self._path(key, view))
        except OSError:
            Path(tmp).unlink(missing_ok=True)  # a full disk costs reuse, never the run

    def trim(self) -> int:
        """Delete the least recently written files until the whole cache fits the cap."""
        files = []
        for path in self.root.glob("*/*.npz"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total, removed = sum(f[1] for f in files), 0
        for _, size, path in sorted(files):
            if total <= self.cap_bytes:
                break
            path.unlink(missing_ok=True)
            total, removed = total - size, removed + 1
        return removed


def extract(model: TransferModel, images: np.ndarray, views: int, cut: int | None,
            chain: list[tuple[str, nn.Module]] | None, batch_size: int, device,
            dtype=np.float16, in_ram: bool = True, spill_dir=None, autocast: bool = False,
            store: FeatureStore | None = None, keep: bool = False,
            progress: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features (V, N, F) and, when `cut` is given, boundary activations (V, N, ...).

    View 0 is the clean image; view k > 0 is drawn by the model's augmentation with a seed made
    of the image's content and k. Views found in `store` are read instead of computed."""
    n = len(images)
    keys = [image_key(images[i]) for i in range(n)]
    arrays: dict[str, np.ndarray] = {}

    def put(name: str, view: int, index, values: np.ndarray, kind) -> None:
        if name not in arrays:
            arrays[name] = allocate((views, n, *values.shape[1:]), kind, in_ram, spill_dir, keep)
        arrays[name][view, index] = values

    model.eval()
    for view in range(views):
        model.augment.train(view > 0)
        todo = []
        for i in range(n):
            found = store.load(keys[i], view) if store else None
            if found is None:
                todo.append(i)
                continue
            put("pooled", view, [i], found[0][None], np.float32)
            if found[1] is not None:
                put("boundary", view, [i], found[1][None], dtype)
        for start in range(0, len(todo), batch_size):
            index = todo[start:start + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(images[index])).permute(0, 3, 1, 2).to(device)
            seeds = [view_seed(keys[i], view) for i in index]
            with torch.inference_mode():
                x = model.normalize(model.augment(to_unit(x), seeds))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    b = run_chain(chain[:cut], x) if cut is not None else None
                    rest = run_chain(chain[cut:], b) if b is not None else model.backbone.forward_features(x)
                    f = model.backbone.forward_head(rest, pre_logits=True)
            pooled = f.float().cpu().numpy()
            boundary = None if b is None else b.float().cpu().numpy().astype(dtype)
            put("pooled", view, index, pooled, np.float32)
            if boundary is not None:
                put("boundary", view, index, boundary, dtype)
            if store:
                for j, i in enumerate(index):
                    store.save(keys[i], view, pooled[j], None if boundary is None else boundary[j])
            if progress:
                progress()
    model.augment.train(False)
    return arrays["pooled"], arrays.get("boundary")


def head_forward(model: TransferModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pooled features -> logits (phase 1)."""
    return lambda f: model.head(model.dropout(f))


def suffix_forward(model: TransferModel, chain, cut: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Boundary activations -> logits through the trainable suffix (phase 2)."""
    head = head_forward(model)
    return lambda b: head(model.backbone.forward_head(run_chain(chain[cut:], b), pre_logits=True))


def cache_bytes(n_train: int, n_val: int, views: int, feature_dim: int, boundary_shape, itemsize=2) -> int:
    """Bytes the cache will take: pooled float32 plus boundary activations for all views."""
    per_view = feature_dim * 4 + (int(np.prod(boundary_shape)) * itemsize if boundary_shape else 0)
    return (n_train * views + n_val) * per_view
