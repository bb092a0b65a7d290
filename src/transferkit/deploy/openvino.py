"""OpenVINO export: the IR (model.xml + model.bin) converted from our float ONNX graph, so it has
the same preprocessing inside (uint8 RGB in, or the intensity window), the same temperature and
the same probabilities out, and the ONNX file's metadata in its runtime info (section
"transferkit"), plus the SHA-256 of its .bin. int8: NNCF's post-training quantization, calibrated
on the validation images, behind the same accuracy guard as ONNX's int8."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from ..predict.openvino_engine import SECTION, WEIGHTS_KEY, first_line, openvino_module
from ..utils.errors import ExportError, RunError
from ..utils.files import sha256_of
from ..utils.logs import quiet_logger


def quantized_ir(float_onnx: Path, tmp: Path, calibration: np.ndarray):
    """(float engine, int8 engine) of an exported float ONNX file, their IRs written in `tmp`."""
    from ..predict.openvino_engine import OpenVinoClassifier

    model = convert(float_onnx)
    float_xml = save(model, tmp / "float.xml")
    return OpenVinoClassifier(float_xml), OpenVinoClassifier(save(quantize(model, calibration), tmp / "int8.xml"))


def convert(onnx_path: str | Path):
    """The OpenVINO model of an exported ONNX file, with the ONNX file's metadata as runtime info."""
    import onnx

    try:
        ov = openvino_module()
    except RunError as exc:
        raise ExportError(str(exc).replace("engine", "export")) from None
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - openvino's conversion errors are untyped
        raise ExportError(f"OpenVINO could not convert the ONNX graph ({first_line(exc)})") from None
    for prop in onnx.load(str(onnx_path), load_external_data=False).metadata_props:
        model.set_rt_info(prop.value, [SECTION, prop.key])
    return model


def quantize(model, calibration: np.ndarray, batch_size: int = 16):
    """int8 weights and activations by NNCF, calibrated on all of `calibration` (the graph's inputs)."""
    try:
        with quiet_logger("torch"):  # nncf imports torch when it is there, which warns about CUDA
            import nncf
    except ImportError:
        raise ExportError("int8 OpenVINO export needs nncf: pip install 'transferkit[openvino]'") from None
    batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
    # nncf's progress bars go to stdout, which is the command's output: not there
    with quiet_logger("nncf"), contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(calibration),
                                  preset=nncf.QuantizationPreset.MIXED)
    quantized.set_rt_info("int8", [SECTION, "quantization"])
    return quantized


def save(model, out: str | Path) -> Path:
    """model.xml and model.bin, float32 weights kept (no fp16 compression); the .bin's SHA-256 in
    the .xml."""
    ov = openvino_module()
    out = Path(out)
    if out.suffix != ".xml":
        raise ExportError(f"{out}: an OpenVINO export is named NAME.xml (its weights go to NAME.bin)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        staged = Path(tmp) / "model.xml"
        ov.save_model(model, str(staged), compress_to_fp16=False)
        model.set_rt_info(sha256_of(staged.with_suffix(".bin")), [SECTION, WEIGHTS_KEY])
        ov.save_model(model, str(staged), compress_to_fp16=False)  # the same .bin; the .xml names its hash
        place(staged, out)
    return out


def place(xml: Path, out: Path) -> None:
    """Move an IR into place, the .bin first and the .xml (which holds the .bin's hash) last, so an
    interrupted export leaves a pair the engine refuses (hash mismatch), never a wrong model."""
    os.replace(xml.with_suffix(".bin"), out.with_suffix(".bin"))
    os.replace(xml, out)
