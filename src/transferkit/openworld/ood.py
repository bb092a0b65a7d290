"""How unlike the training images an image is: an out-of-distribution (OOD) score, higher is more
unusual, and the threshold above which a prediction is `unknown`.

The score is computed from what the trained run itself knows: its own pooled features (the
penultimate layer of the kept, fine-tuned model, which every prediction computes anyway) and its
logits. The methods (docs/openworld.md measures them):

- ``knn``: the Euclidean distance from the L2-normalised features to their k-th nearest neighbour
  among the training images' normalised features (Sun et al., ICML 2022), k = 10 by default;
- ``mahalanobis``: the smallest Mahalanobis distance to a class mean, with one shared covariance
  (Lee et al., NeurIPS 2018), shrunk by Ledoit-Wolf since a run has fewer images than features,
  as sqrt(d^2 / D) (D features: about 1 for a training image);
  ``mahalanobis_normalised``: the same on L2-normalised features;
- ``energy``: -logsumexp of the logits (Liu et al., NeurIPS 2020); ``max_logit``: -max logit
  (Hendrycks et al., ICML 2022); ``msp``: 1 - max probability. One logit (two classes) is the
  pair of logits (0, z).

What a method needs (the training images' features, or the class means and a whitening matrix)
and the validation images' scores, from which any `keep` fraction gives its threshold, are one
safetensors file in the run folder (`ood.safetensors`) whose SHA-256 model.json records. The bank
of training features is bounded: past `BANK_CAP` images a class-stratified random subset is kept
(the training log says so).

This module imports numpy at the top only; the scores are computed by torch (one implementation
for prediction and the ONNX export), imported where they are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.errors import ConfigError, RunError

FILE = "ood.safetensors"
METHODS = ("knn", "mahalanobis", "mahalanobis_normalised", "energy", "max_logit", "msp")
DEFAULT_METHOD = "knn"  # chosen by measurement: docs/openworld.md, "Which score"
DEFAULT_K = 10  # measured against 1 and 50: docs/openworld.md, "Which score"
DEFAULT_KEEP = 0.95
BANK_CAP = 10_000  # training images in the bank; past this a stratified random subset (logged)
BANKED = ("knn", "mahalanobis", "mahalanobis_normalised")  # the methods that need arrays besides the logits


def check_fraction(name: str, value) -> float:
    """A fraction strictly between 0 and 1 (--ood-keep, --coverage), or a one-line ConfigError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or not 0 < number < 1:
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    return number


def keep_threshold(val_scores: np.ndarray, keep: float) -> float:
    """The score above which an image is unknown, so that a fraction `keep` of the in-distribution
    validation images passes: the ceil(keep * n)-th smallest validation score (n: their number)."""
    scores = np.sort(np.asarray(val_scores, dtype=np.float64))
    if len(scores) == 0:
        raise RunError("no validation scores to fit the OOD threshold on")
    rank = min(len(scores), max(1, math.ceil(keep * len(scores) - 1e-9)))
    return float(scores[rank - 1])


