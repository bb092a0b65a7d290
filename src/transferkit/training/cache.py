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
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..cfg.settings import TrainConfig
from ..data.listing import LabelledImages, image_key
from ..data.memory import allocate, memory_budget
from ..models.adapters import adapter_for
from ..models.fold import fold_batchnorm
from ..models.inference import to_batch
from ..models.transfer import TransferModel, to_unit
from ..utils.files import atomic_path, write_text
from ..utils.progress import Reporter
from . import distributed


def feature_chain(backbone: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The backbone's `forward_features` as a flat list of modules applied in turn (from its
    adapter), or None for architectures we cannot split (they train phase 2 without a boundary
    cache). A safety net checks that the chain reproduces `forward_features` exactly."""
    make = adapter_for(backbone).chain
    if make is None:
        return None
    chain = make(backbone)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
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
    raise LookupError(f"layer {layer_name} is not in the backbone's feature chain")


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


def view_seed(key: str, view: int) -> int:
    """Augmentation seed of one view of one image: a function of its content and the view index,
    so the same image gets the same views in every run (and cached views can be reused)."""
    return int(hashlib.sha256(f"{key}:{view}".encode()).hexdigest()[:15], 16)


class FeatureStore:
    """Views computed by earlier runs, on disk, shared between runs: one .npz per image and view,
    in a folder keyed by everything that determines them (backbone, weights, size, augmentation,
    cut point, storage type). Writes are atomic (safe when runs share it); an entry of the wrong
    shape or with non-finite values is computed again; the oldest files are evicted past
    `cap_bytes`, and temporary files left by killed runs are removed. Loaded with
    allow_pickle=False."""

    VERSION = 1
    STALE_TMP_SECONDS = 3600  # a temporary file older than this belongs to a run that died

    def __init__(self, root: str | Path, settings: dict, cap_bytes: int = 20 << 30,
                 shapes: tuple[tuple[int, ...], tuple[int, ...] | None] | None = None):
        self.root, self.cap_bytes, self.shapes = Path(root), cap_bytes, shapes
        digest = hashlib.sha256(json.dumps({**settings, "v": self.VERSION}, sort_keys=True).encode())
        self.dir = self.root / digest.hexdigest()[:24]
        if distributed.current().main:  # the index; the other ranks of a job add only their shard's views
            write_text(self.dir / "settings.json", json.dumps(settings, indent=2, sort_keys=True))
        self.hits = 0

    def _path(self, key: str, view: int) -> Path:
        return self.dir / f"{key}-{view}.npz"

    def load(self, key: str, view: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The stored (pooled, boundary) of one view, or None when absent or unusable."""
        try:
            with np.load(self._path(key, view), allow_pickle=False) as f:
                found = f["pooled"], (f["boundary"] if "boundary" in f else None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if self.shapes is not None:
            pooled_shape, boundary_shape = self.shapes
            if found[0].shape != pooled_shape or (boundary_shape is not None and (
                    found[1] is None or found[1].shape != boundary_shape)):
                return None
        if not all(np.isfinite(a).all() for a in found if a is not None):
            return None
        self.hits += 1
        return found

    def save(self, key: str, view: int, pooled: np.ndarray, boundary: np.ndarray | None) -> None:
        arrays = {"pooled": pooled} if boundary is None else {"pooled": pooled, "boundary": boundary}
        try:
            with atomic_path(self._path(key, view)) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        except OSError:
            pass  # a full disk costs reuse, never the run

    def trim(self) -> int:
        """Delete stale temporary files, then the least recently written files until the whole
        cache (temporary files included) fits the cap; returns how many files went."""
        files, removed, now = [], 0, time.time()
        for path in [*self.root.glob("*/*.npz"), *self.root.glob("*/*.tmp")]:
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.suffix == ".tmp" and now - stat.st_mtime > self.STALE_TMP_SECONDS:
                path.unlink(missing_ok=True)
                removed += 1
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(f[1] for f in files)
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
            progress: Callable[[], None] | None = None,
            keys: list[str] | None = None,
            backbone: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features (V, N, F) and, when `cut` is given, boundary activations (V, N, ...), of
    `backbone` (default: the model's; `chain` is then its chain) after the model's augmentation and
    normalisation.

    View 0 is the clean image; view k > 0 is drawn by the model's augmentation with a seed made
    of the image's content and k (`keys`: the images' `image_key`s, when already known). Views found
    in `store` are read instead of computed."""
    n = len(images)
    backbone = model.backbone if backbone is None else backbone
    keys = keys or [image_key(images[i]) for i in range(n)]
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
                    rest = run_chain(chain[cut:], b) if b is not None else backbone.forward_features(x)
                    f = backbone.forward_head(rest, pre_logits=True)
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


class HeadForward:
    """Phase 1's forward: pooled features -> logits (dropout and the new layer)."""

    def __init__(self, model: TransferModel):
        self.model = model

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.dropout(features))


