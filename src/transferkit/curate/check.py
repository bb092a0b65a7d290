"""`transferkit check`: trust the data before the model.

One pass over a labelled data set (and its validation and test sets, when given) finds
- exact duplicates: the same decoded pixels (`image_key`, what `train` merges);
- near-duplicates: pairs proposed by a perceptual hash within `phash_distance` bits (the cheap
  pass: re-encodes, resizes, brightness shifts) or by pooled backbone features within cosine
  `cosine` (the rest: crops, small edits), each confirmed by aligned grey thumbnails correlating
  at least `min_match` (`data.phash.match`: look-alikes that hash alike are not copies), grouped
  transitively into clusters;
- leaks: clusters with members in more than one of train / val / test, shown first;
- label conflicts: clusters whose members carry different labels;
- outliers: images far from their nearest neighbours in feature space (mean cosine distance to
  the k nearest images outside their own cluster, above a Tukey fence of all images' distances);
- likely label errors: confident learning on out-of-fold predictions of a logistic-regression
  head on the features (`curate.active.find_label_issues`, the labelling page's review);
- the data's shape: images per class and set, sizes, modes, bit depths, formats, unreadable
  files.

Features come from the content-keyed view store shared with `train` and `label` (only float32
clean views are read: bfloat16 ones differ from float32 by up to cosine 0.02, more than the
near-duplicate threshold can tolerate), so data already trained on or checked is not run through
the backbone again. Nearest neighbours are a blocked matrix product (`data.phash.nearest`):
memory linear in the number of images. Thresholds and their measurements: docs/check.md.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..cfg.settings import DEFAULT_BACKBONE
from ..data.decode import iter_decoded
from ..data.listing import LabelledImages, image_key, load_labelled
from ..data.phash import (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_MATCH, HASH_BITS, cluster_members, clusters, match,
                          nearest, phash, signs, thumbnails)
from ..utils.errors import DataError

KINDS = ("leak", "label_conflict", "exact_duplicate", "near_duplicate", "label_issue", "outlier", "unreadable")
GATING = ("leak", "label_conflict")  # exit status 1 when any is found
SETS = ("train", "val", "test")
# A candidate gate only (`match` decides): copies of real images at 224 px mostly stay above cosine
# 0.90 of their originals, 4 % crops often do; distinct look-alikes do too (docs/check.md).
DEFAULT_COSINE = 0.90
NEIGHBOURS = 10  # candidates per image for both passes; clusters grow transitively beyond it
OUTLIER_K = 5
PARALLEL_FOLDS_FROM = 2000  # images from which the label finder fits its folds in parallel processes
NEIGHBOUR_SPARE = 32  # the shared feature search keeps this many more neighbours than both passes' k
OUTLIER_FENCE = 3.0  # Tukey's "far out": Q3 + 3 IQR of every image's neighbour distance


@dataclass
class Thresholds:
    """What counts as a near-duplicate and an outlier (the defaults are measured: docs/check.md)."""

    phash_distance: int = DEFAULT_MAX_DISTANCE  # candidates: hashes within this many bits of 64; -1: off
    cosine: float = DEFAULT_COSINE  # candidates: features at least this cosine-similar; > 1: off
    min_match: float = DEFAULT_MIN_MATCH  # a candidate pair is a near-duplicate when its aligned thumbnails correlate this well
    neighbours: int = NEIGHBOURS
    outlier_k: int = OUTLIER_K
    outlier_fence: float = OUTLIER_FENCE

    def __post_init__(self):
        if not -1 <= self.phash_distance <= HASH_BITS:
            raise DataError(f"phash distance must be in -1..{HASH_BITS} bits (-1: off), got {self.phash_distance}")
        if not -1.0 <= self.cosine <= 2.0:
            raise DataError(f"cosine threshold must be in [-1, 2] (above 1: off), got {self.cosine}")
        if not -1.0 <= self.min_match <= 1.0:
            raise DataError(f"min_match must be a correlation in [-1, 1], got {self.min_match}")
        if self.neighbours < 1 or self.outlier_k < 1:
            raise DataError("neighbours and outlier_k must be at least 1")


@dataclass
class Finding:
    kind: str
    paths: list[str]
    score: float | None = None  # higher: more certain / more suspicious (per kind: docs/check.md)
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "paths": self.paths, "score": self.score, **self.detail}


@dataclass
class CheckReport:
    findings: list[Finding]
    summary: dict
    thresholds: Thresholds
    notes: list[str]
    timings: dict

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.findings)

    @property
    def exit_code(self) -> int:
        """1 when leakage or label conflicts are found (CI gates on it), else 0."""
        return 1 if any(f.kind in GATING for f in self.findings) else 0

    def to_dict(self) -> dict:
        return {"format_version": 1, "exit_code": self.exit_code,
                "counts": {k: self.count(k) for k in KINDS}, "summary": self.summary,
                "thresholds": asdict(self.thresholds), "notes": self.notes, "timings": self.timings,
                "findings": [f.to_dict() for f in self.findings]}


# -- reading -----------------------------------------------------------------------------------

@dataclass
class Images:
    """The usable images of every set, in one row order: what the passes work on."""

    paths: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    labels: list = field(default_factory=list)  # class index, or a tuple of them (multi-label)
    keys: list[str] = field(default_factory=list)
    bits: list[np.ndarray] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    features: np.ndarray | None = None
    _neighbours: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def neighbours(self, k: int, at_least: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Each image's k most cosine-similar other images by their features (`phash.nearest`):
        (indices, cosines), (N, k). The duplicate and outlier passes share one search: it runs for
        `max(k, at_least)` and later asks for no more are slices of it."""
        have = self._neighbours
        if have is None or have[0].shape[1] < min(k, len(self.paths) - 1):
            self._neighbours = have = nearest(unit(self.features), max(k, at_least))
        return have[0][:, :k], have[1][:, :k]


