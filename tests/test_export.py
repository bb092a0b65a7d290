"""Export: ONNX parity with PyTorch on real images, metadata round trip, torch.export without
transferkit, the quantization guard, and the prediction engines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.data.decode import decode
from transferkit.data.listing import load_labelled
from transferkit.deploy.export import export
from transferkit.predict.onnx_engine import OnnxClassifier, read_metadata
from transferkit.predict.run import load, load_engine, model_version
from transferkit.utils.errors import ExportError, RunError


@pytest.fixture(scope="module")
def test_images(binary_run, lfw_split):
    return decode(load_labelled(lfw_split[1], binary_run[0].classes), binary_run[0].image_size)


def test_onnx_file_is_checked_and_inference_only(exported):
    run, report = exported
    assert report["path"] == str(run / "model.onnx")
    proto = onnx.load(report["path"])
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "Bernoulli"}
    (inp,), (out, ood) = proto.graph.input, proto.graph.output
    assert (out.name, ood.name) == ("probabilities", "ood_score")  # docs/openworld.md
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT == ood.type.tensor_type.elem_type
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]  # dynamic batch, NHWC


def test_metadata_round_trip(exported, binary_run):
    run, _ = exported
    classifier = binary_run[0]
    meta = read_metadata(run / "model.onnx")
    assert meta["classes"] == classifier.classes
    assert meta["threshold"] == classifier.threshold and meta["temperature"] == classifier.meta["temperature"]
    pre = meta["preprocess"]
    assert (pre["image_size"], pre["layout"], pre["dtype"]) == (64, "nhwc", "uint8")
    assert pre["mean"] == list(classifier.meta["preprocess"]["mean"])
    assert meta["backbone"] == classifier.meta["backbone"]
    assert meta["model_version"] == model_version(run) and len(meta["model_version"]) == 16
    assert meta["quantization"] == "none"


def test_onnx_parity_on_real_images(exported, binary_run, test_images):
    torch_probs = binary_run[0].predict_proba(test_images.images)
    engine = OnnxClassifier(exported[0] / "model.onnx")
    for batch_size in (1, 7, 64):  # the batch dimension is dynamic
        onnx_probs = engine.predict_proba(test_images.images, batch_size)
        assert onnx_probs.shape == torch_probs.shape == (60, 2)
        assert np.abs(onnx_probs - torch_probs).max() < 1e-4
    assert engine.labels(onnx_probs) == binary_run[0].labels(torch_probs)


def test_temperature_folded_in_and_nchw_layout(binary_run, test_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    meta = json.loads((run / "model.json").read_text())
    meta["temperature"] = 2.5
    (run / "model.json").write_text(json.dumps(meta))
    out = export(run, out=tmp_path / "nchw.onnx", layout="nchw")["path"]
    engine = OnnxClassifier(out)
    assert engine.meta["temperature"] == 2.5 and engine.layout == "nchw"
    expected = load(run).predict_proba(test_images.images)
    assert np.abs(engine.predict_proba(test_images.images) - expected).max() < 1e-4
    plain = binary_run[0].predict_proba(test_images.images)
    assert np.abs(expected - plain).max() > 1e-3  # the temperature did change the probabilities


def test_onnx_tta_averages_image_and_mirror(exported, test_images):
    engine = OnnxClassifier(exported[0] / "model.onnx")
    images = test_images.images[:10]
    both = (engine.predict_proba(images) + engine.predict_proba(images[:, :, ::-1].copy())) / 2
    assert np.abs(engine.predict_proba(images, 4, tta=True) - both).max() < 1e-6


def test_torch_export_loads_without_transferkit(binary_run, test_images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    path = export(run, format="torch")["path"]
    np.save(tmp_path / "x.npy", test_images.images[:9])
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("transferkit", "timm"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        program = torch.export.load({path!r}).module()
        np.save({str(tmp_path / 'p.npy')!r}, program(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).numpy())
        assert "transferkit" not in sys.modules and "timm" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    expected = binary_run[0].predict_proba(test_images.images[:9])
    assert np.abs(np.load(tmp_path / "p.npy") - expected).max() < 1e-4


def test_quantization_guard(exported, binary_run, lfw_split, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    with pytest.raises(ExportError, match="--val-dir"):
        export(run, quantize_mode="int8")
    forced = export(run, out=tmp_path / "forced.onnx", quantize_mode="int8", val_data=lfw_split[1], force=True)
    engine = OnnxClassifier(forced["path"])
    assert engine.meta["quantization"] == "int8" and engine.classes == binary_run[0].classes
    graph = onnx.load(forced["path"]).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    quantized_inputs = {producer.get(node.input[0]) for node in graph.node if node.op_type == "QuantizeLinear"}
    assert "Conv" in {n.op_type for n in graph.node} and "QuantizeLinear" in {n.op_type for n in graph.node}
    assert not quantized_inputs & {"Sigmoid", "Softmax"}  # probabilities stay float, not 8-bit steps
    assert all(node.op_type != "QuantizeLinear" for node in graph.node if "images" in node.input)
    data = decode(load_labelled(lfw_split[1], engine.classes), engine.image_size)
    labels = np.array([engine.classes.index(c) for c in engine.labels(engine.predict_proba(data.images))])
    assert forced["quantized_accuracy"] == pytest.approx((labels == data.labels).mean())
    drop = forced["drop"]
    assert drop == pytest.approx(forced["float_accuracy"] - forced["quantized_accuracy"])
    with pytest.raises(ExportError, match="refused.*tolerance"):
        export(run, out=tmp_path / "refused.onnx", quantize_mode="int8", val_data=lfw_split[1],
               tolerance=drop * 100 - 0.5)  # the tolerance is in percentage points
    assert not (tmp_path / "refused.onnx").exists()
    kept = export(run, out=tmp_path / "kept.onnx", quantize_mode="int8", val_data=lfw_split[1],
                  tolerance=drop * 100 + 0.5)
    assert kept["quantized_accuracy"] == forced["quantized_accuracy"]
    bank = (exported[0] / "ood.safetensors").stat().st_size  # the OOD score's arrays stay float (docs/openworld.md)
    assert (tmp_path / "kept.onnx").stat().st_size - bank < 0.5 * (exported[0] / "model.onnx").stat().st_size


def test_export_cli_errors_are_one_line(binary_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    result = CliRunner().invoke(app, ["export", str(run), "--quantize", "int8"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: quantization needs validation data")
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not found" in result.output and "Traceback" not in result.output


def test_engine_choice(exported, binary_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    assert load_engine(run).name == "torch"  # auto without an export
    with pytest.raises(RunError, match="transferkit export"):
        load_engine(run, "onnx")
    shutil.copy(exported[0] / "model.onnx", run / "model.onnx")
    assert load_engine(run).name == "onnx"
    assert load_engine(run, "torch").__class__.__name__ == "Classifier"
    meta = json.loads((run / "model.json").read_text())
    meta["threshold"] = 0.3  # changed after the export: the export is stale
    (run / "model.json").write_text(json.dumps(meta))
    notes = []
    assert load_engine(run, log=notes.append).name == "torch"
    assert "out of date" in notes[0]
    with pytest.raises(RunError, match="out of date"):
        load_engine(run, "onnx")


def test_predict_cli_onnx_streams_same_answers_as_torch(exported, lfw_split, tmp_path):
    run = exported[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    runner = CliRunner()
    outputs = {}
    for engine in ("torch", "onnx"):
        result = runner.invoke(app, ["predict", str(run), str(lfw_split[1]), str(broken),
                                     "--format", "json", "--engine", engine, "--batch-size", "16"])
        assert result.exit_code == 0, result.output
        outputs[engine] = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outputs["onnx"]) == 61 and outputs["onnx"][-1]["path"] == str(broken)
    assert "error" in outputs["onnx"][-1]
    for a, b in zip(outputs["torch"][:-1], outputs["onnx"][:-1]):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 1e-4
    result = runner.invoke(app, ["predict", str(run), str(lfw_split[1]), "--format", "csv"])
    rows = result.stdout.splitlines()
    assert rows[0] == "path,label,p_background,p_face,ood_score,unknown,error" and len(rows) == 61
    assert "━" not in result.stderr  # no progress bar when stderr is not a terminal


def test_predict_progress_bar_on_a_terminal(exported, lfw_split, monkeypatch):
    import transferkit.utils.progress as progress

    calls = []

    class Recording(progress.Reporter):
        def __init__(self):
            super().__init__(live=True)

        def start(self, description, total):
            calls.append(("start", total))
            super().start(description, total)

        def advance(self, stats=""):
            calls.append(("advance",))
            super().advance(stats)

    monkeypatch.setattr(progress, "Reporter", Recording)
    result = CliRunner().invoke(app, ["predict", str(exported[0]), str(lfw_split[1]), "--format", "csv"])
    assert result.exit_code == 0
    assert calls[0] == ("start", 60) and calls.count(("advance",)) == 60  # total known, one step a file
    assert len(result.stdout.splitlines()) == 61  # the bar goes to stderr, never into the records
