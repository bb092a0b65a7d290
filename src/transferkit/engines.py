"""Prediction engines: the PyTorch `Classifier`, or an exported ONNX file run by ONNX Runtime,
behind the same interface (predict_proba, labels, predict_files, evaluate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from .predict import Classifier, RunError, load

ENGINES = ("auto", "torch", "onnx")


class OnnxClassifier:
    """A classifier from one exported ONNX file; its metadata carries classes, threshold and input."""

    engine = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        from .export import read_metadata

        self.path = Path(path)
        if not self.path.is_file():
            raise RunError(f"{self.path}: not found")
        self.meta = read_metadata(self.path)
        self.classes = list(self.meta["classes"])
        self.layout = self.meta["preprocess"].get("layout", "nhwc")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise RunError(f"{self.path}: cannot load with ONNX Runtime ({exc})") from None
        self.input_name = self.session.get_inputs()[0].name

    @property
    def version(self) -> str:
        return self.meta.get("model_version", "")

    def predict_proba(self, images: np.ndarray, batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """(N, C) probabilities for uint8 images (N, S, S, 3); `tta` averages each image and its
        horizontal mirror."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], dtype=np.uint8)
            probs = self._run(batch)
            if tta:
                probs = (probs + self._run(batch[:, :, ::-1])) / 2
            out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self.layout == "nchw":
            batch = batch.transpose(0, 3, 1, 2)
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]

    # The same metadata, labelling, streaming and metrics code as the PyTorch classifier.
    threshold = Classifier.threshold
    image_size = Classifier.image_size
    labels = Classifier.labels
    predict_files = Classifier.predict_files
    evaluate = Classifier.evaluate


def stale_reason(onnx: OnnxClassifier, run_dir: Path) -> str | None:
    """Why an exported file no longer matches its run (other weights, threshold, temperature)."""
    from .export import model_version

    current = load_meta(run_dir)
    if (run_dir / "model.safetensors").is_file() and model_version(run_dir) != onnx.version:
        return "the weights changed since the export"
    for key, default in (("threshold", 0.5), ("temperature", 1.0)):
        if abs(float(current.get(key, default)) - float(onnx.meta[key])) > 1e-9:
            return f"model.json's {key} changed since the export"
    return None


def load_meta(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def load_engine(run: str | Path, engine: str = "auto", log: Callable[[str], None] | None = None,
                threads: int | None = None):
    """A run directory (or an .onnx file) as a classifier. "auto": the run's model.onnx with ONNX
    Runtime when it exists and matches the run, else PyTorch; "onnx" without an export is an error."""
    run = Path(run)
    if engine not in ENGINES:
        raise RunError(f"engine must be one of {ENGINES}, got {engine!r}")
    if run.suffix == ".onnx":
        if engine == "torch":
            raise RunError(f"{run}: an ONNX file needs --engine onnx or auto")
        return OnnxClassifier(run, threads)
    exported = run / "model.onnx"
    if engine == "torch" or (engine == "auto" and not exported.is_file()):
        return load(run)
    if not exported.is_file():
        raise RunError(f"{exported}: not found; run `transferkit export {run}` first (or use --engine torch)")
    onnx = OnnxClassifier(exported, threads)
    reason = stale_reason(onnx, run)
    if reason is None:
        return onnx
    if engine == "onnx":
        raise RunError(f"{exported}: out of date ({reason}); export again")
    if log:
        log(f"note: {exported} is out of date ({reason}); using PyTorch (export again to use it)")
    return load(run)