class SuffixForward(HeadForward):
    """Phase 2's forward: boundary activations -> the trainable suffix of the backbone -> pooling
    -> the head."""

    def __init__(self, model: TransferModel, chain: list[tuple[str, nn.Module]], cut: int):
        super().__init__(model)
        self.suffix = chain[cut:]

    def __call__(self, boundary: torch.Tensor) -> torch.Tensor:
        pooled = self.model.backbone.forward_head(run_chain(self.suffix, boundary), pre_logits=True)
        return super().__call__(pooled)


def cache_bytes(n_train: int, n_val: int, views: int, feature_dim: int, boundary_shape, itemsize=2) -> int:
    """Bytes the cache will take: pooled float32 plus boundary activations for all views."""
    per_view = feature_dim * 4 + (int(np.prod(boundary_shape)) * itemsize if boundary_shape else 0)
    return (n_train * views + n_val) * per_view


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bfloat16 extraction: as asked, else where the hardware runs it natively."""
    if config.bf16 is not None:
        return config.bf16
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class CachePlan:
    """What will be cached for a run, decided before anything is extracted."""

    views: int  # per training image: the clean one + the augmented ones
    chain: list[tuple[str, nn.Module]] | None
    cut: int | None  # chain index of the first trainable block; None: phase 2 without a boundary cache
    boundary_shape: tuple[int, ...] | None
    bytes: int
    in_ram: bool
    bf16: bool
    uncut: str | None  # the backbone's class when phase 2 must run the whole model (it cannot be cut)

    def describe(self, fine_tune_at: int, spill_dir) -> list[str]:
        lines = [f"Cache: {self.views} view(s) per training image (clean + {self.views - 1} augmented), "
                 f"{self.bytes / 2**20:.0f} MiB; " + ("in RAM" if self.in_ram else f"over the RAM budget: memmap in "
                 f"{spill_dir}") + f"; extraction in {'bfloat16' if self.bf16 else 'float32'}"]
        if self.cut is not None:
            lines.append(f"Phase 2 trains from the activations entering {self.chain[self.cut][0]} "
                         f"(shape {self.boundary_shape}), the block that holds layer {fine_tune_at}")
        elif self.uncut:
            lines.append(f"Phase 2 runs the full model each epoch: {self.uncut} cannot be split into a chain of blocks")
        return lines


def plan(model: TransferModel, train_data: LabelledImages, n_val: int, config: TrainConfig,
         fine_tune_at: int, device: torch.device) -> CachePlan:
    """How many views, where the boundary is (the block holding the first trainable layer), and
    whether the arrays fit the memory budget."""
    chain = feature_chain(model.backbone)
    layer = boundary_layer(model.backbone, model.layers, fine_tune_at)
    cut = cut_index(chain, layer) if chain and config.fine_tune_epochs > 0 and layer else None
    augmenting = model.augment.flip or model.augment.rotation > 0
    views = 1 + (config.views if augmenting else 0)
    boundary_shape = None
    if cut is not None:
        with torch.inference_mode():
            probe = run_chain(chain[:cut], model.normalize(to_batch(train_data.images[:1], device)))
        boundary_shape = tuple(probe.shape[1:])
    need = cache_bytes(len(train_data), n_val, views, model.head.in_features, boundary_shape,
                       np.dtype(config.cache_dtype).itemsize)
    return CachePlan(views, chain, cut, boundary_shape, need, need <= memory_budget(config.cache_memory_gb),
                     use_bf16(config, device),
                     type(model.backbone).__name__ if config.fine_tune_epochs > 0 and layer and cut is None else None)


def feature_store(config: TrainConfig, model: TransferModel, weights_sha256: str | None,
                  boundary: str | None, image_size: int, bf16: bool,
                  shapes: tuple[tuple[int, ...], tuple[int, ...] | None] | None = None,
                  local: Path | None = None) -> FeatureStore | None:
    """The cross-run store for these extraction settings. When it is off (cache_dir "") or the
    weights are unknown, a store in the run's own folder (`local`), so that an interrupted
    extraction resumes; None without either."""
    import timm

    if config.cache_dir == "" or weights_sha256 is None:
        root = local
    else:
        root = Path(config.cache_dir or default_cache_dir())
    if root is None:
        return None
    settings = {"backbone": config.backbone, "weights_sha256": weights_sha256,
                "image_size": image_size, "flip": model.augment.flip,
                "rotation": model.augment.rotation, "boundary": boundary, "dtype": config.cache_dtype,
                "bf16": bf16, "folded": True, "torch": torch.__version__.split("+")[0], "timm": timm.__version__}
    return FeatureStore(root, settings, int(config.cache_cap_gb * 2**30), shapes)


PhaseViews = tuple[Views, Views]  # (train, validation)


def build_views(model: TransferModel, train_data: LabelledImages, val_data: LabelledImages, config: TrainConfig,
                cache_plan: CachePlan, device: torch.device, spill_dir, weights_sha256: str | None,
                reporter: Reporter) -> tuple[PhaseViews, PhaseViews]:
    """(train, validation) views for each phase: the cached outputs of the frozen layers, read
    from the cross-run store or computed once (by a copy of the backbone with BatchNorm folded)."""
    chain, cut = cache_plan.chain, cache_plan.cut
    folded = fold_batchnorm(model.backbone)
    boundary = chain[cut][0] if cut is not None else None
    size = int(train_data.images.shape[1])
    shapes = ((model.head.in_features,), cache_plan.boundary_shape)
    local = None if spill_dir is None else Path(spill_dir) / "views"
    stores = [feature_store(config, model, weights_sha256, boundary, size, precision, shapes, local)
              for precision in (cache_plan.bf16, False)]
    started = time.perf_counter()
    total = -(-len(train_data) // config.batch_size) * cache_plan.views + -(-len(val_data) // config.batch_size)
    reporter.start("extracting features", total)
    try:
        common = dict(cut=cut, chain=None if cut is None else feature_chain(folded), backbone=folded,
                      batch_size=config.batch_size, device=device,
                      dtype=np.dtype(config.cache_dtype), in_ram=cache_plan.in_ram, spill_dir=spill_dir,
                      keep=config.keep_cache, progress=reporter.advance)
        shards = distributed.current()  # under torchrun each rank extracts its shard of the images
        pooled, boundaries = shards.extract(extract, model, train_data.images, cache_plan.views,
                                            autocast=cache_plan.bf16, store=stores[0], keys=train_data.keys(),
                                            **common)
        # validation in float32: the numbers that pick the kept epoch are the deployed model's
        val_pooled, val_boundaries = shards.extract(extract, model, val_data.images, 1, autocast=False,
                                                    store=stores[1], keys=val_data.keys(), **common)
    finally:
        reporter.stop()
    hits = sum(s.hits for s in stores if s)
    computed = cache_plan.views * len(train_data) + len(val_data) - hits
    reporter.log(f"Extracted {computed} views in {time.perf_counter() - started:.1f}s"
                 + (f"; reused {hits} from {stores[0].root}" if stores[0] else "; no view store"))
    if stores[0] and shards.main:
        stores[0].trim()
    head = HeadForward(model)
    phase1 = (Views(pooled, train_data.labels, head), Views(val_pooled, val_data.labels, head))
    if cut is None:
        return phase1, plain_views(model, train_data, val_data)
    suffix = SuffixForward(model, chain, cut)
    return phase1, (Views(boundaries, train_data.labels, suffix), Views(val_boundaries, val_data.labels, suffix))


def plain_views(model: TransferModel, train_data: LabelledImages, val_data: LabelledImages) -> PhaseViews:
    """The seed's loop: the whole model on decoded images, augmentation drawn afresh each time."""
    return Views(train_data.images[None], train_data.labels, model), Views(val_data.images[None], val_data.labels, model)
