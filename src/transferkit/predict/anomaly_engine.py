"""The engine of an anomaly run (`train --task anomaly`): load it (both files' SHA-256 checked),
score images (`anomaly_score`, `label` "anomaly" | "normal" against the run's threshold), and
evaluate on a labelled test folder whose normal class is named (AUROC, average precision, F1, the
false-alarm and miss rates at the threshold, each with a 95 % interval)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..data.decode import decode, decoded_batches
from ..data.listing import load_labelled
from ..utils.errors import DataError, RunError
from ..utils.files import sha256_of
from .metrics import wilson_interval

BANK = "bank.safetensors"
META, WEIGHTS = "model.json", "model.safetensors"  # as predict/run.py names them (it imports this module)
BOOTSTRAP = 1000  # resamples for the intervals of AUROC, average precision and F1


def check_anomaly_meta(meta: dict, where) -> None:
    """The values an anomaly score depends on; RunError naming the first bad one."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    section = meta.get("anomaly")
    if not isinstance(section, dict):
        raise RunError(f"{where}: no 'anomaly' section (an anomaly run's model.json has one)")
    for key in ("bank_sha256", "layers", "keep"):
        if key not in section:
            raise RunError(f"{where}: anomaly.{key} missing")
    if not number(meta.get("threshold")) or meta["threshold"] < 0:
        raise RunError(f"{where}: threshold must be a finite number >= 0, got {meta.get('threshold')!r}")
    pre = meta.get("preprocess")
    size = pre.get("image_size") if isinstance(pre, dict) else None
    if not (isinstance(size, int) and 16 <= size <= 2048):
        raise RunError(f"{where}: preprocess.image_size must be an integer in [16, 2048], got {size!r}")
    for key in ("backbone", "model_sha256"):
        if key not in meta:
            raise RunError(f"{where}: no {key!r}")


def load_detector(run_dir: str | Path, device: str = "cpu") -> "AnomalyDetector":
    """The anomaly detector of a run folder, after checking model.json and both files' hashes."""
    import torch
    from safetensors.torch import load_file

    from ..models.backbones import timm_model
    from ..models.fold import fold_batchnorm
    from ..openworld.anomaly import BankModel, GaussianModel, PatchFeatures
    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise RunError(f"{run_dir / META}: not found or unreadable (is {run_dir} a transferkit run folder?)")
    if meta.get("task") != "anomaly":
        raise RunError(f"{run_dir}: a classifier run, not an anomaly run; this needs a run trained with "
                       "--task anomaly (a classifier's evaluate takes no --normal-class)")
    if meta.get("status") != "complete":
        raise RunError(f"{run_dir}: the run is {meta.get('status') or 'incomplete'}, not complete; train it again")
    check_anomaly_meta(meta, run_dir / META)
    files = {}
    for name, key in ((WEIGHTS, "model_sha256"), (meta["anomaly"].get("bank", BANK), "bank_sha256")):
        path = run_dir / name
        expected = meta[key] if key == "model_sha256" else meta["anomaly"][key]
        if not path.is_file():
            raise RunError(f"{path}: not found (is {run_dir} a complete anomaly run?)")
        if sha256_of(path) != expected:
            raise RunError(f"{path}: does not match the SHA-256 in {META} (damaged or replaced); restore it or "
                           "train again")
        files[name] = path
    try:
        backbone = timm_model(meta["backbone"], num_classes=0, **meta.get("timm_kwargs", {}))
        backbone.load_state_dict(load_file(str(files[WEIGHTS])))
        stats = load_file(str(files[meta["anomaly"].get("bank", BANK)]))
        pre = meta["preprocess"]
        features = PatchFeatures(fold_batchnorm(backbone.eval()), meta["anomaly"]["layers"], pre["mean"], pre["std"])
        size = int(pre["image_size"])
        if meta["anomaly"].get("scorer", "patches") == "gaussian":
            model = GaussianModel(features, stats["mean"], stats["precision"], stats["channels"], size)
            shapes_ok = (stats["mean"].ndim == 2 and stats["precision"].shape == (*stats["mean"].shape,
                                                                                   stats["mean"].shape[1])
                         and stats["channels"].shape == (stats["mean"].shape[1],))
        else:
            model = BankModel(features, stats["bank"], size)
            shapes_ok = stats["bank"].ndim == 2
        model = model.to(device).eval()
    except Exception as exc:  # noqa: BLE001 - any inconsistency means an unusable run
        raise RunError(f"{run_dir}: cannot load the anomaly model ({type(exc).__name__}: {exc})") from None
    if not shapes_ok or not all(torch.isfinite(t.float()).all() for t in stats.values()):
        raise RunError(f"{files[BANK]}: its statistics are not finite matrices of the expected shapes; train again")
    return AnomalyDetector(model, meta)


