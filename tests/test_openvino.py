"""OpenVINO: the IR export carries the ONNX file's preprocessing, temperature and metadata and gives
PyTorch's probabilities; int8 behind the accuracy guard; every engine agrees on real images; `auto`
picks the fastest usable export and falls back with a note; predict and serve run it."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import openvino as ov
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from transferkit.apps.serve import create_app
from transferkit.cli import app
from transferkit.data.decode import decode
from transferkit.data.listing import load_labelled
from transferkit.deploy.export import export
from transferkit.predict.onnx_engine import read_metadata
from transferkit.predict.openvino_engine import OpenVinoClassifier
from transferkit.cfg.service import ENGINES
from transferkit.predict.run import load_engine
from transferkit.utils.errors import ExportError, RunError


@pytest.fixture(scope="module")
def test_images(binary_run, lfw_split):
    return decode(load_labelled(lfw_split[1], binary_run[0].classes), binary_run[0].image_size)


@pytest.fixture(scope="module")
def ov_run(exported, tmp_path_factory):
    """A copy of the exported run (model.onnx) with a float OpenVINO IR beside it."""
    run = tmp_path_factory.mktemp("openvino") / "run"
    shutil.copytree(exported[0], run)
    report = export(run, format="openvino")
    assert report["path"] == str(run / "model.xml") and (run / "model.bin").is_file()
    return run


def test_ir_carries_the_onnx_metadata_and_pytorchs_probabilities(ov_run, binary_run, test_images):
    engine = OpenVinoClassifier(ov_run / "model.xml")
    onnx_meta = read_metadata(ov_run / "model.onnx")
    assert {k: engine.meta[k] for k in onnx_meta} == onnx_meta  # classes, threshold, temperature, preprocess...
    assert engine.meta["quantization"] == "none" and len(engine.meta["weights_sha256"]) == 64
    model = ov.Core().read_model(str(ov_run / "model.xml"))
    (inp,) = model.inputs
    assert inp.get_element_type() == ov.Type.u8 and inp.get_partial_shape()[0].is_dynamic  # uint8 in, any batch
    assert all(op.get_output_element_type(0) != ov.Type.f16 for op in model.get_ops() if op.get_type_name() == "Constant")
    torch_probs = binary_run[0].predict_proba(test_images.images)
    for batch_size in (1, 7, 64):
        probs = engine.predict_proba(test_images.images, batch_size)
        assert probs.shape == (60, 2) and np.abs(probs - torch_probs).max() < 1e-4
    assert engine.labels(probs) == binary_run[0].labels(torch_probs)


def test_every_engine_gives_the_same_probabilities(ov_run, test_images):
    names = [name for name in ENGINES if name != "auto"]
    assert set(names) == {"torch", "onnx", "openvino"}
    probs = {name: load_engine(ov_run, name).predict_proba(test_images.images, 16) for name in names}
    for name in names:
        assert load_engine(ov_run, name).name == name
        assert np.abs(probs[name] - probs["torch"]).max() < 1e-4, name
    assert 0.9 < (probs["torch"].argmax(1) == test_images.labels).mean()  # a real model, not a constant


def test_int8_behind_the_accuracy_guard(ov_run, lfw_split, tmp_path):
    report = export(ov_run, format="openvino", out=tmp_path / "int8.xml", quantize_mode="int8",
                    val_data=lfw_split[1], tolerance=100)
    engine = OpenVinoClassifier(tmp_path / "int8.xml")
    assert engine.meta["quantization"] == "int8"
    ops = {op.get_type_name() for op in ov.Core().read_model(str(tmp_path / "int8.xml")).get_ops()}
    assert "FakeQuantize" in ops
    assert (tmp_path / "int8.bin").stat().st_size < 0.5 * (ov_run / "model.bin").stat().st_size
    data = decode(load_labelled(lfw_split[1], engine.classes), engine.image_size)
    labels = np.array([engine.classes.index(c) for c in engine.labels(engine.predict_proba(data.images))])
    assert report["quantized_accuracy"] == pytest.approx((labels == data.labels).mean())
    assert report["drop"] == pytest.approx(report["float_accuracy"] - report["quantized_accuracy"])
    result = CliRunner().invoke(app, ["export", str(ov_run), "--format", "openvino", "--quantize", "int8", "--val-dir",
                                      str(lfw_split[1]), "--tolerance", "-100", "--out", str(tmp_path / "no.xml")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "refused" in result.output and not (tmp_path / "no.xml").exists()
    with pytest.raises(ExportError, match="OpenVINO quantizes int8"):
        export(ov_run, format="openvino", quantize_mode="int8-dynamic", force=True)


def test_auto_prefers_openvino_and_falls_back_with_a_note(ov_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(ov_run, run)
    notes = []
    assert load_engine(run, log=notes.append).name == "openvino" and notes == []
    data = bytearray((run / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one damaged byte: the hash in model.xml no longer matches
    (run / "model.bin").write_bytes(bytes(data))
    assert load_engine(run, log=notes.append).name == "onnx"
    assert "does not match the SHA-256" in notes[-1] and "using ONNX Runtime" in notes[-1]
    with pytest.raises(RunError, match="does not match"):
        load_engine(run, "openvino")
    result = CliRunner().invoke(app, ["predict", str(run), str(tmp_path), "--engine", "openvino"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    shutil.copy(ov_run / "model.bin", run / "model.bin")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    notes.clear()
    assert load_engine(run, log=notes.append).name == "onnx"
    assert "pip install 'transferkit[openvino]'" in notes[0]
    with pytest.raises(RunError, match=r"transferkit\[openvino\]"):
        load_engine(run, "openvino")
    with pytest.raises(ExportError, match=r"transferkit\[openvino\]"):
        export(run, format="openvino", out=tmp_path / "x.xml")
    monkeypatch.undo()
    meta = json.loads((run / "model.json").read_text())
    meta["threshold"] = 0.3  # changed after both exports: both are out of date
    (run / "model.json").write_text(json.dumps(meta))
    notes.clear()
    assert load_engine(run, log=notes.append).name == "torch"
    assert len(notes) == 2 and all("out of date" in n and "using PyTorch" in n for n in notes)
    with pytest.raises(RunError, match="out of date"):
        load_engine(run, "openvino")
    (run / "model.xml").unlink()
    with pytest.raises(RunError, match="--format openvino"):
        load_engine(run, "openvino")


def test_predict_and_serve_with_openvino(ov_run, binary_run, lfw_split):
    images = sorted((lfw_split[1] / "face").glob("*.png"))[:4]
    result = CliRunner().invoke(app, ["predict", str(ov_run), *map(str, images), "--format", "json",
                                      "--engine", "openvino"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    want = list(binary_run[0].predict_files([str(p) for p in images]))
    for got, expected in zip(records, want, strict=True):
        assert got["label"] == expected["label"]
        assert max(abs(got["probabilities"][c] - p) for c, p in expected["probabilities"].items()) < 1e-4
    with TestClient(create_app(ov_run, "openvino")) as client:
        assert client.get("/health").json()["engine"] == "openvino"
        body = client.post("/predict", files={"file": ("a.png", images[0].read_bytes(), "image/png")}).json()
        assert body["label"] == want[0]["label"]
        assert max(abs(body["probabilities"][c] - p) for c, p in want[0]["probabilities"].items()) < 1e-4
    bare = CliRunner().invoke(app, ["predict", str(ov_run / "model.xml"), str(images[0]), "--format", "json"])
    assert bare.exit_code == 0 and json.loads(bare.stdout)["label"] == want[0]["label"]