@dataclass
class OodScorer:
    """A fitted score: `method`, its arrays (see `tensors`), and the validation images' scores."""

    method: str
    k: int = DEFAULT_K
    bank: np.ndarray | None = None  # knn: (N, D) L2-normalised training features
    means: np.ndarray | None = None  # mahalanobis: (C, D) whitened class means
    whitener: np.ndarray | None = None  # mahalanobis: (D, D), precision = W @ W.T
    val_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    notes: list[str] = field(default_factory=list)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the file's other arrays (conformal_scores)

    def tensors(self) -> dict[str, np.ndarray]:
        """What the file holds (float32)."""
        arrays = {"val_scores": self.val_scores}
        if self.method == "knn":
            arrays["bank"] = self.bank
        elif self.method.startswith("mahalanobis"):
            arrays.update(means=self.means, whitener=self.whitener)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    def score(self, features: np.ndarray, logits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """(N,) scores of pooled features (N, D) and logits (N, 1 or C), by batch."""
        import torch

        stats = {k: torch.from_numpy(v) for k, v in self.tensors().items() if k != "val_scores"}
        out = []
        with torch.inference_mode():
            for start in range(0, len(features), batch_size):
                f = torch.from_numpy(np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32))
                z = torch.from_numpy(np.ascontiguousarray(logits[start:start + batch_size], dtype=np.float32))
                out.append(score_torch(self.method, self.k, stats, f, z).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def threshold(self, keep: float) -> float:
        return keep_threshold(self.val_scores, keep)


def score_torch(method: str, k: int, stats: dict, features, logits):
    """The score in torch (prediction and the exported graph share it): `stats` holds the arrays
    of `OodScorer.tensors` as tensors (buffers of a module, in the export)."""
    import torch

    if method == "knn":
        z = torch.nn.functional.normalize(features, dim=1)
        similarity = z @ stats["bank"].T
        kth = torch.topk(similarity, k, dim=1).values[:, k - 1]
        return torch.sqrt(torch.clamp(2 - 2 * kth, min=0))
    if method.startswith("mahalanobis"):
        if method == "mahalanobis_normalised":
            features = torch.nn.functional.normalize(features, dim=1)
        y = features @ stats["whitener"]
        distances = (y.unsqueeze(1) - stats["means"].unsqueeze(0)).pow(2).sum(2)
        return torch.sqrt(distances.min(1).values / y.shape[1])  # per feature: about 1 for the training images
    if logits.shape[1] == 1:  # one logit for two classes: the logits (0, z)
        logits = torch.cat([torch.zeros_like(logits), logits], 1)
    if method == "energy":
        return -torch.logsumexp(logits, 1)
    if method == "max_logit":
        return -logits.max(1).values
    if method == "msp":
        return 1 - torch.softmax(logits, 1).max(1).values
    raise ConfigError(f"OOD method must be one of {', '.join(METHODS)}, got {method!r}")


def normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def subsample(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of at most `cap` images, every class (or label combination) in proportion."""
    n = len(labels)
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keys = labels if labels.ndim == 1 else np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    chosen = []
    for value in np.unique(keys):
        members = np.flatnonzero(keys == value)
        take = max(1, round(len(members) * cap / n))
        chosen.append(rng.choice(members, min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))[:cap]


def fit(method: str, features: np.ndarray, labels: np.ndarray, val_features: np.ndarray, val_logits: np.ndarray,
        k: int = DEFAULT_K, cap: int = BANK_CAP, seed: int = 0) -> OodScorer:
    """Fit `method` on the training images' pooled features (and labels: class indices, or a 0/1
    matrix for multi-label), then score the validation images, whose scores give the thresholds."""
    if method not in METHODS:
        raise ConfigError(f"OOD method must be one of {', '.join(METHODS)}, got {method!r}")
    features, labels = np.asarray(features, dtype=np.float32), np.asarray(labels)
    scorer = OodScorer(method, k=min(k, len(features)))
    if method in BANKED:
        keep = subsample(labels, cap, seed)
        if len(keep) < len(features):
            scorer.notes.append(f"OOD bank: {len(keep)} of {len(features)} training images (a stratified random "
                                f"subset; the bank is capped at {cap})")
        features, labels = features[keep], labels[keep]
        scorer.k = min(k, len(features))
    if method == "knn":
        scorer.bank = normalised(features).astype(np.float32)
    elif method.startswith("mahalanobis"):
        scorer.means, scorer.whitener = mahalanobis_stats(
            normalised(features) if method == "mahalanobis_normalised" else features, labels)
    scorer.val_scores = np.sort(scorer.score(val_features, val_logits)).astype(np.float32)
    return scorer


def mahalanobis_stats(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and a whitening matrix W of the shared, Ledoit-Wolf-shrunk covariance of the
    class-centred features: the squared Mahalanobis distance to mean c is ||x W - mu_c W||^2.
    Multi-label: a mean per class over the images that carry it."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    onehot = labels if labels.ndim == 2 else np.eye(int(labels.max()) + 1)[labels]
    present = onehot.sum(0) > 0
    means = (onehot[:, present].T @ x) / onehot[:, present].sum(0)[:, None]
    nearest = np.argmax(onehot[:, present], axis=1)  # multi-label: centre on one of the image's classes
    centred = x - means[nearest]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    values, vectors = np.linalg.eigh(covariance)
    whitener = vectors / np.sqrt(np.maximum(values, values.max() * 1e-9))
    return (means @ whitener).astype(np.float32), whitener.astype(np.float32)


def save(scorer: OodScorer, path: str | Path) -> str:
    """Write the scorer's arrays (and its `extra` ones: the conformal scores) as safetensors;
    returns the file's SHA-256."""
    from safetensors.numpy import save_file

    from ..utils.files import atomic_path, sha256_of

    arrays = {**scorer.tensors(), **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in scorer.extra.items()}}
    with atomic_path(Path(path)) as tmp:
        save_file(arrays, str(tmp))
        return sha256_of(tmp)


