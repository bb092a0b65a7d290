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
from threadpoolctl import threadpool_limits

HASH_BITS = 64
# Planted copies of real images (JPEG quality 60, halved, brightness +20 %) hash within 6 bits of
# their originals (8 for a few brightened ones); crops do not (docs/check.md). A candidate only:
# `match` confirms it.
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


def cluster_members(ids: np.ndarray, evidence: dict) -> tuple[dict[int, list[int]], dict[int, list]]:
    """Each cluster's members (cluster id -> node indices, in order) and the evidence of its
    links (cluster id -> [(a, b, evidence)]), from `clusters`' ids and {(a, b): evidence}."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(ids):
        members.setdefault(int(c), []).append(i)
    links: dict[int, list] = {}
    for (a, b), e in evidence.items():
        links.setdefault(int(ids[a]), []).append((a, b, e))
    return members, links


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


# -- verification: do two images show the same picture, up to a slight crop? ----------------------

THUMB = 64  # grey thumbnail kept per image (4 KB)
MATCH = 32  # the side at which aligned thumbnails are compared
SCALES = (1.0, 0.96, 0.92, 0.88, 0.84, 0.80)  # the part of one image the other may show
DEFAULT_MIN_MATCH = 0.95


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64) uint8 grey thumbnails of decoded images (what `match` compares)."""
    out = np.empty((len(images), THUMB, THUMB), dtype=np.uint8)
    for i, image in enumerate(images):
        grey = Image.fromarray(np.ascontiguousarray(image))
        grey = grey.convert("L") if grey.mode != "L" else grey
        out[i] = np.asarray(grey.resize((THUMB, THUMB), Image.Resampling.BOX))
    return out


def _axis_weights(low: float, high: float) -> np.ndarray:
    """(THUMB, MATCH) weights of PIL's bilinear resize of the span [low, high) of a THUMB-pixel axis
    to MATCH pixels: PIL's own coefficients, read off by resizing an identity image (mode F, no
    rounding), so that a window is `Wy.T @ thumb @ Wx`, as PIL computes it in floating point."""
    eye = Image.fromarray(np.eye(THUMB, dtype=np.float32), mode="F")
    return np.asarray(eye.resize((MATCH, THUMB), Image.Resampling.BILINEAR, box=(low, 0.0, high, float(THUMB))))


def _windows() -> list[np.ndarray]:
    """Per scale, the weights (THUMB, k * MATCH) of its spans along one axis side by side: the whole
    (k = 1), then each of SCALES[1:] at three positions (start, centre, end; k = 3)."""
    groups = [_axis_weights(0.0, float(THUMB))]
    for s in SCALES[1:]:
        side = s * THUMB
        groups.append(np.concatenate([_axis_weights(p, p + side) for p in (0.0, (THUMB - side) / 2, THUMB - side)], 1))
    return [np.array(g, dtype=np.float32) for g in groups]


def _views(thumbs: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """(N, V, MATCH * MATCH) windows of N thumbnails, each centred and scaled to unit length: for
    each scale's weights W, the windows at its k x k positions are the blocks of W.T @ thumb @ W
    (PIL's bilinear resize of each window)."""
    t = np.asarray(thumbs, dtype=np.float32)
    n, out = len(t), []
    for w in weights:
        k = w.shape[1] // MATCH
        grid = np.swapaxes(np.swapaxes(t @ w, 1, 2) @ w, 1, 2)  # (N, k * MATCH: y, k * MATCH: x)
        out.append(grid.reshape(n, k, MATCH, k, MATCH).transpose(0, 1, 3, 2, 4).reshape(n, k * k, MATCH * MATCH))
    x = np.concatenate(out, 1)
    x -= x.mean(-1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    return x


def match(thumbs: np.ndarray, pairs, chunk: int = 64) -> np.ndarray:
    """For each pair (i, j): the best correlation (Pearson, so brightness and contrast shifts do
    not count) between one image's 32 x 32 thumbnail and a window of the other's (the whole, or
    80-96 % of it at nine positions), either way round. Re-encoded (JPEG 60), halved and brightened
    copies of real images score 0.95 or more, 4 % crops mostly; distinct tiles of one texture photo
    almost never; adjacent cells of one solar module often do: they look the same (docs/check.md).
    The windows of `chunk` images at a time come from batched matrix products (`_views`), so memory
    holds one chunk's windows."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    best = np.full(len(pairs), -1.0, dtype=np.float32)
    if not len(pairs):
        return best
    weights = _windows()
    thumbs = np.asarray(thumbs)
    users, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(-1, 2)
    # each pair twice, once from each side: (the image whose windows, the other's whole, the pair)
    side = np.concatenate([local, local[:, ::-1]])
    pair = np.concatenate([np.arange(len(pairs))] * 2)
    order = np.argsort(side[:, 0], kind="stable")
    side, pair = side[order], pair[order]
    bounds = np.searchsorted(side[:, 0], np.arange(len(users) + 1))
    with threadpool_limits(1, user_api="blas"):  # small products: BLAS threads only wait on each other
        whole = np.concatenate([_views(thumbs[users[i:i + chunk]], weights[:1])[:, 0]
                                for i in range(0, len(users), chunk)])  # (U, MATCH * MATCH)
        for start in range(0, len(users), chunk):
            views = _views(thumbs[users[start:start + chunk]], weights)
            for u in range(start, min(start + chunk, len(users))):
                lo, hi = bounds[u], bounds[u + 1]
                scores = (views[u - start] @ whole[side[lo:hi, 1]].T).max(0)
                np.maximum.at(best, pair[lo:hi], scores)
    return best