def bit_depth(image: Image.Image, path: str) -> int:
    """Bits per sample as stored: PNG's header byte, TIFF's BitsPerSample, else from the mode."""
    if image.format == "PNG":
        try:
            with open(path, "rb") as fh:
                header = fh.read(25)
            if header[12:16] == b"IHDR":
                return int(header[24])
        except OSError:
            pass
    if image.format == "TIFF":
        bits = getattr(image, "tag_v2", {}).get(258)
        if bits:
            return int(max(bits) if isinstance(bits, tuple) else bits)
    mode = image.mode
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    return 32 if mode in ("I", "F") else 8


def header(path: str) -> dict | None:
    """Format, mode, size and bit depth from the file's header (no decoding), or None."""
    try:
        with Image.open(path) as image:
            return {"format": image.format, "mode": image.mode, "size": image.size, "bits": bit_depth(image, path)}
    except Exception:  # noqa: BLE001 - the decoder gives the reason, once
        return None


def list_sets(data, val_data=None, test_data=None, task: str = "auto", sep: str = "|") -> dict[str, LabelledImages]:
    """The sets as `train` lists them: the data's classes, val and test read with them."""
    sets = {"train": load_labelled(data, task=task, sep=sep)}
    other_task = "multilabel" if sets["train"].multilabel else "multiclass"
    for name, source in (("val", val_data), ("test", test_data)):
        if source is not None:
            if not Path(source).exists():
                raise DataError(f"{source}: not found (--{name}-dir)")
            sets[name] = load_labelled(source, sets["train"].classes, other_task, sep)
    return sets