class AnomalyDetector:
    """What `predict`, `evaluate` and `explain` need of an anomaly run."""

    name = "torch"
    task = "anomaly"
    multilabel = False

    def __init__(self, model, meta: dict):
        self.model, self.meta = model, dict(meta)

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def image_size(self) -> int:
        return int(self.meta["preprocess"]["image_size"])

    @property
    def version(self) -> str:
        return str(self.meta.get("model_version", ""))

    @property
    def device(self):
        return self.model.blur.device

    def score(self, images: np.ndarray, batch_size: int = 16, maps: bool = False):
        """(scores (N,), maps (N, S, S) or None) of uint8 images (N, S, S, 3) of this model's size."""
        from ..openworld.anomaly import score_batches

        scores, shown = score_batches(self.model, np.asarray(images), self.device, batch_size, maps)
        if not np.isfinite(scores).all():
            raise RunError("the model computed NaN or infinite anomaly scores (damaged bank or weights)")
        return scores, shown

    def record(self, path: str, score: float) -> dict:
        return {"path": path, "anomaly_score": float(score), "label": "anomaly" if score > self.threshold else "normal",
                "threshold": self.threshold}

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 16, workers: int | None = None,
                      tta: bool = False) -> Iterator[dict]:
        """One record per file, in order: {path, anomaly_score, label, threshold} or {path, error}."""
        if tta:
            raise RunError("--tta is for classifiers; an anomaly run scores each image as it is")
        for batch in decoded_batches(paths, self.image_size, batch_size, workers):
            if isinstance(batch, tuple):
                yield {"path": batch[0], "error": batch[1]}
                continue
            scores, _ = self.score(np.stack([a for _, a in batch]), batch_size)
            for (path, _), s in zip(batch, scores):
                yield self.record(path, s)

    def read_test(self, source: str | Path, normal_class: str | None = None):
        """(decoded images, 1 for anomalous / 0 for normal, the classes' counts) of a labelled test
        folder or CSV: `normal_class` (default: the run's) is normal, every other class anomalous."""
        normal = normal_class or self.meta.get("normal_class")
        listed = load_labelled(source)
        if normal not in listed.classes:
            hint = "" if normal_class else " (the run's normal class; name another with --normal-class)"
            raise DataError(f"{source}: no class {normal!r}{hint} among its classes {listed.classes}; a test "
                            "folder needs the normal class and at least one other")
        if len(listed.classes) < 2:
            raise DataError(f"{source}: only the normal class {normal!r}; a test folder needs anomalous images "
                            "too (another class folder)")
        data = decode(listed, self.image_size)
        index = listed.classes.index(normal)
        y = (data.labels != index).astype(np.int64)
        if y.sum() == 0 or y.sum() == len(y):
            raise DataError(f"{source}: no usable {'anomalous' if y.sum() == 0 else 'normal'} images after decoding")
        return data, y, normal

    def evaluate(self, source: str | Path, normal_class: str | None = None, batch_size: int = 16,
                 tta: bool = False) -> dict:
        if tta:
            raise RunError("--tta is for classifiers; an anomaly run scores each image as it is")
        data, y, normal = self.read_test(source, normal_class)
        scores, _ = self.score(data.images, batch_size)
        metrics = anomaly_metrics(y, scores, self.threshold)
        metrics.update(source=str(source), normal_class=normal,
                       counts={c: int((data.labels == i).sum()) for i, c in enumerate(data.classes)},
                       skipped=[{"path": p, "reason": r} for p, r in data.skipped])
        return metrics


