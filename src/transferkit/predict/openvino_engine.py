"""The OpenVINO engine: a classifier from one exported OpenVINO IR (model.xml + model.bin), whose
runtime info carries the same metadata as the ONNX export (task, classes, threshold, temperature,
preprocess, model_version). Imports neither torch nor timm; `openvino` is the optional extra
`transferkit[openvino]`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.window import graph_window
from ..utils.errors import RunError
from ..utils.files import sha256_of
from .engine import GraphEngine, check_meta

SECTION = "transferkit"  # the rt_info section that holds the metadata
WEIGHTS_KEY = "weights_sha256"  # of the .bin, written by the export
DECODED = ("classes", "preprocess", "threshold", "temperature")
MISSING = "the OpenVINO engine needs the openvino package: pip install 'transferkit[openvino]'"


def openvino_module():
    """`openvino`, or RunError naming the extra to install."""
    try:
        import openvino
    except ImportError:
        raise RunError(MISSING) from None
    return openvino


def read_model(path: str | Path):
    """(the OpenVINO model, its transferkit metadata decoded); RunError for anything unusable."""
    ov = openvino_module()
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: not found")
    if not path.with_suffix(".bin").is_file():
        raise RunError(f"{path.with_suffix('.bin')}: not found (an OpenVINO IR is model.xml and model.bin); "
                       "export it again")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - openvino raises its own untyped errors
        raise RunError(f"{path}: not a readable OpenVINO IR ({first_line(exc)}); export it again") from None
    if not model.has_rt_info([SECTION, "classes"]):
        raise RunError(f"{path}: not a transferkit OpenVINO export (no classes metadata)")
    info = text(model.get_rt_info()[SECTION], dict)
    props = {key: text(value, str) for key, value in info.items()}
    try:
        meta = {**props, **{key: json.loads(props[key]) for key in DECODED}}
    except (KeyError, ValueError) as exc:
        raise RunError(f"{path}: damaged transferkit metadata ({exc}); export it again") from None
    check_meta(meta, path)
    if meta.get(WEIGHTS_KEY) != sha256_of(path.with_suffix(".bin")):
        raise RunError(f"{path.with_suffix('.bin')}: does not match the SHA-256 in {path.name} (damaged, or from "
                       "another export); export it again")
    return model, meta


def text(value, kind):
    """An rt_info value as `kind` (openvino hands some as OVAny, some already converted)."""
    return value.astype(kind) if hasattr(value, "astype") else kind(value)


def first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class OpenVinoClassifier(GraphEngine):
    """A classifier from one exported OpenVINO IR, run by OpenVINO on the CPU in float32 (no bf16
    or fp16 shortcut, so that a float model gives ONNX's and PyTorch's probabilities)."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        model, self.meta = read_model(self.path)
        self.classes = list(self.meta["classes"])
        self.layout = self.meta["preprocess"].get("layout", "nhwc")
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = openvino_module().Core().compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001
            raise RunError(f"{self.path}: cannot compile with OpenVINO ({first_line(exc)})") from None
        self.request = self.compiled.create_infer_request()
        try:
            self.window = graph_window(self.meta)  # None: uint8 in; else float32 intensities
        except RunError as exc:
            raise RunError(f"{self.path}: {exc}") from None
        if self.window is not None and not self.window.exact_inverse():
            raise RunError(f"{self.path}: its intensity window is too narrow for float32; use the torch engine")
        self.origin = str(self.path)
        try:  # the ONNX export's OOD metadata, carried as runtime info (JSON text)
            ood, sets = (json.loads(self.meta[k]) if isinstance(self.meta.get(k), str) else self.meta.get(k)
                         for k in ("ood", "conformal"))
        except ValueError as exc:
            raise RunError(f"{self.path}: damaged OOD metadata ({type(exc).__name__}: {exc}); export it again") from None
        self.read_open_world(ood, sets, len(self.compiled.outputs) > 1)
        if self.scores:
            self.meta.update(ood=ood, conformal=sets)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        result = self.request.infer({0: batch})
        return np.array(result[0], dtype=np.float32), np.array(result[1], dtype=np.float32) if self.scores else None
