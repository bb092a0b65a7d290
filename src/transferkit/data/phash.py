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


def _normed(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _views(thumb: np.ndarray) -> np.ndarray:
    """(V, 32 x 32) normalised views of one thumbnail: the whole, and windows of each scale at
    3 x 3 positions, each resized to 32 x 32."""
    picture = Image.fromarray(thumb)
    boxes = [(0.0, 0.0, float(THUMB), float(THUMB))]
    for s in SCALES[1:]:
        side = s * THUMB
        for y in (0.0, (THUMB - side) / 2, THUMB - side):
            for x in (0.0, (THUMB - side) / 2, THUMB - side):
                boxes.append((x, y, x + side, y + side))
    return _normed(np.stack([np.asarray(picture.resize((MATCH, MATCH), Image.Resampling.BILINEAR, box=b))
                             for b in boxes]))


def match(thumbs: np.ndarray, pairs) -> np.ndarray:
    """For each pair (i, j): the best correlation (Pearson, so brightness and contrast shifts do
    not count) between one image's 32 x 32 thumbnail and a window of the other's (the whole, or
    80-96 % of it at nine positions), either way round. Re-encoded (JPEG 60), halved and brightened
    copies of real images score 0.95 or more, 4 % crops mostly; distinct tiles of one texture photo
    almost never; adjacent cells of one solar module often do: they look the same (docs/check.md)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    best = np.full(len(pairs), -1.0, dtype=np.float32)
    if not len(pairs):
        return best
    whole = {}
    users = np.unique(pairs)
    for i in users:
        whole[int(i)] = _normed(np.asarray(Image.fromarray(thumbs[i]).resize((MATCH, MATCH),
                                                                             Image.Resampling.BILINEAR))[None])[0]
    by_image: dict[int, list[tuple[int, int]]] = {}
    for p, (i, j) in enumerate(pairs):
        by_image.setdefault(int(i), []).append((p, int(j)))
        by_image.setdefault(int(j), []).append((p, int(i)))
    for i, items in by_image.items():
        views = _views(thumbs[i])
        others = np.stack([whole[j] for _, j in items])
        scores = (views @ others.T).max(0)
        index = np.array([p for p, _ in items])
        best[index] = np.maximum(best[index], scores)
    return best