def anomaly_metrics(y: np.ndarray, scores: np.ndarray, threshold: float, seed: int = 0) -> dict:
    """Image-level metrics of anomaly scores (y: 1 anomalous, 0 normal): AUROC, average precision,
    F1 at the threshold (and the best F1 over all thresholds, for comparison), the false-alarm rate
    (normal images flagged) and the miss rate (anomalous images passed); 95 % intervals: Wilson for
    the rates, a stratified percentile bootstrap for AUROC, AP and F1."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y, scores = np.asarray(y), np.asarray(scores, dtype=np.float64)
    flagged = scores > threshold
    tp, fp = int((flagged & (y == 1)).sum()), int((flagged & (y == 0)).sum())
    fn, tn = int((~flagged & (y == 1)).sum()), int((~flagged & (y == 0)).sum())

    def f1_of(yy, ff):
        t, p, n = int((ff & (yy == 1)).sum()), int((ff & (yy == 0)).sum()), int((~ff & (yy == 1)).sum())
        return 2 * t / (2 * t + p + n) if t + p + n else 0.0

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    index = np.concatenate([rng.choice(pos, (BOOTSTRAP, len(pos))), rng.choice(neg, (BOOTSTRAP, len(neg)))], 1)
    yb, sb, fb = y[index], scores[index], flagged[index]  # (BOOTSTRAP, n): stratified resamples, vectorised
    tp_b, fp_b, fn_b = (fb & (yb == 1)).sum(1), (fb & (yb == 0)).sum(1), (~fb & (yb == 1)).sum(1)
    boot = {"auroc": ranked_auroc(yb, sb), "average_precision": ranked_ap(yb, sb),
            "f1": 2 * tp_b / np.maximum(1, 2 * tp_b + fp_b + fn_b)}
    precision, recall, _ = precision_recall_curve(y, scores)
    best = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    ci = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in boot.items()}
    return {
        "task": "anomaly", "n": len(y), "n_anomalous": int(y.sum()), "n_normal": int((y == 0).sum()),
        "threshold": float(threshold),
        "auroc": float(roc_auc_score(y, scores)), "auroc_ci95": ci["auroc"],
        "average_precision": float(average_precision_score(y, scores)),
        "average_precision_ci95": ci["average_precision"],
        "f1": f1_of(y, flagged), "f1_ci95": ci["f1"], "f1_best_threshold": float(best),
        "false_alarm_rate": fp / max(1, fp + tn), "false_alarm_rate_ci95": list(wilson_interval(fp, fp + tn)),
        "miss_rate": fn / max(1, fn + tp), "miss_rate_ci95": list(wilson_interval(fn, fn + tp)),
        "confusion": {"true_anomaly_flagged": tp, "true_anomaly_passed": fn, "normal_flagged": fp,
                      "normal_passed": tn},
    }


def ranked_auroc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U from average ranks, as roc_auc_score counts ties)."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)
    n1 = y.sum(1)
    n0 = y.shape[1] - n1
    return ((ranks * y).sum(1) - n1 * (n1 + 1) / 2) / np.maximum(1, n1 * n0)


def ranked_ap(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision of each row (the mean precision at each anomalous image, by descending score;
    ties broken by order, which the bootstrap's intervals tolerate)."""
    order = np.argsort(-s, axis=1, kind="stable")
    hits = np.take_along_axis(y, order, 1)
    precision = np.cumsum(hits, 1) / np.arange(1, y.shape[1] + 1)
    return (precision * hits).sum(1) / np.maximum(1, hits.sum(1))


def holdout_metrics(scores: np.ndarray, threshold: float, keep: float) -> dict:
    """What the held-out good images say about the threshold: their false-alarm rate (in-sample:
    they fitted it) and the score spread."""
    scores = np.asarray(scores, dtype=np.float64)
    flagged = int((scores > threshold).sum())
    return {"task": "anomaly", "split": "held-out good images (they fitted the threshold)", "n": len(scores),
            "keep": keep, "threshold": float(threshold), "false_alarm_rate": flagged / len(scores),
            "false_alarm_rate_ci95": list(wilson_interval(flagged, len(scores))),
            "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99")}}