def describe(scorer: OodScorer, keep: float, sha256: str) -> dict:
    """model.json's "ood" entry."""
    return {"method": scorer.method, "k": scorer.k if scorer.method == "knn" else None,
            "file": FILE, "sha256": sha256, "keep": keep, "threshold": scorer.threshold(keep),
            "bank_size": 0 if scorer.bank is None else int(len(scorer.bank)),
            "validation_images": int(len(scorer.val_scores)),
            "features": "the kept model's pooled features (penultimate layer)",
            "meaning": "ood_score: higher is more unlike the training images; unknown: ood_score > threshold, "
                       "which a fraction `keep` of the validation images passes"}


def load(run_dir: str | Path, entry: dict) -> OodScorer:
    """The scorer model.json's "ood" `entry` describes, after checking its file's SHA-256."""
    from safetensors.numpy import load_file

    from ..utils.files import sha256_of

    path = Path(run_dir) / str(entry.get("file", FILE))
    method = entry.get("method")
    if method not in METHODS:
        raise RunError(f"{Path(run_dir) / 'model.json'}: ood.method must be one of {', '.join(METHODS)}, "
                       f"got {method!r}")
    if not path.is_file():
        raise RunError(f"{path}: not found (model.json names it for the OOD score); restore it or train again")
    if sha256_of(path) != entry.get("sha256"):
        raise RunError(f"{path}: does not match the SHA-256 in model.json (damaged or replaced); restore it "
                       "or train again")
    try:
        arrays = load_file(str(path))
        scorer = OodScorer(method, k=int(entry.get("k") or DEFAULT_K), bank=arrays.get("bank"),
                           means=arrays.get("means"), whitener=arrays.get("whitener"), val_scores=arrays["val_scores"],
                           extra={k: v for k, v in arrays.items() if k not in ("bank", "means", "whitener", "val_scores")})
    except Exception as exc:  # noqa: BLE001 - a file that matches its hash but not its description
        raise RunError(f"{path}: unreadable OOD file ({type(exc).__name__}: {exc}); train again") from None
    needed = {"knn": ["bank"], "mahalanobis": ["means", "whitener"],
              "mahalanobis_normalised": ["means", "whitener"]}.get(method, [])
    if any(getattr(scorer, name) is None for name in needed) or len(scorer.val_scores) == 0:
        raise RunError(f"{path}: lacks the arrays of the {method} score; train again")
    return scorer


def detection_metrics(in_scores: np.ndarray, out_scores: np.ndarray, keep: float = 0.95) -> dict:
    """How well scores separate in-distribution images (negatives) from OOD ones (positives):
    AUROC, and the false-positive rate at 95 % true-positive rate as the OOD literature counts it
    (the fraction of OOD images that pass a threshold that `keep` = 95 % of the in-distribution
    images pass)."""
    from sklearn.metrics import roc_auc_score

    in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    threshold = keep_threshold(in_scores, keep)
    return {"auroc": float(roc_auc_score(y, np.r_[in_scores, out_scores])),
            "fpr_at_95_tpr": float((out_scores <= threshold).mean()),
            "n_in": int(len(in_scores)), "n_out": int(len(out_scores))}
