"""Export a trained run for deployment: ONNX (preprocessing inside, probabilities out, metadata so
the file alone is enough), int8 quantization guarded by validation accuracy, and `torch.export`.

The exported graph is the inference path only (no augmentation, no dropout): uint8 RGB images of
the model's size in, (N, C) class probabilities out, the same numbers as
`Classifier.predict_proba` (normalisation and calibration temperature folded in). A model trained
on high-bit-depth images (its model.json has an intensity window) takes float32 intensities
instead, (N, S, S, 3) resized as transferkit resizes them, and the window is inside the graph:
float32 because DICOM's rescaled values are signed and fractional and float TIFF has no integer
range at all, which uint16 could not carry.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..predict.classifier import Classifier
from ..predict.metrics import evaluation_metrics
from ..predict.onnx_engine import OnnxClassifier
from ..predict.run import load, model_version
from ..utils.errors import ExportError
from ..utils.files import atomic_path
from ..utils.logs import quiet_logger

LAYOUTS = ("nhwc", "nchw")
FORMATS = ("onnx", "torch", "openvino", "web")
QUANTIZE_MODES = ("int8", "int8-dynamic")  # int8 = static (calibrated) QDQ, the faster one
OPSET = 18


class InferenceGraph(nn.Module):
    """uint8 RGB images (N, S, S, 3) for "nhwc" or (N, 3, S, S) for "nchw" -> probabilities (N, C).

    Wraps (and freezes) the classifier's model in inference mode.
    """

    def __init__(self, classifier: Classifier, layout: str = "nhwc"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ExportError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.model, self.layout = classifier.model.eval().requires_grad_(False), layout
        self.window = classifier.rules.window
        if self.window is not None:  # float32 intensities in: the window, exactly as Window.apply computes it
            low, scale = self.window.constants
            self.register_buffer("low", torch.tensor(float(low), dtype=torch.float32), persistent=False)
            self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":
            images = images.permute(0, 3, 1, 2)
        if self.window is not None:
            images = torch.round(torch.clamp((images - self.low) * self.scale, 0.0, 255.0)) / 255.0
        model = self.model
        return model.probabilities(model.head(model.features(model.normalize(images))))


def metadata(classifier: Classifier, run_dir: str | Path, layout: str, quantization: str = "none") -> dict[str, str]:
    """Everything needed to use the ONNX file without the run directory (string values)."""
    preprocess = {**classifier.meta["preprocess"], "layout": layout, "dtype": "uint8", "channels": "RGB",
                  "resize": "bilinear, to image_size x image_size (done by the caller)",
                  "normalisation": "inside the graph: (x / 255 - mean) / std"}
    window = classifier.rules.window
    if window is not None:
        preprocess.update(dtype="float32", channels="intensities, grey replicated to 3 channels", **{
            "resize": "bilinear in float, to image_size x image_size (done by the caller, before the window)",
            "normalisation": "inside the graph: the intensity window y = round(clip((x - low) * 255 / (high - low), "
                             "0, 255)) (half to even), then (y / 255 - mean) / std",
            "intensities": "as transferkit decodes them: DICOM after rescale slope/intercept, MONOCHROME1 inverted; "
                           "an 8-bit image enters as low + v * (high - low) / 255"})
        if classifier.rules.source == "dicom":
            preprocess["dicom_window"] = ("a DICOM file with its own window [a, b] enters as low + (x - a) * "
                                          "(high - low) / (b - a)")
    elif classifier.rules.source == "dicom":
        preprocess["dicom_window"] = "uint8 in: each DICOM file through its own window centre/width, by the caller"
    return {
        "task": classifier.task,
        "classes": json.dumps(classifier.classes),
        "threshold": json.dumps(classifier.threshold),  # multi-label: a list, one per class
        "temperature": json.dumps(classifier.meta["temperature"]),
        "preprocess": json.dumps(preprocess),
        "backbone": str(classifier.meta.get("backbone", "")),
        "model_version": model_version(run_dir),
        "quantization": quantization,
        "output": ("probabilities (N, C), columns in the order of 'classes', each class's own sigmoid; "
                   "labels = the classes whose p >= their threshold" if classifier.multilabel else
                   "probabilities (N, C), columns in the order of 'classes'; two classes: label = "
                   "classes[1] when p[1] >= threshold, else argmax"),
        "transferkit_version": __version__,
    }


def example_input(classifier: Classifier, layout: str, n: int = 2) -> torch.Tensor:
    s = classifier.image_size
    shape = (n, s, s, 3) if layout == "nhwc" else (n, 3, s, s)
    window = classifier.rules.window
    if window is not None:
        return torch.from_numpy(window.invert(np.random.default_rng(0).integers(0, 256, shape)))
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def export_onnx(classifier: Classifier, run_dir: str | Path, out: str | Path, layout: str = "nhwc") -> Path:
    """Write the float ONNX graph (dynamic batch size) with metadata; checked by onnx.checker."""
    import onnx

    graph, out = InferenceGraph(classifier, layout), Path(out)
    with warnings.catch_warnings(), quiet_logger("torch.onnx"), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(graph, (example_input(classifier, layout),), str(raw), dynamo=True,
                          input_names=["images"], output_names=["probabilities"], opset_version=OPSET,
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False)
        proto = onnx.load(str(raw))
    set_metadata(proto, metadata(classifier, run_dir, layout))
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out) as tmp:  # an interrupted export never leaves a half-written model.onnx
        onnx.save(proto, str(tmp))
    return out


def set_metadata(proto, values: dict[str, str]) -> None:
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, values)
    dtype = json.loads(values.get("preprocess", "{}")).get("dtype", "uint8")
    proto.doc_string = ("transferkit classifier: " + ("uint8 RGB images" if dtype == "uint8" else
                        "float32 intensities (the window inside)") + " in, class probabilities out")


class _Calibration:
    """onnxruntime's CalibrationDataReader over uint8 images, in batches."""

    def __init__(self, name: str, images: np.ndarray, batch_size: int = 16):
        self.batches = iter([{name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize(float_path: str | Path, out: str | Path, mode: str, calibration: np.ndarray | None) -> Path:
    """int8 weights (dynamic) or int8 weights and activations calibrated on images (static, QDQ)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static, shape_inference

    props = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
    with quiet_logger(), tempfile.TemporaryDirectory() as tmp:  # onnxruntime.quantization warns on the root logger
        prepared = Path(tmp) / "prepared.onnx"
        shape_inference.quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        target = Path(tmp) / "quantized.onnx"
        keep = float_ends(onnx.load(str(prepared)))
        if mode == "int8-dynamic":
            quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_exclude=keep)
        else:
            quantize_static(str(prepared), str(target), _Calibration("images", calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, nodes_to_exclude=keep,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(target))
    set_metadata(proto, {**props, "quantization": mode})
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return Path(out)


def float_ends(proto) -> list[str]:
    """Names of the nodes before the first convolution (input normalisation) and after the last
    linear layer (temperature, sigmoid/softmax): kept in float so probabilities stay precise."""
    nodes = list(proto.graph.node)  # topologically sorted
    first = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    last = max(i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul"))
    keep, needed, produced = [], set(nodes[first].input), set(nodes[last].output)
    for node in reversed(nodes[:first]):  # what feeds the first convolution
        if needed & set(node.output):
            keep.append(node.name)
            needed.update(node.input)
    for node in nodes[last + 1:]:  # what follows from the last linear layer
        if produced & set(node.input):
            keep.append(node.name)
            produced.update(node.output)
    return keep


def export_program(classifier: Classifier, run_dir: str | Path, out: str | Path, layout: str = "nhwc") -> Path:
    """`torch.export` program (.pt2): loads with `torch.export.load(path).module()`, torch only."""
    graph = InferenceGraph(classifier, layout)
    program = torch.export.export(graph, (example_input(classifier, layout),),
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    out = Path(out)
    with warnings.catch_warnings(), atomic_path(out) as tmp:
        warnings.simplefilter("ignore")
        torch.export.save(program, str(tmp), extra_files={
            "transferkit.json": json.dumps(metadata(classifier, run_dir, layout))})
    return out


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None,
           quantize_mode: str | None = None, val_data: str | Path | None = None,
           tolerance: float = 1.0, force: bool = False, layout: str = "nhwc") -> dict:
    """Export a run; returns {path, ...} with the validation accuracies when quantizing.

    A quantized model is written only if its accuracy on `val_data` is at most `tolerance`
    percentage points below the float model's, unless `force`. Accuracies are fractions.
    """
    run_dir = Path(run_dir)
    classifier = load(run_dir)
    if format == "torch":
        path = export_program(classifier, run_dir, Path(out or run_dir / "model.pt2"), layout)
        return {"path": str(path)}
    if format == "web":
        from .web import export_web

        return {"path": str(export_web(classifier, Path(out or run_dir / "web"), quantize_mode,
                                       lambda path: export_onnx(classifier, run_dir, path, layout)))}
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out or run_dir / ("model.xml" if format == "openvino" else "model.onnx"))
    if quantize_mode is None:
        if format == "openvino":
            from .openvino import convert, save

            with tempfile.TemporaryDirectory() as tmp:
                return {"path": str(save(convert(export_onnx(classifier, run_dir, Path(tmp) / "float.onnx", layout)),
                                         out))}
        return {"path": str(export_onnx(classifier, run_dir, out, layout))}
    if format == "openvino" and quantize_mode != "int8":
        raise ExportError(f"OpenVINO quantizes int8 (static, calibrated on --val-dir), not {quantize_mode!r}")
    if quantize_mode not in QUANTIZE_MODES:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize_mode!r}")
    if val_data is None and not force:
        raise ExportError("quantization needs validation data to check the accuracy (val_data; --val-dir "
                          "on the command line), or force to skip the check")
    data = None if val_data is None else classifier.read_labelled(val_data)
    if quantize_mode == "int8" and data is None:
        raise ExportError("static int8 quantization calibrates on images: give validation data (--val-dir)")
    images = None if data is None else data.images
    if images is not None and classifier.rules.window is not None:  # the graph takes intensities
        images = classifier.rules.window.invert(images)
    if images is not None and layout == "nchw":
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(classifier, run_dir, Path(tmp) / "float.onnx", layout)
        spread = None if images is None else np.linspace(0, len(images) - 1, min(len(images), 256)).astype(int)
        calibration = None if images is None else images[spread]  # every class, not the first
        if format == "openvino":
            from .openvino import quantized_ir

            engines = quantized_ir(float_path, Path(tmp), calibration)
        else:
            q_path = quantize(float_path, Path(tmp) / "quantized.onnx", quantize_mode, calibration)
            engines = OnnxClassifier(float_path), OnnxClassifier(q_path)
        report = {"path": str(out), "quantization": quantize_mode}
        if data is not None:
            for name, engine in zip(("float", "quantized"), engines):
                probs = engine.predict_proba(data.images)
                report[f"{name}_accuracy"] = evaluation_metrics(data.labels, probs, engine.classes,
                                                                engine.threshold)["accuracy"]
            report["drop"] = report["float_accuracy"] - report["quantized_accuracy"]
            if report["drop"] * 100 > tolerance and not force:
                raise ExportError(
                    f"quantized model refused: validation accuracy {report['quantized_accuracy']:.2%} vs "
                    f"{report['float_accuracy']:.2%} float (drop {report['drop'] * 100:.2f} points > tolerance "
                    f"{tolerance:g}); nothing written (force writes it anyway)")
        if format == "openvino":
            from .openvino import place

            place(engines[1].path, out)
            return report
        with atomic_path(out) as target:
            target.write_bytes(Path(q_path).read_bytes())
    return report
