"""Anomaly scores from good images alone: a patch memory bank in the manner of PatchCore (Roth et
al., CVPR 2022), on a frozen pretrained backbone, with no gradient training at all.

- Patch features: the feature maps of two mid-level layers of the frozen backbone (by default
  the last layers at strides 8 and 16, from timm's `feature_info`), each averaged over 3x3
  neighbourhoods (local aggregation), the deeper one upsampled to the first one's grid, and
  concatenated: one C-dimensional feature per cell of an (H, W) grid.
- The bank: the good images' patch features, subsampled by a greedy k-centre coreset (on a random
  projection, from a random candidate pool of ten times its size) down to a cap in MiB.
- Scores: each patch's Euclidean distance to its nearest bank entry (the patch map); the image
  score is the largest patch score. The map shown to people is the patch map upsampled to the
  image and smoothed (Gaussian, sigma 4 pixels at 224 px).
- Or (`method="gaussian"`, for images framed the same way: a fixture, a cell, a scan) one Gaussian
  per grid cell in the manner of PaDiM (Defard et al., ICPR 2021): the good images' mean feature at
  that cell and its covariance (+ 0.01 I, PaDiM's regulariser) over a seeded random subset of the
  channels small enough for the memory cap; a patch's score is its Mahalanobis distance to its own
  cell's Gaussian. No nearest-neighbour search: the cost of a score does not grow with the images.

Everything is one `nn.Module` (`BankModel` or `GaussianModel`): uint8 images in, (scores, maps)
out, so that the PyTorch engine and an ONNX export compute the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.transfer import to_unit
from ..utils.errors import ConfigError

AGGREGATION = 3  # the local neighbourhood averaged around each cell (PatchCore's p = 3)
PROJECTION_DIMS = 16  # the coreset's greedy search runs on a random projection to this many dimensions
POOL_FACTOR = 10  # the coreset is drawn from a random candidate pool of this many times its size
# The most greedy work (pool rows x rows chosen) one coreset part may take: the default cap on ELPV
# (a pool of 137,970 for 13,797 rows: 1.9e9) is one part; 100 MiB there (848,288 for 172,463) is 37.
GREEDY_WORK = 4e9
DISTANCE_MIB = 64  # the most memory one batch's (patches x bank block) distance matrix may take
BANK_BLOCK = 8192  # bank rows per distance matrix: a large bank is searched block by block
BLUR_SIGMA = 4.0  # the shown map's smoothing, in pixels of a 224 px image (PatchCore's sigma = 4)


def default_layers(backbone: nn.Module) -> list[str]:
    """The backbone's last layers at strides 8 and 16 (timm's `feature_info`); for
    EfficientNet-Lite0 blocks.2 (40 channels, 28x28 at 224 px) and blocks.4 (112, 14x14)."""
    info = getattr(backbone, "feature_info", None)
    found = {}
    for entry in (info.get_dicts() if hasattr(info, "get_dicts") else info or []):
        found[int(entry["reduction"])] = entry["module"]
    if 8 not in found or 16 not in found:
        raise ConfigError(f"{type(backbone).__name__}: no layers at strides 8 and 16 in its feature_info; "
                          "anomaly detection needs a convolutional backbone with mid-level feature maps")
    return [found[8], found[16]]


class PatchFeatures(nn.Module):
    """uint8 (or [0, 1] float) RGB images, NCHW -> patch features (N, C, H, W)."""

    def __init__(self, backbone: nn.Module, layers: list[str], mean, std):
        super().__init__()
        from timm.models._features_fx import create_feature_extractor  # fx: only the layers needed run

        self.layers = list(layers)
        try:
            self.extractor = create_feature_extractor(backbone, {name: str(i) for i, name in enumerate(layers)})
        except Exception as exc:  # noqa: BLE001 - fx cannot trace every architecture
            raise ConfigError(f"{type(backbone).__name__}: cannot take the feature maps of {layers} "
                              f"({type(exc).__name__}: {exc})") from None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (to_unit(images) - self.mean) / self.std
        found = self.extractor(x)
        maps = [F.avg_pool2d(found[str(i)].float(), AGGREGATION, 1, AGGREGATION // 2) for i in range(len(self.layers))]
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return torch.cat(maps, 1)


def bank_rows(cap_mib: float, dims: int) -> int:
    """How many float32 features of `dims` values fit `cap_mib` MiB (at least one)."""
    return max(1, int(cap_mib * 2**20) // (4 * dims))


def coreset(features: torch.Tensor, n: int, seed: int = 0, chunks: int | None = None) -> torch.Tensor:
    """Indices of `n` rows of `features` (M, C) by greedy k-centre selection (each next row the one
    farthest from those chosen; Sener and Savarese 2018, PatchCore's coreset), on a Gaussian random
    projection to PROJECTION_DIMS dimensions, among a random pool of POOL_FACTOR * n rows.
    `chunks`: the pool is split at random into this many parts, each reduced to its share of the n
    rows (a composable coreset: the greedy work, pool rows x rows chosen, falls by the number of
    parts). Default: one part while that work stays under GREEDY_WORK (the default cap's case), else
    as many as keep each part's work under it."""
    total = len(features)
    if n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(total, generator=g)[:min(total, POOL_FACTOR * n)].to(features.device)
    x = features[pool].float()
    if x.shape[1] > PROJECTION_DIMS:
        proj = torch.randn(x.shape[1], PROJECTION_DIMS, generator=g).to(x.device) / math.sqrt(PROJECTION_DIMS)
        x = x @ proj
    if chunks is None:
        chunks = coreset_chunks(len(pool), n)
    chunks = max(1, min(int(chunks), n))
    parts = torch.arange(len(pool), device=x.device).tensor_split(chunks)  # the pool is a random order already
    sizes = torch.tensor([len(part) for part in parts])
    shares = (sizes * n) // len(pool)
    shares[torch.argsort(-(sizes * n - shares * len(pool)), stable=True)[:n - int(shares.sum())]] += 1
    chosen = torch.cat([part[greedy_centres(x[part], int(k))] for part, k in zip(parts, shares) if k > 0])
    return pool[chosen].cpu()


def coreset_chunks(pool: int, n: int) -> int:
    """The parts `coreset` splits a pool of `pool` rows into to choose `n`: the fewest that keep
    each part's greedy work (its rows x its rows chosen) under GREEDY_WORK."""
    return max(1, math.ceil(pool * n / GREEDY_WORK))


def greedy_centres(x: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of `n` rows of `x` chosen greedily, each the farthest from those chosen so far."""
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    chosen[0] = 0
    nearest = ((x - x[0]) ** 2).sum(1)
    squares = (x * x).sum(1)
    distance = torch.empty_like(nearest)
    for i in range(1, n):  # each step one matrix-vector product into preallocated buffers, no temporaries
        far = torch.argmax(nearest)
        chosen[i] = far
        torch.addmv(squares, x, x[far], alpha=-2, out=distance)  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2
        distance += squares[far]
        torch.minimum(nearest, distance, out=nearest)
    return chosen


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return k / k.sum()


class AnomalyModel(nn.Module):
    """uint8 RGB images (N, 3, S, S) -> image scores (N,) and maps (N, S, S): the patch scores
    upsampled to the image and smoothed. A subclass says what a patch score is."""

    method = ""

    def __init__(self, features: PatchFeatures, image_size: int):
        super().__init__()
        self.features = features
        self.register_buffer("blur", gaussian_kernel(BLUR_SIGMA * image_size / 224), persistent=False)
        self.image_size = image_size

    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) features -> (N, H, W) patch scores (0 or more)."""
        raise NotImplementedError

    def floats_per_cell(self) -> int:
        """The size of one grid cell's intermediate scores: what batches are sized by."""
        raise NotImplementedError

    def statistics(self) -> dict[str, torch.Tensor]:
        """What the run stores of it (bank.safetensors)."""
        raise NotImplementedError

    def smooth(self, patch: torch.Tensor) -> torch.Tensor:
        """(N, H, W) patch scores -> (N, S, S) map: bilinear upsampling, then a separable Gaussian."""
        up = F.interpolate(patch[:, None], size=(self.image_size, self.image_size), mode="bilinear",
                           align_corners=False)
        k, r = self.blur, self.blur.numel() // 2
        up = F.conv2d(F.pad(up, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        up = F.conv2d(F.pad(up, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return up[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.patch_scores(self.features(images))
        return patch.flatten(1).max(1).values, self.smooth(patch)


class BankModel(AnomalyModel):
    """Patch scores: the distance to the nearest feature of the good images' bank (PatchCore)."""

    method = "patches"

    def __init__(self, features: PatchFeatures, bank: torch.Tensor, image_size: int):
        super().__init__(features, image_size)
        self.register_buffer("bank", bank.float().contiguous())
        self.register_buffer("bank_sq", (bank.float() ** 2).sum(1), persistent=False)

    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) features -> (N, H, W) nearest-neighbour distances."""
        n, c, h, w = feats.shape
        q = feats.permute(0, 2, 3, 1).reshape(-1, c)
        # |q - b|^2 = |b|^2 - 2 q.b + |q|^2: one fused addmm per block of BANK_BLOCK bank rows (so
        # that the distance matrix stays bounded however large the bank), the running minimum,
        # then |q|^2 (a constant of the row) added to the minimum alone
        best = None
        for start in range(0, len(self.bank), BANK_BLOCK):
            block = torch.addmm(self.bank_sq[start:start + BANK_BLOCK], q, self.bank[start:start + BANK_BLOCK].T,
                                alpha=-2).min(1).values
            best = block if best is None else torch.minimum(best, block)
        return (best + (q * q).sum(1)).clamp_min(0).sqrt().view(n, h, w)

    def floats_per_cell(self) -> int:
        return min(len(self.bank), BANK_BLOCK)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}


class GaussianModel(AnomalyModel):
    """Patch scores: the Mahalanobis distance of a cell's feature (its `channels`) to the good
    images' Gaussian at that cell: `mean` (H*W, K), `precision` (H*W, K, K)."""

    method = "gaussian"

    def __init__(self, features: PatchFeatures, mean: torch.Tensor, precision: torch.Tensor, channels: torch.Tensor,
                 image_size: int):
        super().__init__(features, image_size)
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("precision", precision.float().contiguous())
        self.register_buffer("channels", channels.long().contiguous())

    def patch_scores(self, feats: torch.Tensor) -> torch.Tensor:
        n, c, h, w = feats.shape
        x = feats.index_select(1, self.channels).flatten(2).permute(2, 0, 1)  # (H*W, N, K)
        d = x - self.mean[:, None, :]
        m = (torch.bmm(d, self.precision) * d).sum(-1)  # (H*W, N)
        return m.clamp_min(0).sqrt().T.reshape(n, h, w)

    def floats_per_cell(self) -> int:
        return self.precision.shape[-1]

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "precision": self.precision, "channels": self.channels}


GAUSSIAN_EPS = 0.01  # PaDiM's regulariser of each cell's covariance
DEFAULT_CAP_MIB = {"patches": 8.0, "gaussian": 128.0}  # --anomaly-bank-mib unset: per method


def cap_mib(method: str, cap: float | None) -> float:
    """The memory cap of a method's statistics: the one asked for, else the method's default."""
    return DEFAULT_CAP_MIB[method] if cap is None else float(cap)


def gaussian_channels(cells: int, dims: int, cap_mib: float) -> int:
    """How many channels a Gaussian per cell may use within `cap_mib` MiB (float32 precision
    matrices and means), at most all `dims` and at least 1."""
    room = int(cap_mib * 2**20) // (4 * cells)
    return max(1, min(dims, int((math.sqrt(1 + 4 * room) - 1) // 2)))  # k^2 + k <= room


def fit_gaussians(patches: np.ndarray, cap_mib: float, seed: int, device, chunk: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (H*W, K), precision (H*W, K, K), channels (K,)) of (N, H*W, C) patch features: one
    Gaussian per cell over a seeded random subset of K channels that fits `cap_mib`."""
    n, cells, dims = patches.shape
    k = gaussian_channels(cells, dims, cap_mib)
    channels = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(dims, k, replace=False))) \
        if k < dims else torch.arange(dims)
    means, precisions = [], []
    eye = torch.eye(k, dtype=torch.float64, device=device)
    for start in range(0, cells, chunk):  # a few cells at a time: float64 statistics of every image
        x = torch.from_numpy(np.ascontiguousarray(patches[:, start:start + chunk])).to(device)
        x = x.index_select(2, channels.to(device)).double().transpose(0, 1)  # (cells, N, K)
        mu = x.mean(1)
        d = x - mu[:, None]
        cov = d.transpose(1, 2) @ d / max(1, n - 1) + GAUSSIAN_EPS * eye
        means.append(mu.float().cpu())
        # numpy's batched inverse of the symmetric positive-definite covariances (torch's batched
        # float64 LU failed on some machines: "pivots given to lu_solve must all be >= 1")
        precisions.append(torch.from_numpy(np.linalg.inv(cov.cpu().numpy())).float())
    return torch.cat(means), torch.cat(precisions), channels


def score_batches(model: AnomalyModel, images: np.ndarray, device, batch_size: int = 16,
                  maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (N,) and maps (N, S, S) of uint8 NHWC images, in batches sized so that one batch's
    distance matrix stays under DISTANCE_MIB (a smaller matrix stays nearer the CPU's caches)."""
    model.eval()
    cells = None
    scores, shown = [], []
    with torch.inference_mode():
        start = 0
        while start < len(images):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2).to(device)
            if cells is None:
                f = model.features(x[:1])
                cells = f.shape[-1] * f.shape[-2]
                batch_size = max(1, min(batch_size, (DISTANCE_MIB << 20) // max(1, 4 * cells * model.floats_per_cell())))
                x = x[:batch_size]
            patch = model.patch_scores(model.features(x))
            scores.append(patch.flatten(1).max(1).values.float().cpu().numpy())
            if maps:
                shown.append(model.smooth(patch).float().cpu().numpy())
            start += len(x)
    if not scores:
        return np.zeros(0, np.float32), None
    return np.concatenate(scores), (np.concatenate(shown) if maps else None)


def conformal_threshold(scores: np.ndarray, keep: float) -> tuple[float, bool]:
    """The threshold that lets a fraction `keep` of good images pass: the ceil((n + 1) * keep)-th
    smallest held-out good score (split-conformal: a new good image exceeds it with probability at
    most 1 - keep when it is exchangeable with the held-out ones). (threshold, reached): with too
    few held-out images the largest score, and `reached` False."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(ordered) + 1) * keep)
    if k > len(ordered):
        return float(ordered[-1]), False
    return float(ordered[k - 1]), True


def f1_threshold(good: np.ndarray, anomalous: np.ndarray) -> float:
    """The threshold (an image is flagged when its score is above it) with the best F1 on good and
    labelled anomalous scores; ties go to the higher threshold (fewer false alarms). It lies
    halfway between the two scores that the cut separates, so that a score equal to a fitted
    one is classified as it was."""
    scores = np.concatenate([np.asarray(good, np.float64), np.asarray(anomalous, np.float64)])
    y = np.concatenate([np.zeros(len(good)), np.ones(len(anomalous))])
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    tp = np.cumsum(yy)  # flagging the first i + 1 scores (the highest)
    fp = np.cumsum(1 - yy)
    f1 = 2 * tp / (tp + fp + len(anomalous))
    cut = np.flatnonzero(np.r_[s[:-1] > s[1:], True])  # only between distinct scores
    best = cut[int(np.argmax(f1[cut]))]  # the first maximum: the fewest images flagged
    return float((s[best] + s[best + 1]) / 2) if best + 1 < len(s) else float(np.nextafter(s[best], -np.inf))
