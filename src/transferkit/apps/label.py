"""`transferkit label POOL --labels labels.csv`: a local web app that turns a folder of unlabelled
images into a labelled CSV, choosing which image to label next and pointing at labels that look
wrong.

- `LabelFile`: labels.csv (`path,label`, paths relative to the CSV: what `train` reads). Every
  change rewrites the whole file atomically under a lock (a temporary name, then a rename), so two
  tabs never interleave their lines and a killed server leaves the file as it was before or after
  the change being written; another `transferkit label` on the same CSV is refused.
- `list_pool`, `Featurizer`, `extract_pool`: the pool's images (recursive; unreadable, non-image,
  duplicate files and links out of the pool skipped with their reason) as pooled backbone
  features, computed once and kept by content in the cross-run view store (`--cache-dir`); with a
  run, each image's `PoolScore` too (a classifier's OOD score, or an anomaly run's score), which
  the strategies "ood" and "anomaly" order the pool by.
- `Session`: the labels, the head retrained on the cached features of the labelled images
  (`active.head`, in seconds), the ranked queue (`active.suggest`), the cross-validated accuracy
  and the review of suspicious labels (`active.find_label_issues`). Thread-safe.
- `create_app`: the FastAPI app and its page (`label.html`, self-contained, strict CSP).
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import os
import shlex
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..cfg.settings import DEFAULT_BACKBONE
from ..curate.active import (SCORED, STRATEGIES, UNLABELLED, check_strategy, cross_val_accuracy, find_label_issues,
                             head, suggest)
from ..data.decode import display_image, iter_decoded, iter_pixels
from ..data.listing import image_key, walk_files
from ..data.window import Rules, measure, sample, with_window
from ..utils.errors import ApiError, DataError, ImageError, TransferkitError
from ..utils.files import write_text
from .web import error, json_body, page, web_app

SHOWN = 24  # queue entries sent to the page (the grid)
SHOWN_BAD = 200  # skipped files listed on the page (all are counted)
REVIEW = 100  # suspicious labels listed by the review
MAX_CLASS_NAME = 100


def check_class_name(name) -> str:
    """A class name as `train` reads it back from the CSV: non-empty, no edge spaces, no control
    characters, at most 100 characters."""
    if (not isinstance(name, str) or not name or name != name.strip() or len(name) > MAX_CLASS_NAME
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise DataError(f"class name must be 1-{MAX_CLASS_NAME} characters without edge spaces or control "
                        f"characters, got {name!r}")
    return name


class LabelFile:
    """labels.csv as {absolute normalised path: label}, in file order. `set` changes one row and
    rewrites the file atomically; the in-memory rows change only once the file is written.
    Rows for images outside the pool are kept as they are. Holds an exclusive lock on
    `.NAME.lock` beside the file until `close`."""

    def __init__(self, path: str | Path):
        self.path = Path(os.path.abspath(path))
        self.folder = self.path.parent
        if not self.folder.is_dir():
            raise DataError(f"{path}: its folder {self.folder} does not exist")
        self.lock = threading.Lock()
        self._lock_file = open(self.folder / f".{self.path.name}.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise DataError(f"{path}: in use by another `transferkit label` (one labelling server per CSV; "
                            "open its page in more tabs instead)") from None
        try:
            self.rows = self._read() if self.path.exists() else {}
        except DataError:
            self.close()
            raise

    def close(self) -> None:
        self._lock_file.close()  # releases the lock

    def key(self, file: str | Path) -> str:
        return os.path.normpath(os.path.abspath(file))

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                names = [(n or "").strip() for n in reader.fieldnames or []]
                rows = [(reader.line_num, row) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{self.path}: cannot read CSV ({exc})") from None
        if not names:
            return {}
        if sorted(names) != ["label", "path"]:
            raise DataError(f"{self.path}: expected exactly the columns path,label (labelling rewrites the file), "
                            f"got {names}")
        reader.fieldnames = names
        found: dict[str, str] = {}
        for line, row in rows:
            raw, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not raw or not label:
                raise DataError(f"{self.path}:{line}: empty path or label; fix or remove the line first")
            try:
                check_class_name(label)
            except DataError as exc:
                raise DataError(f"{self.path}:{line}: {exc}") from None
            file = self.key(raw if os.path.isabs(raw) else self.folder / raw)
            if found.get(file, label) != label:
                raise DataError(f"{self.path}:{line}: {raw} is labelled {label!r} here and {found[file]!r} "
                                "earlier; one image, one label")
            found[file] = label
        return found

    def set(self, file: str | Path, label: str | None) -> str | None:
        """Label `file` (a new row at the end, or its row changed in place), or remove its row
        (`label` None). Returns the previous label."""
        key = self.key(file)
        with self.lock:
            previous = self.rows.get(key)
            rows = dict(self.rows)
            if label is None:
                rows.pop(key, None)
            else:
                rows[key] = label
            if rows != self.rows:
                self._write(rows)
                self.rows = rows
            return previous

    def _write(self, rows: dict[str, str]) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows([os.path.relpath(file, self.folder), label] for file, label in rows.items())
        write_text(self.path, text.getvalue())


def list_pool(root: Path, exclude: set[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files below `root` (recursive, sorted; the bad-file rules of `train`), without links
    that lead out of the pool and without the paths in `exclude` (absolute: the labels CSV)."""
    skipped: list[tuple[str, str]] = []
    top = os.path.realpath(root)
    files = []
    for path in walk_files(root, skipped):
        real = os.path.realpath(path)
        if not real.startswith(top + os.sep):
            skipped.append((str(path), f"symlink out of the pool (to {real}); not served"))
        elif os.path.abspath(path) not in exclude:
            files.append(path)
    return files, skipped


