"""The engine interface (scikit-learn's ClassifierMixin idea): an engine implements one method,
`_proba` (probabilities of a batch of uint8 images); everything else, the threshold, labels,
test-time augmentation, streaming over files and metrics, is written once here. Imports no torch:
the ONNX engine runs without it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.decode import decode_source, decoded_batches
from ..data.listing import LabelledImages
from ..data.window import Rules
from ..data.window import check_meta as check_window
from ..openworld import conformal
from ..openworld.ood import DEFAULT_KEEP, check_fraction, detection_metrics, keep_threshold
from ..utils.errors import ConfigError, RunError
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


@dataclass
class OpenWorld:
    """What an engine knows beyond its classes: the validation images' OOD scores (the threshold
    that a fraction `keep` of them passes) and their conformal scores (sets at `coverage`, when
    asked for). None where the run was trained before these existed (or, for sets, is multi-label)."""

    ood_scores: np.ndarray | None = None
    keep: float = DEFAULT_KEEP
    conformal_scores: np.ndarray | None = None
    coverage: float | None = None  # None: no sets

    @property
    def threshold(self) -> float | None:
        return None if self.ood_scores is None else keep_threshold(self.ood_scores, self.keep)

    @property
    def set_threshold(self) -> float:
        return conformal.threshold(self.conformal_scores, self.coverage)


class Engine(ABC):
    """A trained classifier behind one interface. `meta` holds at least classes, threshold,
    temperature and preprocess (model.json, or an ONNX file's metadata)."""

    name = "engine"
    meta: dict
    classes: list[str]
    open_world: OpenWorld = OpenWorld()
    origin: str = "this model"  # the run folder or file, for messages

    @abstractmethod
    def _proba(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, C) calibrated probabilities of uint8 images (N, S, S, 3) of this model's size."""

    def _outputs(self, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, OOD scores or None) of a batch; engines that score override this."""
        return self._proba(images, batch_size), None

    @property
    def has_ood(self) -> bool:
        return self.open_world.ood_scores is not None

    def configure(self, ood_keep: float | None = None, coverage: float | None = None) -> "Engine":
        """Predict-time choices: another OOD `keep` fraction than the run's, and conformal sets at
        `coverage`. A value outside (0, 1), or a run that cannot answer them, is a one-line error."""
        if ood_keep is not None:
            ood_keep = check_fraction("--ood-keep", ood_keep)
            if not self.has_ood:
                raise RunError(self.before_open_world("--ood-keep"))
            self.open_world.keep = ood_keep
        if coverage is not None:
            coverage = check_fraction("--coverage", coverage)
            if self.multilabel:
                raise ConfigError(f"{self.origin}: --coverage: conformal sets are for single-label runs; a multi-label "
                                  "run decides each class on its own (its threshold), so it has no sets")
            if self.open_world.conformal_scores is None:
                raise RunError(self.before_open_world("--coverage"))
            self.open_world.coverage = coverage
        return self

    def before_open_world(self, option: str) -> str:
        return (f"{self.origin}: {option} needs a run trained with OOD scores and conformal sets (transferkit "
                f"{'with' if self.name == 'torch' else 'exports with'} an 'ood' entry); this one predates them: "
                f"train it again{'' if self.name == 'torch' else ' (or export it again)'}")

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

    def predict_open(self, images: np.ndarray, batch_size: int = 64, tta: bool = False) -> dict[str, np.ndarray]:
        """What `predict_proba` gives, and where the run has them: "ood_score" (N,) (higher: more
        unlike the training images), "unknown" (N,) (above the threshold), and with a coverage
        configured "sets" (N, C) (conformal membership)."""
        images = np.asarray(images)
        if len(images) == 0:
            return {"probabilities": np.zeros((0, len(self.classes)), dtype=np.float32)}
        probs, scores = self._outputs(images, batch_size)
        if tta:
            mirrored = self._outputs(np.ascontiguousarray(images[:, :, ::-1]), batch_size)
            probs = (probs + mirrored[0]) / 2
            scores = None if scores is None or mirrored[1] is None else (scores + mirrored[1]) / 2
        if not np.isfinite(probs).all() or (scores is not None and not np.isfinite(scores).all()):
            raise RunError("the model computed NaN or infinite probabilities (damaged weights or settings)")
        out = {"probabilities": probs}
        if scores is not None and self.has_ood:
            out["ood_score"], out["unknown"] = scores, scores > self.open_world.threshold
        if self.open_world.coverage is not None:
            predicted = predict_labels(probs, self.threshold)
            out["sets"] = conformal.sets(probs, self.open_world.set_threshold, conformal.tie_breaks(images), predicted)
        return out

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
            answer = self.predict_open(np.stack([a for _, a in batch]), batch_size, tta)
            probs = answer["probabilities"]
            for i, ((path, _), p, label) in enumerate(zip(batch, probs, self.labels(probs))):
                yield {"path": path, "labels" if self.multilabel else "label": label,
                       "probabilities": {c: float(v) for c, v in zip(self.classes, p)}, **self.extras(answer, i)}

    def extras(self, answer: dict, i: int) -> dict:
        """The fields of record `i` of a `predict_open` answer beyond the label and probabilities."""
        record = {}
        if "ood_score" in answer:
            record.update(ood_score=float(answer["ood_score"][i]), unknown=bool(answer["unknown"][i]))
        if "sets" in answer:
            record["set"] = [c for c, on in zip(self.classes, answer["sets"][i]) if on]
        return record

    def read_labelled(self, source: str | Path) -> LabelledImages:
        """A labelled folder or CSV decoded for this model: its size, its classes, its task (a
        multi-label model reads multi-label data) and its separator."""
        return decode_source(source, self.image_size, self.classes, self.task, self.label_sep, rules=self.rules)

    def evaluate(self, source: str | Path, batch_size: int = 64, tta: bool = False,
                 ood_dir: str | Path | None = None) -> dict:
        """Metrics on a labelled folder or CSV whose classes are among this model's (multi-label
        data for a multi-label model). Where the run has them: the fraction of these images flagged
        unknown, and with a coverage configured the sets' empirical coverage and mean size (with
        95 % intervals); `ood_dir` (images unlike the training ones): how well the OOD score tells
        them from these (AUROC, FPR at 95 % TPR) and the fraction flagged."""
        if ood_dir is not None and not self.has_ood:
            raise RunError(self.before_open_world("--ood-dir"))
        data = self.read_labelled(source)
        answer = self.predict_open(data.images, batch_size, tta)
        probs = answer["probabilities"]
        metrics = evaluation_metrics(data.labels, probs, self.classes, self.threshold)
        metrics.update(source=str(source), tta=tta,
                       skipped=[{"path": p, "reason": r} for p, r in data.skipped])
        if "ood_score" in answer:
            metrics["ood"] = {"keep": self.open_world.keep, "threshold": self.open_world.threshold,
                              "flagged": float(answer["unknown"].mean()) if len(data) else 0.0}
        if "sets" in answer:
            metrics["conformal"] = {"method": conformal.METHOD, **conformal.summary(
                answer["sets"], data.labels, self.open_world.coverage)}
        if ood_dir is not None:
            metrics["ood"].update(self.ood_detection(answer.get("ood_score", np.zeros(0)), ood_dir, batch_size, tta))
        return metrics

    def ood_detection(self, in_scores: np.ndarray, ood_dir: str | Path, batch_size: int = 64,
                      tta: bool = False) -> dict:
        """The OOD score on a folder of images unlike the training ones, against `in_scores` (the
        labelled set's): AUROC, FPR at 95 % TPR, and the fraction flagged unknown."""
        from ..data.listing import expand_inputs

        scores, skipped = [], 0
        for batch in decoded_batches(expand_inputs([Path(ood_dir)]), self.image_size, batch_size, rules=self.rules):
            if isinstance(batch, tuple):
                skipped += 1
                continue
            scores.append(self.predict_open(np.stack([a for _, a in batch]), batch_size, tta)["ood_score"])
        if not scores:
            raise RunError(f"{ood_dir}: no readable images (--ood-dir)")
        out_scores = np.concatenate(scores)
        found = {"ood_dir": str(ood_dir), "flagged_ood_dir": float((out_scores > self.open_world.threshold).mean()),
                 "n_ood_dir": int(len(out_scores)), "skipped_ood_dir": skipped}
        if len(in_scores):
            found.update({k: v for k, v in detection_metrics(in_scores, out_scores).items() if k in ("auroc", "fpr_at_95_tpr")})
        return found


class GraphEngine(Engine):
    """An engine over an exported graph (ONNX Runtime, OpenVINO): the preprocessing, the window and
    the OOD score are inside it; `_run` runs one prepared batch. Written once here: the batch's
    input (windowed images back to the intensities the graph's window maps exactly, the layout),
    and the export's OOD metadata read into `open_world`."""

    path: Path
    layout: str = "nhwc"
    window = None  # data.window's graph window, or None: uint8 in
    scores: bool = False  # the graph has an ood_score output and the metadata to read it

    @abstractmethod
    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, OOD scores when `scores`) of one batch as the graph takes it."""

    def _proba(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return self._outputs(images, batch_size)[0]

    def _outputs(self, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        probs, scores = [], []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], dtype=np.uint8)
            if self.window is not None:  # windowed uint8 images as intensities the graph's window gives back exactly
                batch = self.window.invert(batch)
            if self.layout == "nchw":
                batch = batch.transpose(0, 3, 1, 2)
            p, score = self._run(np.ascontiguousarray(batch))
            probs.append(p)
            if self.scores:
                scores.append(score)
        return np.concatenate(probs), np.concatenate(scores) if self.scores else None

    def read_open_world(self, ood, sets, has_output: bool) -> None:
        """`open_world` from the export's OOD and conformal metadata (`has_output`: the graph
        computes ood_score); damaged metadata is a one-line error."""
        self.scores = has_output and isinstance(ood, dict)
        try:
            self.open_world = OpenWorld(
                ood_scores=np.asarray(ood["val_scores"], np.float64) if self.scores else None,
                keep=float(ood["keep"]) if self.scores else DEFAULT_KEEP,
                conformal_scores=np.asarray(sets["scores"], np.float64) if self.scores and isinstance(sets, dict) else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{self.path}: damaged OOD metadata ({type(exc).__name__}: {exc}); export it again") from None