class Embedder:
    """Pooled features of decoded images through a pretrained backbone (BatchNorm folded, float32,
    as `train` extracts its validation views), read from and written to the view store."""

    def __init__(self, backbone: str = DEFAULT_BACKBONE, weights: str | None = None, image_size: int | None = None,
                 cache_dir: str | None = None, batch_size: int = 32):
        import torch

        from ..cfg.settings import TrainConfig
        from ..models.backbones import create_backbone
        from ..models.fold import fold_batchnorm
        from ..models.transfer import TransferModel
        from ..training.cache import default_cache_dir, feature_store

        made = create_backbone(backbone, weights, image_size)
        defaults = TrainConfig()
        self.model = TransferModel(made.model, 2, made.preprocess, flip=defaults.flip, rotation=defaults.rotation).eval()
        self.size, self.batch_size, self.device = made.preprocess.image_size, batch_size, torch.device("cpu")
        self.folded = fold_batchnorm(self.model.backbone)
        self.origin = f"{made.name} ({made.weights}) at {self.size} px"
        config = TrainConfig(backbone=made.name, cache_dir=cache_dir)
        dim = self.model.head.in_features
        self.store = feature_store(config, self.model, made.weights_sha256, None, self.size, False, ((dim,), None))
        self.readers = [self.store] + (self.train_stores(Path(cache_dir or default_cache_dir()), made, dim)
                                       if self.store is not None else [])

    def train_stores(self, root: Path, made, dim: int) -> list:
        """The stores of `train` runs with this backbone, weights and size in float32: their clean
        views (view 0) are these features, whatever their augmentation or boundary settings."""
        import timm
        import torch

        from ..training.cache import FeatureStore

        found = []
        for settings_file in sorted(root.glob("*/settings.json")):
            try:
                settings = json.loads(settings_file.read_text())
            except (OSError, ValueError):
                continue
            if (settings.get("backbone") == made.name and settings.get("weights_sha256") == made.weights_sha256
                    and settings.get("image_size") == self.size and settings.get("bf16") is False
                    and settings.get("torch") == torch.__version__.split("+")[0]
                    and settings.get("timm") == timm.__version__ and settings_file.parent != self.store.dir):
                store = FeatureStore.__new__(FeatureStore)  # read only: never rewrites its settings.json
                store.root, store.dir, store.shapes, store.hits, store.cap_bytes = root, settings_file.parent, \
                    ((dim,), None), 0, 0
                found.append(store)
        return found

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.readers)

    def __call__(self, images: np.ndarray, keys: list[str]) -> np.ndarray:
        from ..training.cache import extract

        pooled, _ = extract(self.model, images, 1, None, None, self.batch_size, self.device, dtype=np.float32,
                            store=_Readers(self.readers) if self.store is not None else None, keys=keys,
                            backbone=self.folded)
        return np.asarray(pooled[0], dtype=np.float32)


class _Readers:
    """Several stores read in turn (the first that has a view wins); writes go to the first."""

    def __init__(self, stores: list):
        self.stores = stores

    def load(self, key: str, view: int):
        for store in self.stores:
            found = store.load(key, view)
            if found is not None:
                return found
        return None

    def save(self, key: str, view: int, pooled, boundary) -> None:
        self.stores[0].save(key, view, pooled, boundary)


def read_images(sets: dict[str, LabelledImages], size: int, embed=None, chunk: int = 256,
                progress=None) -> tuple[Images, list[tuple[str, str, str]], dict]:
    """Decode every file once, streaming (as `train` decodes: its size, its rules): each usable
    image's key, perceptual hash and (with `embed`) pooled features; the unreadable files
    (set, path, reason); header statistics per set. Memory holds one chunk of decoded images."""
    out, bad, headers = Images(), [], {name: [] for name in sets}
    feats: list[np.ndarray] = []
    rows = [(name, i) for name, data in sets.items() for i in range(len(data))]
    for name, data in sets.items():
        bad += [(name, path, reason) for path, reason in data.skipped]
    pending: list[tuple[np.ndarray, str]] = []

    def flush() -> None:
        if not pending:
            return
        batch = np.stack([p[0] for p in pending])
        out.bits.extend(phash(batch))
        out.thumbs.extend(thumbnails(batch))
        if embed is not None:
            feats.append(embed(batch, [p[1] for p in pending]))
        pending.clear()

    paths = [sets[name].paths[i] for name, i in rows]
    for n, ((name, i), (path, result)) in enumerate(zip(rows, iter_decoded(paths, size))):
        data = sets[name]
        if isinstance(result, str):
            bad.append((name, path, result))
        else:
            key = image_key(result)
            out.paths.append(path)
            out.sets.append(name)
            out.labels.append(tuple(np.flatnonzero(data.labels[i]).tolist()) if data.multilabel else int(data.labels[i]))
            out.keys.append(key)
            info = header(path)
            if info is not None:
                headers[name].append(info)
            pending.append((result, key))
            if len(pending) == chunk:
                flush()
        if progress:
            progress(n + 1, len(rows))
    flush()
    if embed is not None:
        out.features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return out, bad, headers


