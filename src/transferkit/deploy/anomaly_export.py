"""`export` of an anomaly run: one ONNX file with the bank (or the Gaussians) inside, uint8 RGB
images in, two outputs: `anomaly_score` (N,) and `anomaly_map` (N, S, S), the same numbers as the
PyTorch engine; the threshold and the preprocessing in the file's metadata."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..predict.anomaly_engine import AnomalyDetector, load_detector
from ..utils.errors import ExportError
from ..utils.files import atomic_path
from .export import LAYOUTS, OPSET, quiet_logger


class AnomalyGraph(nn.Module):
    def __init__(self, detector: AnomalyDetector, layout: str):
        super().__init__()
        if layout not in LAYOUTS:
            raise ExportError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.model, self.layout = detector.model.eval().requires_grad_(False), layout

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout == "nhwc":
            images = images.permute(0, 3, 1, 2)
        return self.model(images)


def export_anomaly(run_dir: str | Path, out: str | Path | None = None, layout: str = "nhwc",
                   quantize_mode: str | None = None) -> dict:
    """Write RUN/model.onnx (or `out`) for an anomaly run; checked by onnx.checker."""
    import onnx

    if quantize_mode is not None:
        raise ExportError("quantization is for classifiers; an anomaly run exports in float32 (its scores are "
                          "distances, compared with a threshold)")
    run_dir = Path(run_dir)
    detector = load_detector(run_dir)
    out = Path(out or run_dir / "model.onnx")
    s = detector.image_size
    shape = (2, s, s, 3) if layout == "nhwc" else (2, 3, s, s)
    graph = AnomalyGraph(detector, layout)
    with warnings.catch_warnings(), quiet_logger("torch.onnx"), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(graph, (torch.randint(0, 256, shape, dtype=torch.uint8),), str(raw), dynamo=True,
                          input_names=["images"], output_names=["anomaly_score", "anomaly_map"], opset_version=OPSET,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False,
                          external_data=False)
        proto = onnx.load(str(raw))
    meta = detector.meta
    preprocess = {**meta["preprocess"], "layout": layout, "dtype": "uint8", "channels": "RGB",
                  "resize": "bilinear, to image_size x image_size (done by the caller)",
                  "normalisation": "inside the graph: (x / 255 - mean) / std"}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {
        "task": "anomaly", "threshold": json.dumps(meta["threshold"]), "preprocess": json.dumps(preprocess),
        "normal_class": str(meta.get("normal_class", "")), "backbone": str(meta.get("backbone", "")),
        "model_version": detector.version, "anomaly": json.dumps({k: meta["anomaly"].get(k) for k in (
            "scorer", "layers", "bank_rows", "channels", "bank_sha256", "keep", "map_reference")}),
        "output": "anomaly_score (N,): the largest patch distance (to the good images' bank, or to their Gaussian at "
                  "the patch's place); label = anomaly when anomaly_score > threshold; anomaly_map (N, S, S): the "
                  "patch distances, upsampled and smoothed",
        "transferkit_version": __version__})
    proto.doc_string = "transferkit anomaly detector: uint8 RGB images in, anomaly scores and maps out"
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return {"path": str(out)}
