"""The ONNX Runtime engine: a classifier from one exported ONNX file, whose metadata carries the
task, classes, threshold, temperature (multi-label: one per class) and input. Imports neither torch
nor timm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.window import graph_window
from ..utils.errors import RunError
from .engine import Engine, check_meta


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported ONNX file, decoded (classes, threshold, preprocess as values)."""
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a damaged file
        raise RunError(f"{path}: not a readable ONNX file ({type(exc).__name__}); export it again") from None
    if "classes" not in props or "preprocess" not in props:
        raise RunError(f"{path}: not a transferkit ONNX export (no classes/preprocess metadata)")
    try:
        meta = {**props, **{key: json.loads(props[key]) for key in ("classes", "preprocess", "threshold", "temperature")}}
    except (KeyError, ValueError) as exc:
        raise RunError(f"{path}: damaged transferkit metadata ({exc}); export it again") from None
    check_meta(meta, path)
    return meta


class OnnxClassifier(Engine):
    """A classifier from one exported ONNX file, run by ONNX Runtime on the CPU."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

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
            raise RunError(f"{self.path}: cannot load with ONNX Runtime ({str(exc).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name
        try:
            self.window = graph_window(self.meta)  # None: uint8 in; else float32 intensities, the window inside
        except RunError as exc:
            raise RunError(f"{self.path}: {exc}") from None
        if self.window is not None and not self.window.exact_inverse():
            raise RunError(f"{self.path}: its intensity window [{self.window.low}, {self.window.high}] is too narrow for "
                           "float32 at that magnitude (8-bit levels would not survive it); use the torch engine")

    def _proba(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], dtype=np.uint8)
            if self.window is not None:  # windowed uint8 images as intensities the graph's window gives back exactly
                batch = self.window.invert(batch)
            if self.layout == "nchw":
                batch = batch.transpose(0, 3, 1, 2)
            out.append(self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0])
        return np.concatenate(out)