# -- the passes --------------------------------------------------------------------------------

def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def duplicate_edges(images: Images, thresholds: Thresholds) -> tuple[list[tuple[int, int]], dict]:
    """Edges (i, j) between images that are the same (key), or near-duplicates: proposed by the
    hash or the features (each image's nearest neighbours within the thresholds), confirmed by
    aligned thumbnails (`match`); `evidence[(i, j)]`: what linked them (hamming bits, cosine,
    match)."""
    n = len(images.paths)
    evidence: dict[tuple[int, int], dict] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(images.keys):
        j = first.setdefault(key, i)
        if j != i:
            evidence[(j, i)] = {"same_pixels": True}
    k = min(thresholds.neighbours, n - 1)
    if k >= 1 and thresholds.phash_distance >= 0:
        index, score = nearest(signs(np.asarray(images.bits)), k)
        distance = np.rint((HASH_BITS - score) / 2).astype(int)
        for i, j in zip(*np.nonzero(distance <= thresholds.phash_distance)):
            a, b = sorted((i, int(index[i, j])))
            evidence.setdefault((a, b), {})["hamming"] = int(distance[i, j])
    if k >= 1 and images.features is not None and thresholds.cosine <= 1.0:
        index, score = images.neighbours(k, at_least=k + thresholds.outlier_k + NEIGHBOUR_SPARE)
        for i, j in zip(*np.nonzero(score >= thresholds.cosine)):
            a, b = sorted((i, int(index[i, j])))
            evidence.setdefault((a, b), {})["cosine"] = round(float(score[i, j]), 4)
    proposed = [pair for pair, e in evidence.items() if "same_pixels" not in e]
    if proposed:
        scores = match(np.asarray(images.thumbs), proposed)
        for pair, value in zip(proposed, scores):
            if value >= thresholds.min_match:
                evidence[pair]["match"] = round(float(value), 4)
            else:
                del evidence[pair]
    return list(evidence), evidence


def pair_cosine(features: np.ndarray | None, i: int, j: int) -> float | None:
    if features is None:
        return None
    a, b = features[i], features[j]
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def cluster_findings(images: Images, classes: list[str], thresholds: Thresholds
                     ) -> tuple[list[Finding], np.ndarray]:
    """Duplicate clusters as findings (leak, label_conflict, exact_duplicate or near_duplicate:
    a cluster may be several), and each image's cluster id."""
    n = len(images.paths)
    edges, evidence = duplicate_edges(images, thresholds)
    ids = clusters(n, edges) if n else np.zeros(0, int)
    members, linked = cluster_members(ids, evidence)
    findings = []
    bits = np.asarray(images.bits)
    for c, rows in members.items():
        if len(rows) < 2:
            continue
        paths = [images.paths[i] for i in rows]
        pairs = linked.get(c, [])
        cosines = [pair_cosine(images.features, a, b) for a, b, _ in pairs]
        cosines = [x for x in cosines if x is not None]
        exact = len({images.keys[i] for i in rows}) == 1
        if exact:
            score = 1.0
        elif cosines:  # the weakest link's cosine
            score = round(min(cosines), 4)
        else:  # no features: 1 - bits / 64 of the weakest hash link
            score = round(1.0 - max(int((bits[a] != bits[b]).sum()) for a, b, _ in pairs) / HASH_BITS, 4)
        detail = {"sets": [images.sets[i] for i in rows], "labels": [label_names(images.labels[i], classes) for i in rows],
                  "pairs": [{"a": images.paths[a], "b": images.paths[b], **e,
                             "hamming": e.get("hamming", int((bits[a] != bits[b]).sum())),
                             "cosine": e.get("cosine", None if images.features is None else
                                             round(pair_cosine(images.features, a, b), 4))}
                            for a, b, e in pairs]}
        if len(set(detail["sets"])) > 1:
            findings.append(Finding("leak", paths, score, detail))
        if len({images.labels[i] for i in rows}) > 1:
            findings.append(Finding("label_conflict", paths, score, detail))
        findings.append(Finding("exact_duplicate" if exact else "near_duplicate", paths, score, detail))
    return findings, ids


