"""Perceptual hashes and near-duplicate groups without a backbone: the cheap pass of `check` and of
the validation split.

`phash` is the DCT hash of Zauner (2010) as the imagehash library computes it (grey, 32 x 32 Lanczos
downsample, 2-D DCT-II, the 8 x 8 lowest frequencies against their median: 64 bits), written here
in a few vectorised lines over a batch of decoded images instead of one PIL image at a time, and
without imagehash's dependency on PyWavelets. `tests/test_check.py` checks it bit for bit against
imagehash where that library is installed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_BITS = 64
# Planted copies of real images (JPEG quality 60, resized, brightness-shifted) hash within 4 bits of
# their originals, distinct real images no nearer than 8 on the sets measured (docs/check.md):
DEFAULT_MAX_DISTANCE = 6


def phash(images: np.ndarray, hash_size: int = 8, factor: int = 4) -> np.ndarray:
    """(N, 64) booleans: each decoded image's (N, H, W, 3) or (N, H, W) uint8 perceptual hash."""
    from scipy.fft import dct

    side = hash_size * factor
    small = np.empty((len(images), side, side), dtype=np.float64)
    for i, image in enumerate(images):
        grey = Image.fromarray(np.ascontiguousarray(image))
        grey = grey.convert("L") if grey.mode != "L" else grey
        small[i] = np.asarray(grey.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(small, axis=1), axis=2)[:, :hash_size, :hash_size].reshape(len(images), -1)
    return low > np.median(low, axis=1, keepdims=True)


def signs(bits: np.ndarray) -> np.ndarray:
    """Hash bits as +-1 float32 vectors: their dot product is 64 - 2 x the Hamming distance, so the
    nearest hashes are found by the same blocked matrix product as the nearest embeddings."""
    return np.where(bits, 1.0, -1.0).astype(np.float32)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between the hashes (..., 64) of a and b (broadcast)."""
    return (np.asarray(a) != np.asarray(b)).sum(-1)


def nearest(vectors: np.ndarray, k: int, queries: np.ndarray | None = None, block_bytes: int = 1 << 27,
            skip_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows of `vectors` (by dot product: cosine for unit vectors) to each row
    of `queries` (default: `vectors` themselves, each row then never its own neighbour): (indices,
    similarities), each (Q, k), most similar first. A blocked matrix product: the similarities of
    one block of queries at a time, at most `block_bytes` of them, so memory grows with N, not N^2
    (10,000 x 1,280 floats: 0.1 s of BLAS per 1,000 queries on 2 cores, docs/check.md)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    same = queries is None
    queries = vectors if same else np.ascontiguousarray(queries, dtype=np.float32)
    n, k = len(vectors), min(k, len(vectors) - (1 if same and skip_self else 0))
    if k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    rows = max(1, block_bytes // (4 * max(n, 1)))
    index = np.empty((len(queries), k), np.int64)
    score = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), rows):
        sims = queries[start:start + rows] @ vectors.T
        if same and skip_self:
            np.fill_diagonal(sims[:, start:start + rows], -np.inf)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        index[start:start + rows] = np.take_along_axis(top, order, axis=1)
        score[start:start + rows] = np.take_along_axis(part, order, axis=1)
    return index, score


def clusters(n: int, pairs) -> np.ndarray:
    """Connected components of the graph on n nodes with edges `pairs` ((i, j) rows): (n,) component
    ids, numbered from 0 in order of each component's first node."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(n)])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def near_pairs(bits: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE, k: int = 10) -> np.ndarray:
    """(i, j, distance) rows, i < j: images whose hashes differ in at most `max_distance` bits,
    among each image's k nearest hashes."""
    index, score = nearest(signs(bits), k)
    distance = np.rint((HASH_BITS - score) / 2).astype(np.int64)
    rows = []
    for i in range(len(bits)):
        for j, d in zip(index[i], distance[i]):
            if d <= max_distance and i != j:
                rows.append((min(i, j), max(i, j), int(d)))
    return np.unique(np.asarray(rows, dtype=np.int64).reshape(-1, 3), axis=0)


def duplicate_groups(keys: list[str], images: np.ndarray | None = None,
                     max_distance: int | None = DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """(N,) group ids: images with the same key (`image_key`: the same pixels) share one, and, when
    `images` are given and `max_distance` is not None, so do images whose perceptual hashes are
    within `max_distance` bits (transitively)."""
    first: dict[str, int] = {}
    pairs = [(first.setdefault(key, i), i) for i, key in enumerate(keys)]
    if images is not None and max_distance is not None and len(keys) > 1:
        pairs += [(i, j) for i, j, _ in near_pairs(phash(images), max_distance)]
    return clusters(len(keys), pairs)
