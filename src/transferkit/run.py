"""The run folder: what `train` writes and every other command reads.

    model.safetensors   the weights (no pickle)
    model.json          classes, preprocessing, threshold, temperature, settings, versions and the
                        weights' SHA-256, checked on every load
    history.csv, metrics.json, skipped.csv, val_predictions.csv, learning_curves.png, report.html

Every file is written to a temporary name and renamed into place. This module imports torch only
where weights are read or written, so that an ONNX engine loads without it.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .engine import Engine
from .errors import RunError
from .files import atomic_path, sha256_of, write_text

FORMAT_VERSION = 2
WEIGHTS, META, EXPORT = "model.safetensors", "model.json", "model.onnx"
ENGINES = ("auto", "torch", "onnx")


def versions() -> dict[str, str]:
    import timm
    import torch

    return {"transferkit": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def save(classifier, run_dir: str | Path) -> dict:
    """Write the classifier's weights and model.json; returns the metadata written."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    model = classifier.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
        digest = sha256_of(tmp)
    meta = {
        "format_version": FORMAT_VERSION,
        "classes": classifier.classes,
        "num_outputs": model.head.out_features,
        "dropout": model.dropout.p,
        "augmentation": {"flip": model.augment.flip, "rotation": model.augment.rotation},
        **classifier.meta,
        "model_sha256": digest,
        "model_version": digest[:16],
        "versions": versions(),
    }
    write_text(run_dir / META, json.dumps(meta, indent=2) + "\n")
    classifier.meta = meta
    return meta


def _check(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise RunError(f"{path}: {message}")


def read_meta(run_dir: str | Path) -> dict:
    """model.json, with every value a prediction depends on checked."""
    run_dir = Path(run_dir)
    path = run_dir / META
    if not path.is_file():
        raise RunError(f"{path}: not found (is {run_dir} a transferkit run folder?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({exc})") from None
    _check(isinstance(meta, dict), path, "not a JSON object")
    version = meta.get("format_version")
    _check(version == FORMAT_VERSION, path, f"format_version {version!r}, this transferkit reads "
           f"{FORMAT_VERSION}" + (" (an older run: train it again)" if isinstance(version, int) and version < FORMAT_VERSION else ""))
    for key in ("classes", "threshold", "temperature", "preprocess", "backbone", "model_sha256"):
        _check(key in meta, path, f"no {key!r}")
    classes = meta["classes"]
    _check(isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)
           and len(set(classes)) == len(classes), path, f"classes must be two or more distinct names, got {classes!r}")
    number = (int, float)
    t, th = meta["temperature"], meta["threshold"]
    _check(isinstance(t, number) and not isinstance(t, bool) and math.isfinite(t) and t > 0, path,
           f"temperature must be a finite number > 0, got {t!r}")
    _check(isinstance(th, number) and not isinstance(th, bool) and 0 <= th <= 1, path,
           f"threshold must be a number in [0, 1], got {th!r}")
    pre = meta["preprocess"]
    _check(isinstance(pre, dict), path, "preprocess must be an object")
    size = pre.get("image_size")
    _check(isinstance(size, int) and not isinstance(size, bool) and 16 <= size <= 2048, path,
           f"preprocess.image_size must be an integer in [16, 2048], got {size!r}")
    for key in ("mean", "std"):
        values = pre.get(key)
        _check(isinstance(values, list) and len(values) == 3 and all(
            isinstance(v, number) and math.isfinite(v) and (key == "mean" or v > 0) for v in values),
            path, f"preprocess.{key} must be three finite numbers{' > 0' if key == 'std' else ''}, got {values!r}")
    return meta


def load(run_dir: str | Path, device: str = "cpu"):
    """The PyTorch classifier of a run folder, after checking its metadata and its weights' hash."""
    import torch
    from safetensors.torch import load_file

    from .backbones import Preprocess, timm_model
    from .classifier import Classifier
    from .model import TransferModel

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{weights}: not found (is {run_dir} a transferkit run folder?)")
    if sha256_of(weights) != meta["model_sha256"]:
        raise RunError(f"{weights}: does not match the SHA-256 in {META} (damaged or replaced); "
                       "restore it or train again")
    try:
        backbone = timm_model(meta["backbone"], num_classes=0, **meta.get("timm_kwargs", {}))
        model = TransferModel(backbone, len(meta["classes"]), Preprocess(**meta["preprocess"]),
                              dropout=meta["dropout"], **meta["augmentation"])
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # noqa: BLE001 - any inconsistency means an unusable run
        raise RunError(f"{run_dir}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    model.to(device, memory_format=torch.channels_last)
    return Classifier(model, meta["classes"], meta)


def model_version(run_dir: str | Path) -> str:
    """The first 16 hex digits of the weights' SHA-256: names exactly one trained model."""
    return sha256_of(Path(run_dir) / WEIGHTS)[:16]


def stale_reason(onnx: Engine, run_dir: Path) -> str | None:
    """Why an exported file no longer matches its run (other weights, threshold, temperature)."""
    current = read_meta(run_dir)
    if (run_dir / WEIGHTS).is_file() and model_version(run_dir) != onnx.version:
        return "the weights changed since the export"
    for key in ("threshold", "temperature"):
        if abs(float(current[key]) - float(onnx.meta[key])) > 1e-9:
            return f"model.json's {key} changed since the export"
    return None


def load_engine(run: str | Path, engine: str = "auto", log: Callable[[str], None] | None = None,
                threads: int | None = None) -> Engine:
    """A run folder (or an .onnx file) as a classifier. "auto": the run's model.onnx with ONNX
    Runtime when it exists, loads and matches the run, else PyTorch (with a note); "onnx" without a
    usable export is an error."""
    from .onnx_engine import OnnxClassifier

    run = Path(run)
    if engine not in ENGINES:
        raise RunError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if run.suffix == ".onnx":
        if engine == "torch":
            raise RunError(f"{run}: an ONNX file needs the onnx or auto engine")
        return OnnxClassifier(run, threads)
    exported = run / EXPORT
    if engine == "torch" or (engine == "auto" and not exported.is_file()):
        return load(run)
    if not exported.is_file():
        raise RunError(f"{exported}: not found; run `transferkit export {run}` first (or use the torch engine)")
    try:
        onnx = OnnxClassifier(exported, threads)
    except RunError as exc:  # damaged (an interrupted copy, say): PyTorch still answers
        if engine == "onnx":
            raise
        problem = f"is not usable ({exc})"
    else:
        reason = stale_reason(onnx, run)
        if reason is None:
            return onnx
        if engine == "onnx":
            raise RunError(f"{exported}: out of date ({reason}); export again")
        problem = f"is out of date ({reason})"
    if log:
        log(f"note: {exported} {problem}; using PyTorch (export again to use it)")
    return load(run)


def write_predictions(path: str | Path, paths: list[str], labels: np.ndarray, probabilities: np.ndarray,
                      classes: list[str]) -> None:
    """One row per image: path, true class, the probability of every class."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", *[f"p_{c}" for c in classes]])
        for p, y, row in zip(paths, labels, probabilities):
            writer.writerow([p, classes[y], *[f"{v:.6g}" for v in row]])


def read_predictions(path: str | Path, classes: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What `write_predictions` wrote: (paths, labels, probabilities)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        labels = np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
        probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, ValueError, TypeError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    return [r["path"] for r in rows], labels, probs.reshape(-1, len(classes))


def write_skipped(path: str | Path, skipped: list[tuple[str, str]]) -> None:
    """The files that were skipped and why, as CSV (any character in a name survives)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [(r["path"], r["reason"]) for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