def label_names(label, classes: list[str]) -> str | list[str]:
    return [classes[c] for c in label] if isinstance(label, tuple) else classes[label]


def outlier_scores(images: Images, ids: np.ndarray, k: int) -> np.ndarray:
    """Each image's mean cosine distance to its k nearest images outside its own cluster (its
    duplicates do not make an odd image ordinary). The shared neighbour search answers most rows;
    a row it leaves short of k images from other clusters (one in a large cluster) is searched
    again, alone with the other short rows, as deep as the largest of their clusters needs."""
    n = len(images.paths)
    index, score = images.neighbours(k + NEIGHBOUR_SPARE)
    other = ids[index] != ids[:, None]
    short = np.flatnonzero(other.sum(1) < k) if index.shape[1] < n - 1 else np.zeros(0, int)
    if len(short):
        features = unit(images.features)
        depth = k + int(np.bincount(ids)[ids[short]].max())  # the row itself is in its cluster
        found = nearest(features, depth, queries=features[short])
    result = np.full(n, np.nan)
    for i in range(n):
        chosen = score[i][other[i]][:k]
        if len(chosen):
            result[i] = 1.0 - float(chosen.mean())
    for row, i in enumerate(short):
        chosen = found[1][row][ids[found[0][row]] != ids[i]][:k]
        if len(chosen):
            result[i] = 1.0 - float(chosen.mean())
    return result


def outlier_findings(images: Images, ids: np.ndarray, classes: list[str], thresholds: Thresholds
                     ) -> tuple[list[Finding], dict]:
    if images.features is None or len(images.paths) < thresholds.outlier_k + 2:
        return [], {}
    scores = outlier_scores(images, ids, thresholds.outlier_k)
    finite = scores[np.isfinite(scores)]
    q1, q3 = np.percentile(finite, [25, 75])
    fence = float(q3 + thresholds.outlier_fence * (q3 - q1))
    flagged = np.flatnonzero(np.nan_to_num(scores, nan=-1) > fence)
    flagged = flagged[np.argsort(-scores[flagged], kind="stable")]
    findings = [Finding("outlier", [images.paths[i]], round(float(scores[i]), 4),
                        {"sets": [images.sets[i]], "labels": [label_names(images.labels[i], classes)],
                         "fence": round(fence, 4)}) for i in flagged]
    return findings, {"median": round(float(np.median(finite)), 4), "fence": round(fence, 4)}


def label_issue_findings(images: Images, classes: list[str], seed: int = 0) -> tuple[list[Finding], str | None]:
    """Confident learning on out-of-fold predictions (the existing finder), on one copy of each
    exact duplicate. Single-label data with two images in each of two classes or more."""
    from ..curate.active import UNLABELLED, find_label_issues

    if images.features is None or not images.labels:
        return [], "likely label errors: not computed (no features)"
    if isinstance(images.labels[0], tuple):
        return [], "likely label errors: not computed for multi-label data"
    first: dict[str, int] = {}
    rows = np.array([i for i, key in enumerate(images.keys) if first.setdefault(key, i) == i])
    labels = np.asarray(images.labels)[rows]
    values, counts = np.unique(labels, return_counts=True)
    usable = values[counts >= 2]
    if len(usable) < 2:
        return [], "likely label errors: not computed (need two images in each of two classes)"
    labels = np.where(np.isin(labels, usable), labels, UNLABELLED)
    folds = int(min(5, counts[counts >= 2].min()))
    from threadpoolctl import threadpool_limits

    jobs = min(folds, os.cpu_count() or 1) if len(rows) >= PARALLEL_FOLDS_FROM else None
    with threadpool_limits(1, user_api="blas"):  # small fits: BLAS threads only add overhead
        issues = find_label_issues(standardised(images.features[rows]), labels, n_folds=folds, seed=seed,
                                   n_jobs=jobs)
    return [Finding("label_issue", [images.paths[rows[x.index]]], round(1.0 - x.self_confidence, 4),
                    {"sets": [images.sets[rows[x.index]]], "labels": [classes[x.given_label]],
                     "given": classes[x.given_label], "predicted": classes[x.predicted_label],
                     "self_confidence": round(x.self_confidence, 4)}) for x in issues], \
        f"likely label errors: {folds}-fold out-of-fold predictions"


