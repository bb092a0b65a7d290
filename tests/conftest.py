"""Shared fixtures: real tiny images (scikit-image's LFW subset) written to class folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never depend on a download
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="transferkit-test-cache-")  # never the user's
SIZE = 64  # small input size keeps the suite fast; the backbone and weights are the real ones


def lfw_arrays() -> tuple[np.ndarray, np.ndarray]:
    """200 real 25x25 grey crops: 100 faces then 100 backgrounds; labels 1 = face."""
    from skimage.data import lfw_subset

    images = (lfw_subset() * 255).round().astype(np.uint8)
    return images, np.array([1] * 100 + [0] * 100)


def write_folders(root: Path, groups: dict[str, list[np.ndarray]]) -> Path:
    for name, images in groups.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    return root


def texture_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """Real texture photos (brick, grass, gravel) cut into 25x25 grey crops: a third class."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [data.brick(), data.grass(), data.gravel()]
    crops = []
    for i in range(n):
        src = sources[i % 3]
        y, x = rng.integers(0, src.shape[0] - 100), rng.integers(0, src.shape[1] - 100)
        crops.append(np.asarray(Image.fromarray(src[y:y + 100, x:x + 100]).resize((25, 25))))
    return crops


@pytest.fixture(scope="session")
def lfw_split(tmp_path_factory) -> tuple[Path, Path]:
    """Faces vs background: train/ (70 + 70) and held-out test/ (30 + 30) class folders."""
    images, labels = lfw_arrays()
    root = tmp_path_factory.mktemp("lfw")
    faces, backgrounds = images[labels == 1], images[labels == 0]
    write_folders(root / "train", {"face": list(faces[:70]), "background": list(backgrounds[:70])})
    write_folders(root / "test", {"face": list(faces[70:]), "background": list(backgrounds[70:])})
    return root / "train", root / "test"


@pytest.fixture(scope="session")
def binary_run(lfw_split, tmp_path_factory):
    """One short real training run (both phases) shared by the tests that only read it."""
    import transferkit

    out = tmp_path_factory.mktemp("runs") / "binary"
    classifier = transferkit.train(lfw_split[0], out, image_size=SIZE, epochs=3, fine_tune_epochs=2,
                                   batch_size=16, seed=1)
    return classifier, out