@dataclass
class PoolScore:
    """A score of each pool image, higher more unusual, that the strategy of the same `name`
    orders the pool by: "ood", a classifier run's OOD score (how unlike its training images), or
    "anomaly", an anomaly run's score. `of(images, features)`: the (n,) scores of a batch of
    decoded images (uint8, the model's size) and their pooled features."""

    name: str
    title: str  # how the page names it
    threshold: float
    above: str  # what a score above the threshold means, for the page
    of: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "threshold": self.threshold, "above": self.above}


@dataclass
class Featurizer:
    """Pool images to pooled features: the model (a run's, or a pretrained backbone), its input
    size, the view store (None: off) and, with a classifier run, its calibrated head and classes.
    `rules`: how high-bit-depth images are read: a run's intensity window, or without a run one
    measured on the pool itself (the data set here) by `extract_pool`. `score`: the run's score of
    each image (None: no run, or a classifier run without an OOD score); `first_classes`: the
    classes a session starts with besides the run's (an anomaly run: its normal class and
    "anomaly"); `run`, `task`: the run given, and "anomaly" or "classifier"."""

    model: object  # TransferModel
    size: int
    store: object | None  # FeatureStore
    classes: list[str]
    origin: str
    rules: Rules = field(default_factory=Rules)
    from_run: bool = False
    score: PoolScore | None = None
    first_classes: list[str] = field(default_factory=list)
    run: str | None = None
    task: str | None = None

    @classmethod
    def build(cls, run: str | Path | None = None, backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
              image_size: int | None = None, cache_dir: str | None = None) -> "Featurizer":
        from ..cfg.settings import TrainConfig
        from ..models.backbones import create_backbone
        from ..models.transfer import TransferModel
        from ..predict.run import is_anomaly_run, load
        from ..training.cache import feature_store

        rules, score, first, task = Rules(), None, [], None
        if run is not None and is_anomaly_run(run):
            model, size, sha, name, score, first = anomaly_features(run)
            classes, origin, task = [], f"anomaly run {run} ({name})", "anomaly"
        elif run is not None:
            classifier = load(run)
            model, meta, rules = classifier.model, classifier.meta, classifier.rules
            size, sha, name = int(meta["preprocess"]["image_size"]), meta["model_sha256"], meta["backbone"]
            classes, origin, task = list(classifier.classes), f"run {run} ({name})", "classifier"
            score = ood_score(classifier)
        else:
            made = create_backbone(backbone, weights, image_size)
            defaults = TrainConfig()
            model = TransferModel(made.model, 2, made.preprocess, flip=defaults.flip, rotation=defaults.rotation)
            size, sha, name = made.preprocess.image_size, made.weights_sha256, made.name
            classes, origin = [], f"{name}, weights {made.weights}"
        config = TrainConfig(backbone=name, cache_dir=cache_dir)
        store = feature_store(config, model.eval(), sha, None, size, False, ((model.head.in_features,), None))
        return cls(model, size, store, classes, origin, rules, run is not None, score, first,
                   None if run is None else str(run), task)

    @property
    def default_strategy(self) -> str:
        """An anomaly run's pool is ordered by its score; any other by uncertainty."""
        return "anomaly" if self.task == "anomaly" else "uncertainty"

    def strategies(self) -> list[str]:
        """The strategies this featurizer can order a pool by: a scored one only with its score."""
        return [s for s in STRATEGIES if s not in SCORED or (self.score is not None and self.score.name == s)]

    def check_strategy(self, strategy) -> str:
        """`strategy` when this featurizer can order by it; a one-line error saying why not."""
        check_strategy(strategy)
        if strategy in self.strategies():
            return strategy
        if strategy == "ood" and self.task is None:
            raise DataError("strategy 'ood' orders the pool by a run's OOD score: give --run RUN, a classifier "
                            "trained with one")
        if strategy == "ood" and self.task == "anomaly":
            raise DataError(f"{self.run}: an anomaly run orders the pool by its anomaly score (strategy "
                            "'anomaly'), not by an OOD score")
        if strategy == "ood":
            raise DataError(f"{self.run}: no OOD score (its model.json has no 'ood' entry: the run predates them), "
                            "so no OOD order; train it again, or use another strategy")
        if self.task is None:
            raise DataError("strategy 'anomaly' orders the pool by an anomaly run's score: give --run RUN, a run "
                            "trained with --task anomaly")
        hint = " (this run's OOD score orders the pool: strategy 'ood')" if self.score is not None else ""
        raise DataError(f"{self.run}: a classifier run, not an anomaly run; strategy 'anomaly' needs a run "
                        f"trained with --task anomaly{hint}")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The run's calibrated probabilities (N, C) of pooled features."""
        import torch

        with torch.inference_mode():
            logits = self.model.head(torch.from_numpy(features.astype(np.float32)))
            return self.model.probabilities(logits).numpy().astype(np.float64)


