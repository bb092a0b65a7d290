"""Grad-CAM puts the heatmap where the class evidence is."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import write_folders
from PIL import Image

S = 128  # a 4 x 4 last feature map for EfficientNet-Lite0


def texture(rng: np.random.Generator) -> np.ndarray:
    """A 64 x 128 crop of a real brick-wall photo: the discriminative pattern."""
    from skimage import data

    brick = data.brick()
    y, x = rng.integers(0, brick.shape[0] - S), rng.integers(0, brick.shape[1] - S // 2)
    return np.repeat(brick[y:y + S, x:x + S // 2, None], 3, axis=2)


def plain(rng: np.random.Generator) -> np.ndarray:
    """Smooth grey with faint noise: no evidence."""
    level = rng.integers(90, 170)
    return np.clip(level + rng.normal(0, 3, (S, S, 3)), 0, 255).astype(np.uint8)


def half_pattern(rng: np.random.Generator, side: str) -> np.ndarray:
    image = plain(rng)
    if side == "left":
        image[:, :S // 2] = texture(rng)
    else:
        image[:, S // 2:] = texture(rng)
    return image


@pytest.fixture(scope="module")
def pattern_run(tmp_path_factory):
    """A head trained on: the brick pattern in one half (either) vs no pattern."""
    import transferkit

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("halves")
    write_folders(root / "data", {
        "pattern": [half_pattern(rng, "left" if i % 2 else "right") for i in range(30)],
        "plain": [plain(rng) for _ in range(30)]})
    classifier = transferkit.train(root / "data", root / "run", image_size=S, epochs=6, fine_tune_epochs=0,
                                   batch_size=16, seed=0, cache_dir="")
    return classifier, root


@pytest.mark.parametrize("side", ["left", "right"])
def test_heatmap_mass_is_in_the_half_with_the_pattern(pattern_run, side):
    from transferkit.reports.explain import gradcam

    classifier, _ = pattern_run
    rng = np.random.default_rng(123)
    images = np.stack([half_pattern(rng, side) for _ in range(4)])
    cams, probs, chosen = gradcam(classifier.model, images, threshold=classifier.threshold)
    assert classifier.classes == ["pattern", "plain"]
    assert (chosen == 0).all() and (probs[:, 0] > 0.5).all()  # "pattern" is class 0: minus the logit
    left = cams[:, :, :S // 2].sum((1, 2)) / cams.sum((1, 2))
    mass = left if side == "left" else 1 - left
    assert (mass > 0.6).all(), mass  # receptive fields and a 4 x 4 map upsampled blur the edge
    peak_column = cams.max(1).argmax(1)
    assert ((peak_column < S // 2) == (side == "left")).all()
    assert cams.shape == (4, S, S) and cams.max() == pytest.approx(1.0)


@pytest.mark.slow  # trains a run
def test_explain_cli_writes_overlays_and_reports_bad_files(pattern_run, tmp_path):
    classifier, root = pattern_run
    rng = np.random.default_rng(5)
    Image.fromarray(half_pattern(rng, "left")).save(tmp_path / "cell.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "transferkit.cli", "explain", str(root / "run"),
                             str(tmp_path / "cell.png"), str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "cams")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split("\t")[1] == "pattern" and "broken.jpg\tERROR: " in lines[1]
    overlay = np.asarray(Image.open(tmp_path / "cams" / "cell.png"))
    assert overlay.shape == (224, 224, 3)
    # the heatmap colours the pattern half warm (red) and the other half cool (blue)
    red_minus_blue = overlay[..., 0].astype(int) - overlay[..., 2].astype(int)
    assert red_minus_blue[:, :112].mean() > red_minus_blue[:, 112:].mean() + 20
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # trains a run
@pytest.mark.parametrize("side", ["left", "right"])
def test_another_cnn_trained_on_real_images_puts_the_heatmap_on_the_pattern(pattern_run, side, tmp_path_factory):
    """MobileNetV2 (the seed's backbone: Keras padding, another block layout, its offline weights)
    trained on the same brick halves: the heatmap mass is in the half with the pattern."""
    import transferkit
    from transferkit.reports.explain import gradcam

    _, root = pattern_run
    run = root / "run-mobilenetv2"
    if not (run / "model.json").is_file():
        transferkit.train(root / "data", run, backbone="mobilenetv2_100", image_size=S, epochs=6,
                          fine_tune_epochs=0, batch_size=16, seed=0, cache_dir="")
    classifier = transferkit.load(run)
    rng = np.random.default_rng(123)
    images = np.stack([half_pattern(rng, side) for _ in range(4)])
    cams, probs, chosen = gradcam(classifier.model, images, threshold=classifier.threshold)
    assert classifier.classes == ["pattern", "plain"] and (chosen == 0).all() and (probs[:, 0] > 0.5).all()
    left = cams[:, :, :S // 2].sum((1, 2)) / cams.sum((1, 2))
    mass = left if side == "left" else 1 - left
    assert (mass > 0.6).all(), mass
    assert ((cams.max(1).argmax(1) < S // 2) == (side == "left")).all()


def test_a_resnet_runs_and_a_transformer_is_a_clear_error():
    """ResNet's layout (no offline ImageNet weights, so only that the map is computed on real
    images, for the class asked); a vision transformer has no spatial map: one clear error."""
    import timm
    import torch

    from transferkit.models.backbones import Preprocess
    from transferkit.models.transfer import TransferModel
    from transferkit.reports.explain import gradcam

    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(Image.fromarray(half_pattern(rng, "left")).resize((64, 64))) for _ in range(2)])
    torch.manual_seed(0)
    resnet = TransferModel(timm.create_model("resnet18", num_classes=0), 3, Preprocess(64, (0.5,) * 3, (0.5,) * 3))
    cams, probs, chosen = gradcam(resnet, images, target=np.array([2, 0]))
    assert cams.shape == (2, 64, 64) and probs.shape == (2, 3) and chosen.tolist() == [2, 0]
    assert cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    vit = TransferModel(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64), 2,
                        Preprocess(64, (0.5,) * 3, (0.5,) * 3))
    with pytest.raises(ValueError, match="Grad-CAM needs a CNN backbone"):
        gradcam(vit, images)