def standardised(x: np.ndarray) -> np.ndarray:
    """Features centred and scaled per dimension (the head's solver converges in fewer steps)."""
    x = x.astype(np.float64)
    return (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)


def summarise(sets: dict[str, LabelledImages], images: Images, bad, headers) -> dict:
    """Per set: files listed, usable, unreadable; images per class; sizes, modes, bit depths, formats."""
    summary = {}
    for name, data in sets.items():
        rows = [i for i, s in enumerate(images.sets) if s == name]
        classes = Counter()
        for i in rows:
            label = images.labels[i]
            for c in (label if isinstance(label, tuple) else (label,)):
                classes[data.classes[c]] += 1
        info = headers[name]
        widths = np.array([h["size"][0] for h in info]) if info else np.zeros(0)
        heights = np.array([h["size"][1] for h in info]) if info else np.zeros(0)
        summary[name] = {
            "files": len(data) + len(data.skipped), "usable": len(rows),
            "unreadable": sum(1 for s, _, _ in bad if s == name),
            "classes": {c: classes.get(c, 0) for c in data.classes},
            "sizes": {"width": stats(widths), "height": stats(heights),
                      "most_common": [[f"{w}x{h}", k] for (w, h), k in
                                      Counter(tuple(h["size"]) for h in info).most_common(5)]},
            "modes": dict(Counter(h["mode"] for h in info).most_common()),
            "bit_depths": {str(b): k for b, k in Counter(h["bits"] for h in info).most_common()},
            "formats": dict(Counter(str(h["format"]) for h in info).most_common()),
        }
    return summary