def ood_score(classifier) -> PoolScore | None:
    """A classifier run's OOD score of pool images, from their pooled features and the run's logits
    of them (what `predict` computes: the same features), or None for a run without one."""
    scorer = classifier.scorer
    if scorer is None:
        return None
    import torch

    def of(_images: np.ndarray, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = classifier.model.head(torch.from_numpy(np.ascontiguousarray(features, np.float32))).numpy()
        return scorer.score(features, logits)

    return PoolScore("ood", "OOD score", float(classifier.open_world.threshold), "unlike the run's training images", of)


def anomaly_features(run: str | Path):
    """What labelling with an anomaly run uses: its own backbone (model.safetensors) for the pooled
    features at its input size, its anomaly score of each image, and the classes good/defective
    (its normal class and "anomaly", the labels `evaluate --normal-class` reads back).
    Returns (model, size, weights sha256, backbone name, PoolScore, classes)."""
    from ..cfg.settings import TrainConfig
    from ..models.backbones import Preprocess, create_backbone
    from ..models.transfer import TransferModel
    from ..predict.anomaly_engine import WEIGHTS, load_detector

    detector = load_detector(run)
    meta, size = detector.meta, detector.image_size
    made = create_backbone(meta["backbone"], Path(run) / WEIGHTS, size, meta.get("timm_kwargs"))
    preprocess = Preprocess(size, tuple(meta["preprocess"]["mean"]), tuple(meta["preprocess"]["std"]))
    defaults = TrainConfig()
    model = TransferModel(made.model, 2, preprocess, flip=defaults.flip, rotation=defaults.rotation)

    def of(images: np.ndarray, _features: np.ndarray) -> np.ndarray:
        return detector.score(images, len(images))[0]

    score = PoolScore("anomaly", "anomaly score", detector.threshold, "anomaly", of)
    normal = str(meta.get("normal_class") or "normal")
    return model, size, made.weights_sha256, made.name, score, [normal, "anomaly"]


def extract_pool(featurizer: Featurizer, files: list[Path], progress: Callable[[int], None] | None = None,
                 batch_size: int = 32) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    """(indices of the usable files, their pooled features (n, F), skipped files with the reason):
    `extract_scored_pool` without the scores."""
    return extract_scored_pool(featurizer, files, progress, batch_size)[:3]


def extract_scored_pool(featurizer: Featurizer, files: list[Path], progress: Callable[[int], None] | None = None,
                        batch_size: int = 32):
    """(indices of the usable files, their pooled features (n, F), skipped files with the reason,
    their scores (n,) by `featurizer.score`, or None without one). Files are decoded as `train`
    decodes them; a second copy of the same pixels is skipped (one image, one label); features
    already in the view store are read, not computed (scores always are)."""
    import torch

    from ..models.fold import fold_batchnorm
    from ..training.cache import extract

    kept, rows, scores, skipped, first, pending = [], [], [], [], {}, []
    done, backbone = 0, fold_batchnorm(featurizer.model.backbone)  # as `train` extracts

    def flush() -> None:
        nonlocal done
        images = np.stack([p[1] for p in pending])
        pooled, _ = extract(featurizer.model, images, 1, None, None, batch_size,
                            torch.device("cpu"), dtype=np.float32, store=featurizer.store,
                            keys=[p[2] for p in pending], backbone=backbone)
        rows.append(np.asarray(pooled[0], dtype=np.float32))
        if featurizer.score is not None:
            scores.append(np.asarray(featurizer.score.of(images, rows[-1]), dtype=np.float64))
        kept.extend(p[0] for p in pending)
        done += len(pending)
        pending.clear()

    def decoded():
        """(index, path, uint8 or reason): high-bit-depth images without a window wait for the pool's."""
        rules, waiting = featurizer.rules, []
        for i, (path, pixels) in enumerate(iter_pixels([str(f) for f in files], featurizer.size, pages=rules.pages)):
            if isinstance(pixels, str):
                yield i, path, pixels
            elif pixels.high and rules.window_for(pixels.own_window) is None and not featurizer.from_run:
                waiting.append((i, sample(pixels.array), pixels.depth))
            else:
                try:
                    yield i, path, rules.to_uint8(pixels.array, pixels.own_window, pixels.depth)
                except ImageError as exc:
                    yield i, path, str(exc)
        if waiting:  # the pool is the data set: its window, as `train` measures one
            from ..cfg.settings import TrainConfig

            config = TrainConfig()
            window, _ = measure([s for _, s, _ in waiting], config.window_low, config.window_high)
            featurizer.rules = with_window(rules, window, {"percentiles": [config.window_low, config.window_high],
                                                           "images": len(waiting), "measured_on": "the pool"})
            index = [i for i, _, _ in waiting]
            for i, (path, result) in zip(index, iter_decoded([str(files[i]) for i in index], featurizer.size,
                                                             rules=featurizer.rules)):
                yield i, path, result

    for i, path, result in decoded():
        if isinstance(result, str):
            skipped.append((path, result))
            done += 1
        else:
            key = image_key(result)
            if key in first:
                skipped.append((path, f"same image as {files[first[key]]} (labelled once)"))
                done += 1
            else:
                first[key] = i
                pending.append((i, result, key))
                if len(pending) == batch_size:
                    flush()
        if progress:
            progress(done)
    if pending:
        flush()
        if progress:
            progress(done)
    if featurizer.store is not None:
        featurizer.store.trim()
    dim = featurizer.model.head.in_features
    features = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    if featurizer.score is None:
        return kept, features, skipped, None
    return kept, features, skipped, np.concatenate(scores) if scores else np.zeros(0)


def fold_count(labels: np.ndarray) -> tuple[np.ndarray, int | None]:
    """`labels` with the images of classes that have a single label set to unlabelled (no fold
    could both train and test them), and the number of folds (up to 5; None when fewer than two
    classes have two labels)."""
    classes, counts = np.unique(labels[labels != UNLABELLED], return_counts=True)
    usable = classes[counts >= 2]
    if len(usable) < 2:
        return labels, None
    return np.where(np.isin(labels, usable), labels, UNLABELLED), int(min(5, counts[counts >= 2].min()))


class Session:
    """One labelling session over a pool: thread-safe state behind the app. Nothing here blocks
    on a fit while holding the lock: retraining works on a snapshot and installs its result."""

    def __init__(self, root: str | Path, labels: LabelFile, featurizer: Featurizer, classes: list[str] | None = None,
                 strategy: str | None = None, retrain_every: int = 10):
        strategy = featurizer.check_strategy(featurizer.default_strategy if strategy is None else strategy)
        if isinstance(retrain_every, bool) or not isinstance(retrain_every, int) or retrain_every < 1:
            raise DataError(f"retrain_every must be a positive integer, got {retrain_every!r}")
        self.root, self.labels_file, self.featurizer = Path(root), labels, featurizer
        if not self.root.is_dir():
            raise DataError(f"{root}: not a folder (expected a folder of images to label)")
        self.top = os.path.realpath(self.root)
        self.strategy, self.retrain_every = strategy, retrain_every
        # the run's classes first: its probabilities' columns
        self.classes = list(dict.fromkeys([*featurizer.classes, *featurizer.first_classes,
                                           *map(check_class_name, classes or []), *labels.rows.values()]))
        self.lock = threading.RLock()
        self.status, self.error, self.done = "listing", None, 0
        self.files, self.bad = list_pool(self.root, {str(labels.path)})
        if not self.files:
            raise DataError(f"{root}: no files to label" + (f" ({len(self.bad)} skipped, first: {self.bad[0][0]}: "
                                                            f"{self.bad[0][1]})" if self.bad else ""))
        self.paths: list[str] = []  # usable images, relative to the pool (posix)
        self.index: dict[str, int] = {}
        self.features = np.zeros((0, 0), np.float32)
        self.labels = np.zeros(0, np.int64)
        self.scores: np.ndarray | None = None  # (N,) the featurizer's score of each image, if it has one
        self.user_skipped: set[int] = set()
        self.probabilities: np.ndarray | None = None  # (N, C) columns in class order at fit time
        self.accuracy: float | None = None
        self.folds: int | None = None
        self.queue: list[int] = []
        self.retrains, self.since_retrain, self.retraining = 0, 0, False
        self._wake, self._closing = threading.Event(), False

    # --- preparation (a background thread) ---

    def prepare(self) -> None:
        """Extract the pool's features (progress in `done`), map the CSV's rows onto them, then
        retrain (when there are labels of two classes) and rank."""
        try:
            with self.lock:
                self.status = "extracting"
            kept, features, skipped, scores = extract_scored_pool(self.featurizer, self.files, self._progress)
            labels = np.full(len(kept), UNLABELLED, dtype=np.int64)
            paths = [self.files[i].relative_to(self.root).as_posix() for i in kept]
            for j, i in enumerate(kept):
                label = self.labels_file.rows.get(self.labels_file.key(self.files[i]))
                if label is not None:
                    labels[j] = self.classes.index(label)
            with self.lock:
                self.paths, self.features, self.labels, self.scores = paths, features, labels, scores
                self.index = {p: j for j, p in enumerate(paths)}
                self.bad = self.bad + skipped
                self.status = "ready"
            self.retrain()
        except Exception as exc:  # noqa: BLE001 - shown on the page; the server keeps answering
            with self.lock:
                self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise

    def _progress(self, done: int) -> None:
        self.done = done

    # --- retraining (a background worker; requests coalesce) ---

    def request_retrain(self) -> None:
        self._wake.set()

    def worker(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            self.retrain()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def retrain(self) -> None:
        """Fit the head on the labelled images' features, estimate its accuracy by
        cross-validation, and re-rank the queue."""
        with self.lock:
            if self.status != "ready":
                return
            labels, features, n_classes = self.labels.copy(), self.features, len(self.classes)
            self.since_retrain, self.retraining = 0, True
        try:
            known = labels != UNLABELLED
            probabilities = accuracy = folds = None
            fitted = len(np.unique(labels[known])) >= 2
            if fitted:
                model = head().fit(features[known], labels[known])
                probabilities = np.zeros((len(labels), n_classes))
                probabilities[:, model.classes_] = model.predict_proba(features)
                usable, folds = fold_count(labels)
                if folds is not None:
                    accuracy = cross_val_accuracy(features, usable, n_folds=folds)
            elif self.featurizer.classes and len(labels):
                probabilities = np.zeros((len(labels), n_classes))
                probabilities[:, :len(self.featurizer.classes)] = self.featurizer.probabilities(features)
            with self.lock:
                self.probabilities, self.accuracy, self.folds = probabilities, accuracy, folds
                self.retrains += fitted
                self.rank()
        finally:
            with self.lock:
                self.retraining = False

    def rank(self) -> None:
        """The next batch by the strategy, among the unlabelled images not skipped: as many as
        the labels between two retrains (`retrain_every`), the batch the head learns from next.
        Labelled past it before the retrain is done, the queue is ranked again (`state`). A
        scored strategy orders the whole pool (its order does not change with the labels)."""
        with self.lock:
            keep = np.array([i for i in range(len(self.labels)) if i not in self.user_skipped], dtype=np.int64)
            n = int((self.labels[keep] == UNLABELLED).sum()) if len(keep) else 0
            if n == 0:
                self.queue = []
                return
            probabilities = None
            if self.probabilities is not None and self.strategy == "uncertainty":
                probabilities = self.probabilities[keep]
            scored = self.strategy in SCORED
            picks = suggest(self.features[keep], self.labels[keep], n if scored else min(self.retrain_every, n),
                            self.strategy, seed=self.retrains, probabilities=probabilities,
                            scores=self.scores[keep] if scored else None)
            self.queue = keep[picks].tolist()

    # --- what the page does ---

    def image(self, path: str) -> int:
        """The index of a usable pool image by its path relative to the pool; nothing else."""
        with self.lock:
            i = self.index.get(path) if isinstance(path, str) else None
        if i is None:
            raise ApiError(404, f"{path!r} is not an image of the pool")
        return i

    def file(self, path: str) -> Path:
        """The file of a pool image, refused if it became a link out of the pool since listing."""
        i = self.image(path)
        with self.lock:
            file = self.root / self.paths[i]
        if not os.path.realpath(file).startswith(self.top + os.sep):
            raise ApiError(403, f"{path!r} leads out of the pool")
        return file

    def set_label(self, path: str, label: str | None) -> str | None:
        """Label an image (or remove its label: `label` None); the CSV is written before the
        answer. Every N labels set, a retrain is requested."""
        with self.lock:
            i = self.image(path)
            if label is not None and label not in self.classes:
                raise DataError(f"unknown class {label!r}; add it first (known: {', '.join(self.classes)})")
            previous = self.labels_file.set(self.root / path, label)
            self.labels[i] = UNLABELLED if label is None else self.classes.index(label)
            self.user_skipped.discard(i)
            if label is not None and label != previous:
                self.since_retrain += 1
                if self.since_retrain >= self.retrain_every:
                    self.request_retrain()
            return previous

    def skip(self, path: str, skip: bool) -> None:
        with self.lock:
            i = self.image(path)
            (self.user_skipped.add if skip else self.user_skipped.discard)(i)

    def add_class(self, name: str) -> None:
        name = check_class_name(name)
        with self.lock:
            if name in self.classes:
                raise DataError(f"class {name!r} exists already")
            self.classes.append(name)

    def set_strategy(self, strategy: str) -> None:
        self.featurizer.check_strategy(strategy)
        with self.lock:
            self.strategy = strategy
            if self.status == "ready":
                self.rank()

    def item(self, i: int) -> dict:
        """An image for the page: its path, its label, the head's top predictions and, with a
        run's score, its score."""
        predictions = []
        if self.probabilities is not None:
            row = self.probabilities[i]
            order = np.argsort(-row, kind="stable")[:3]
            predictions = [{"label": self.classes[c], "p": float(row[c])} for c in order]
        label = int(self.labels[i])
        return {"path": self.paths[i], "label": None if label == UNLABELLED else self.classes[label],
                "predictions": predictions, "score": None if self.scores is None else float(self.scores[i])}

    def info(self, path: str) -> dict:
        with self.lock:
            return self.item(self.image(path))

    def state(self) -> dict:
        with self.lock:
            if self.status == "ready" and not self.visible() and self.unlabelled_left():
                self.rank()
            labelled = self.labels[self.labels != UNLABELLED]
            return {
                "status": self.status, "error": self.error, "done": self.done, "files": len(self.files),
                "pool": len(self.paths), "labelled": int(len(labelled)),
                "other_rows": len(self.labels_file.rows) - int(len(labelled)),
                "classes": self.classes,
                "counts": {c: int((labelled == k).sum()) for k, c in enumerate(self.classes)},
                "accuracy": self.accuracy, "folds": self.folds, "retrains": self.retrains,
                "retraining": self.retraining, "since_retrain": self.since_retrain,
                "retrain_every": self.retrain_every, "strategy": self.strategy, "strategies": self.featurizer.strategies(),
                "score": None if self.featurizer.score is None else self.featurizer.score.describe(),
                "queue": [self.item(i) for i in self.visible()[:SHOWN]],
                "bad_files": len(self.bad),
                "skipped_files": [{"path": str(p), "reason": r} for p, r in self.bad[:SHOWN_BAD]],
                "labels_csv": str(self.labels_file.path), "model": self.featurizer.origin,
                "train_command": f"transferkit train {shlex.quote(str(self.labels_file.path))} --out runs/labelled",
            }

    def visible(self) -> list[int]:
        return [i for i in self.queue if self.labels[i] == UNLABELLED and i not in self.user_skipped]

    def unlabelled_left(self) -> bool:
        return any(self.labels[i] == UNLABELLED and i not in self.user_skipped for i in range(len(self.labels)))

    def review(self) -> dict:
        """Labelled images whose label the head doubts, out of fold, most suspicious first."""
        with self.lock:
            if self.status != "ready":
                return {"issues": [], "note": "features are still being extracted"}
            labels, features = self.labels.copy(), self.features
        usable, folds = fold_count(labels)
        if folds is None:
            return {"issues": [], "note": "the review needs two labelled images in each of two classes"}
        issues = find_label_issues(features, usable, n_folds=folds)[:REVIEW]
        with self.lock:
            return {"note": f"{len(issues)} suspicious label(s), {folds}-fold out-of-fold predictions",
                    "issues": [{"path": self.paths[x.index], "given": self.classes[x.given_label],
                                "predicted": self.classes[x.predicted_label],
                                "self_confidence": x.self_confidence} for x in issues]}


def display_jpeg(file: Path, size: int, rules: Rules | None = None) -> bytes:
    """The image for a browser: EXIF orientation applied, RGB as `train` sees it (high-bit-depth
    images through the intensity window, not black), at most `size` pixels a side, as JPEG."""
    try:
        rgb = display_image(file, size, rules)
    except ImageError as exc:
        raise ApiError(422, f"{file.name}: {exc}") from None
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=90)
    return out.getvalue()


def create_app(session: Session, allowed_hosts: list[str] | None = None,
               log: Callable[[str], None] | None = None) -> FastAPI:
    """The labelling app over a `Session`. `allowed_hosts`: the Host headers accepted (a guard
    against DNS rebinding when the app listens on loopback); None: any."""

    def prepare() -> None:
        try:
            session.prepare()
        except Exception as exc:  # noqa: BLE001 - the page shows it; the log too
            if log:
                log(f"error: feature extraction failed: {exc}")

    @asynccontextmanager
    async def lifespan(_app):
        threads = [threading.Thread(target=prepare, daemon=True, name="label-prepare"),
                   threading.Thread(target=session.worker, daemon=True, name="label-retrain")]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            session.close()
            session.labels_file.close()

    app = web_app("transferkit label", lifespan, {
        TransferkitError: lambda exc: error(str(exc), 400),
        OSError: lambda exc: error(f"cannot write {exc.filename or 'the labels'}: {exc.strerror or exc}", 500)})
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page("label.html", "'self'")

    @app.get("/api/state")
    async def state():
        return await asyncio.to_thread(session.state)

    @app.get("/api/item")
    async def item(path: str = ""):
        return await asyncio.to_thread(session.info, path)

    @app.get("/image")
    async def image(path: str = "", size: int = 512):
        file = session.file(path)
        data = await asyncio.to_thread(display_jpeg, file, min(max(size, 32), 1024), session.featurizer.rules)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/label")
    async def label(request: Request):
        body = await json_body(request)
        path, value = body.get("path"), body.get("label")
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "label must be a class name or null")
        previous = await asyncio.to_thread(session.set_label, path, value)
        return {"previous": previous, "item": await asyncio.to_thread(session.info, path),
                "state": await asyncio.to_thread(session.state)}

    @app.post("/api/skip")
    async def skip(request: Request):
        body = await json_body(request)
        await asyncio.to_thread(session.skip, body.get("path"), bool(body.get("skip", True)))
        return {"item": await asyncio.to_thread(session.info, body.get("path")),
                "state": await asyncio.to_thread(session.state)}

    @app.post("/api/class")
    async def add_class(request: Request):
        session.add_class((await json_body(request)).get("name"))
        return {"state": await asyncio.to_thread(session.state)}

    @app.post("/api/strategy")
    async def strategy(request: Request):
        await asyncio.to_thread(session.set_strategy, (await json_body(request)).get("strategy"))
        return {"state": await asyncio.to_thread(session.state)}

    @app.post("/api/retrain")
    async def retrain(request: Request):
        await json_body(request)
        session.request_retrain()
        return {"state": await asyncio.to_thread(session.state)}

    @app.get("/api/review")
    async def review():
        return await asyncio.to_thread(session.review)

    return app
