"""The engine interface (scikit-learn's ClassifierMixin idea): an engine implements one method,
`_proba` (probabilities of a batch of uint8 images); everything else, the threshold, labels,
test-time augmentation, streaming over files and metrics, is written once here. Imports no torch:
the ONNX engine runs without it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..data.decode import decode_source, decoded_batches
from ..data.listing import LabelledImages
from ..data.window import Rules
from ..data.window import check_meta as check_window
from ..utils.errors import RunError
from .metrics import evaluation_metrics, predict_labels, predict_sets

TASKS = ("multiclass", "multilabel")


def is_multilabel(meta: dict) -> bool:
    """Whether model.json (or an export's metadata) describes a multi-label model."""
    return meta.get("task") == "multilabel"


def check_meta(meta: dict, where) -> None:
    """The values a prediction depends on (model.json, or an exported file's metadata): task,
    classes, threshold, temperature (multi-label: one of each per class), input size and
    normalisation; RunError naming the first bad one."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise RunError(f"{where}: {message}")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key in ("classes", "threshold", "temperature", "preprocess"):
        check(key in meta, f"no {key!r}")
    classes, t, th, pre = meta["classes"], meta["temperature"], meta["threshold"], meta["preprocess"]
    check(meta.get("task", "multiclass") in TASKS, f"task must be one of {', '.join(TASKS)}, got {meta.get('task')!r}")
    check(isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
          and len(set(classes)) == len(classes), f"classes must be two or more distinct names, got {classes!r}")
    if is_multilabel(meta):
        each = f"a list of {len(classes)} (one per class) of "
        t_ok = isinstance(t, list) and len(t) == len(classes) and all(number(v) and v > 0 for v in t)
        th_ok = isinstance(th, list) and len(th) == len(classes) and all(number(v) and 0 <= v <= 1 for v in th)
    else:
        each, t_ok, th_ok = "a ", number(t) and t > 0, number(th) and 0 <= th <= 1
    check(t_ok, f"temperature must be {each}finite number{'s' if each != 'a ' else ''} > 0, got {t!r}")
    check(th_ok, f"threshold must be {each}number{'s' if each != 'a ' else ''} in [0, 1], got {th!r}")
    check(isinstance(pre, dict), "preprocess must be an object")
    size = pre.get("image_size")
    check(isinstance(size, int) and not isinstance(size, bool) and 16 <= size <= 2048,
          f"preprocess.image_size must be an integer in [16, 2048], got {size!r}")
    for key in ("mean", "std"):
        values = pre.get(key)
        check(isinstance(values, list) and len(values) == 3 and all(number(v) and (key == "mean" or v > 0)
                                                                    for v in values),
              f"preprocess.{key} must be three finite numbers{' > 0' if key == 'std' else ''}, got {values!r}")
    check_window(pre, check)


class Engine(ABC):
    """A trained classifier behind one interface. `meta` holds at least classes, threshold,
    temperature and preprocess (model.json, or an ONNX file's metadata)."""

    name = "engine"
    meta: dict
    classes: list[str]

    @abstractmethod
    def _proba(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, C) calibrated probabilities of uint8 images (N, S, S, 3) of this model's size."""

    @property
    def multilabel(self) -> bool:
        return is_multilabel(self.meta)

    @property
    def threshold(self) -> float | list[float]:
        """The threshold on p(classes[1]) (two classes); multi-label: one per class."""
        value = self.meta["threshold"]
        return [float(v) for v in value] if self.multilabel else float(value)

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    @property
    def label_sep(self) -> str:
        """The separator of class names in a multi-label CSV (model.json's `label_sep`)."""
        return str(self.meta.get("label_sep", "|"))

    @property
    def image_size(self) -> int:
        return int(self.meta["preprocess"]["image_size"])

    @property
    def rules(self) -> Rules:
        """How this model reads high-bit-depth and multi-page images: its data set's intensity
        window (model.json's preprocess), where windows come from, the page rule."""
        return Rules.from_meta(self.meta["preprocess"])

    @property
    def version(self) -> str:
        """Names exactly one trained model: the first 16 hex digits of its weights' SHA-256."""
        return str(self.meta.get("model_version", ""))

    def predict_proba(self, images: np.ndarray, batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """(N, C) probabilities; `tta`: the mean of each image's and its horizontal mirror's."""
        images = np.asarray(images)
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        probs = self._proba(images, batch_size)
        if tta:
            probs = (probs + self._proba(np.ascontiguousarray(images[:, :, ::-1]), batch_size)) / 2
        if not np.isfinite(probs).all():  # never a label computed from NaN
            raise RunError("the model computed NaN or infinite probabilities (damaged weights or settings)")
        return probs

    def labels(self, probabilities: np.ndarray) -> list[str] | list[list[str]]:
        """The predicted class of each image; multi-label: the list of classes at or above their
        thresholds (possibly empty)."""
        if self.multilabel:
            return [[c for c, on in zip(self.classes, row) if on]
                    for row in predict_sets(probabilities, self.threshold)]
        return [self.classes[i] for i in predict_labels(probabilities, self.threshold)]

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 64,
                      workers: int | None = None, tta: bool = False) -> Iterator[dict]:
        """Stream one record per file, in order: {path, label, probabilities} (multi-label: {path,
        labels, probabilities}) or {path, error}."""
        for batch in decoded_batches(paths, self.image_size, batch_size, workers, rules=self.rules):
            if isinstance(batch, tuple):
                yield {"path": batch[0], "error": batch[1]}
                continue
            probs = self.predict_proba(np.stack([a for _, a in batch]), batch_size, tta)
            for (path, _), p, label in zip(batch, probs, self.labels(probs)):
                yield {"path": path, "labels" if self.multilabel else "label": label,
                       "probabilities": {c: float(v) for c, v in zip(self.classes, p)}}

    def read_labelled(self, source: str | Path) -> LabelledImages:
        """A labelled folder or CSV decoded for this model: its size, its classes, its task (a
        multi-label model reads multi-label data) and its separator."""
        return decode_source(source, self.image_size, self.classes, self.task, self.label_sep, rules=self.rules)

    def evaluate(self, source: str | Path, batch_size: int = 64, tta: bool = False) -> dict:
        """Metrics on a labelled folder or CSV whose classes are among this model's (multi-label
        data for a multi-label model)."""
        data = self.read_labelled(source)
        probs = self.predict_proba(data.images, batch_size, tta)
        metrics = evaluation_metrics(data.labels, probs, self.classes, self.threshold)
        metrics.update(source=str(source), tta=tta,
                       skipped=[{"path": p, "reason": r} for p, r in data.skipped])
        return metrics