def stats(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def run_check(data, val_data=None, test_data=None, *, task: str = "auto", label_sep: str = "|",
              backbone: str = DEFAULT_BACKBONE, weights: str | None = None, image_size: int | None = None,
              cache_dir: str | None = None, thresholds: Thresholds | None = None, embeddings: bool = True,
              reporter=None) -> CheckReport:
    """Every check on `data` (class folders or a CSV, as `train` reads it) and the optional
    validation and test sets; `embeddings=False` runs only what needs no backbone (exact and
    hash near-duplicates, leaks, conflicts, the data's shape)."""
    thresholds = thresholds or Thresholds()
    started = time.perf_counter()
    sets = list_sets(data, val_data, test_data, task, label_sep)
    if sum(len(s) for s in sets.values()) == 0:
        raise DataError(f"{data}: no image files to check")
    classes = sets["train"].classes
    embed = Embedder(backbone, weights, image_size, cache_dir) if embeddings else None
    size = embed.size if embed else (image_size or 224)
    timings = {"setup_seconds": round(time.perf_counter() - started, 2)}
    notes = [f"features: {embed.origin}"] if embed else ["features: off (exact and hash near-duplicates only)"]
    if reporter:
        reporter.start("reading images", sum(len(s) for s in sets.values()))
    try:
        t = time.perf_counter()
        images, bad, headers = read_images(sets, size, embed,
                                           progress=(lambda i, n: reporter.advance()) if reporter else None)
        timings["read_seconds"] = round(time.perf_counter() - t, 2)
    finally:
        if reporter:
            reporter.stop()
    if embed is not None and embed.store is not None:
        notes.append(f"view store: {embed.hits} of {len(images.paths)} images' features reused")
        embed.store.trim()
    if not images.paths:
        first = f" (first: {bad[0][1]}: {bad[0][2]})" if bad else ""
        raise DataError(f"{data}: no usable images; {len(bad)} file(s) unreadable{first}")
    t = time.perf_counter()
    findings, ids = cluster_findings(images, classes, thresholds)
    timings["duplicates_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    outliers, fence = outlier_findings(images, ids, classes, thresholds)
    timings["outliers_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    issues, note = label_issue_findings(images, classes)
    timings["label_issues_seconds"] = round(time.perf_counter() - t, 2)
    if note:
        notes.append(note)
    if fence:
        notes.append(f"outliers: neighbour distance above {fence['fence']} (median {fence['median']})")
    findings += issues + outliers
    findings += [Finding("unreadable", [path], None, {"sets": [name], "reason": reason}) for name, path, reason in bad]
    order = {k: i for i, k in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], -(f.score or 0)))
    timings["total_seconds"] = round(time.perf_counter() - started, 2)
    return CheckReport(findings, summarise(sets, images, bad, headers), thresholds, notes, timings)


# -- output ------------------------------------------------------------------------------------

TITLES = {"leak": "LEAKAGE: clusters with members in more than one set",
          "label_conflict": "Conflicting labels inside a cluster",
          "exact_duplicate": "Exact duplicates (the same pixels)",
          "near_duplicate": "Near-duplicates",
          "label_issue": "Likely label errors (out-of-fold; score = 1 - p(given label))",
          "outlier": "Outliers (score = mean cosine distance to the nearest other images)",
          "unreadable": "Unreadable or skipped files"}


def describe(finding: Finding) -> str:
    sets = finding.detail.get("sets", [])
    labels = finding.detail.get("labels", [])
    if finding.kind == "unreadable":
        return f"{finding.paths[0]}: {finding.detail['reason']}"
    if finding.kind == "label_issue":
        return f"{finding.paths[0]} [{sets[0]}] labelled {finding.detail['given']!r}, looks like " \
               f"{finding.detail['predicted']!r}"
    parts = [f"{p} [{s}, {lab if isinstance(lab, str) else '|'.join(lab)}]" for p, s, lab in zip(finding.paths, sets, labels)]
    return "  ".join(parts)


def table(report: CheckReport, limit: int = 10) -> str:
    """The report as text: the data's shape, then each kind of finding (leaks first), `limit`
    rows of each."""
    lines = []
    for name, s in report.summary.items():
        balance = ", ".join(f"{c} {k}" for c, k in s["classes"].items())
        size = s["sizes"]["width"]
        shape = (f"; {s['sizes']['most_common'][0][0]} most common" if s["sizes"]["most_common"] else "")
        lines.append(f"{name}: {s['usable']} usable of {s['files']} file(s), {s['unreadable']} unreadable; "
                     f"classes: {balance}")
        if size:
            lines.append(f"  sizes: width {size['min']}-{size['max']}, height {s['sizes']['height']['min']}-"
                         f"{s['sizes']['height']['max']}{shape}; modes {s['modes']}; bit depths {s['bit_depths']}; "
                         f"formats {s['formats']}")
    for note in report.notes:
        lines.append(f"note: {note}")
    counts = {k: report.count(k) for k in KINDS}
    lines.append("found: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for kind in KINDS:
        found = [f for f in report.findings if f.kind == kind]
        if not found:
            continue
        lines.append("")
        lines.append(f"{TITLES[kind]}: {len(found)}")
        for f in found[:limit]:
            score = "" if f.score is None else f"{f.score:.3f}  "
            lines.append(f"  {score}{describe(f)}")
        if len(found) > limit:
            lines.append(f"  ... and {len(found) - limit} more (--format json, or --out DIR for all)")
    lines.append("")
    lines.append("exit status 1: leakage or conflicting labels found" if report.exit_code
                 else "no leakage, no conflicting labels")
    return "\n".join(lines)


def thumbnail(path: str, side: int = 112) -> str | None:
    """A data: URI of the image shrunk to `side` pixels (PNG), or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            from ..data.decode import decoded_rgb

            picture = decoded_rgb(image, side * 2)
            picture.thumbnail((side, side))
            buffer = io.BytesIO()
            picture.save(buffer, "PNG")
    except Exception:  # noqa: BLE001 - the page shows the path alone
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>transferkit check</title><style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}h2{margin-top:1.6em}
.f{border:1px solid #ccc;border-radius:6px;padding:.5em;margin:.5em 0;display:flex;gap:.6em;flex-wrap:wrap;align-items:flex-start}
.f.leak{border-color:#c00;background:#fff4f4}.f.label_conflict{border-color:#c60;background:#fff8ee}
figure{margin:0;width:124px;font-size:11px;word-break:break-all}figure img{display:block;max-width:112px;max-height:112px}
.s{font-weight:bold;min-width:5em}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
</style></head><body><h1>transferkit check</h1>
"""


def write_html(report: CheckReport, path: Path, limit: int = 200) -> Path:
    """DIR/check.html: one self-contained page (thumbnails inline, nothing from the network)."""
    parts = [PAGE, f"<p><b>{'Leakage or conflicting labels found (exit status 1)' if report.exit_code else 'No leakage, no conflicting labels'}</b></p>"]
    parts.append("<table><tr><th>kind</th><th>found</th></tr>" + "".join(
        f"<tr><td>{k}</td><td>{report.count(k)}</td></tr>" for k in KINDS) + "</table>")
    parts.append("<h2>Data</h2><table><tr><th>set</th><th>usable / files</th><th>unreadable</th><th>classes</th>"
                 "<th>modes</th><th>bit depths</th><th>most common sizes</th></tr>")
    for name, s in report.summary.items():
        parts.append(f"<tr><td>{name}</td><td>{s['usable']} / {s['files']}</td><td>{s['unreadable']}</td>"
                     f"<td>{html.escape(json.dumps(s['classes']))}</td><td>{html.escape(json.dumps(s['modes']))}</td>"
                     f"<td>{html.escape(json.dumps(s['bit_depths']))}</td>"
                     f"<td>{html.escape(json.dumps(s['sizes']['most_common']))}</td></tr>")
    parts.append("</table>" + "".join(f"<p>{html.escape(n)}</p>" for n in report.notes))
    cache: dict[str, str | None] = {}
    for kind in KINDS:
        found = [f for f in report.findings if f.kind == kind]
        if not found:
            continue
        parts.append(f"<h2 id='{kind}'>{html.escape(TITLES[kind])}: {len(found)}</h2>")
        for f in found[:limit]:
            figures = []
            for i, p in enumerate(f.paths):
                if p not in cache:
                    cache[p] = thumbnail(p) if kind != "unreadable" else None
                caption = html.escape(p)
                sets, labels = f.detail.get("sets", []), f.detail.get("labels", [])
                if i < len(sets):
                    caption += f"<br>[{html.escape(sets[i])}]"
                if i < len(labels):
                    lab = labels[i]
                    caption += " " + html.escape(lab if isinstance(lab, str) else "|".join(lab))
                image = f"<img alt='' src='{cache[p]}'>" if cache[p] else ""
                figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
            extra = ""
            if kind == "label_issue":
                extra = f"<br>looks like {html.escape(f.detail['predicted'])}"
            elif kind == "unreadable":
                extra = f"<br>{html.escape(f.detail['reason'])}"
            score = "" if f.score is None else f"{f.score:.3f}"
            parts.append(f"<div class='f {kind}'><div class='s'>{score}{extra}</div>{''.join(figures)}</div>")
        if len(found) > limit:
            parts.append(f"<p>... and {len(found) - limit} more in check.json</p>")
    parts.append("</body></html>\n")
    from ..utils.files import write_text

    write_text(path, "".join(parts))
    return path


def write_outputs(report: CheckReport, out: Path) -> tuple[Path, Path]:
    """DIR/check.json (every finding) and DIR/check.html."""
    from ..utils.files import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "check.json", json.dumps(report.to_dict(), indent=1) + "\n")
    return out / "check.json", write_html(report, out / "check.html")
