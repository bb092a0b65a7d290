"""The ONNX Runtime engine: a classifier from one exported ONNX file, whose metadata carries the
task, classes, threshold, temperature (multi-label: one per class) and input. Imports neither torch
nor timm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.window import graph_window
from ..utils.errors import RunError
from .engine import GraphEngine, check_meta


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
        meta = {**props, **{key: json.loads(props[key]) for key in ("classes", "preprocess", "threshold", "temperature")},
                **{key: json.loads(props[key]) for key in ("ood", "conformal") if key in props}}
    except (KeyError, ValueError) as exc:
        raise RunError(f"{path}: damaged transferkit metadata ({exc}); export it again") from None
    check_meta(meta, path)
    return meta


class OnnxClassifier(GraphEngine):
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
        self.origin = str(self.path)
        outputs = [o.name for o in self.session.get_outputs()]
        self.read_open_world(self.meta.get("ood"), self.meta.get("conformal"), "ood_score" in outputs)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(None, {self.input_name: batch})
        return out[0], out[1] if self.scores else None
