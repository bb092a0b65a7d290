"""Shared fixtures: real tiny images (scikit-image's LFW subset) written to class folders."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
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


@pytest.fixture(scope="module")
def lfw_data():
    """48 real LFW crops (24 backgrounds, 24 faces) decoded at the test size, without a folder."""
    from transferkit.data.listing import LabelledImages

    images, labels = lfw_arrays()
    pick = np.r_[0:24, 100:124]
    big = np.stack([np.asarray(Image.fromarray(images[i]).convert("RGB").resize((SIZE, SIZE))) for i in pick])
    return LabelledImages([str(i) for i in pick], labels[pick], ["background", "face"], images=big)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(run: Path, *options: str):
    """`transferkit serve RUN` in its own process on loopback until the block ends; yields its URL."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "serve", str(run), "--port", str(port),
                                *options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def server(binary_run):
    """`transferkit serve` of the shared run (PyTorch engine); yields its base URL."""
    with serving(binary_run[1], "--engine", "torch") as url:
        yield url


@pytest.fixture(scope="session")
def exported(binary_run, tmp_path_factory):
    """A copy of the shared run with a float ONNX export (NHWC) next to its weights."""
    import shutil

    from transferkit.deploy.export import export

    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(binary_run[1], run)
    report = export(run)
    return run, report


def write_csv(path: Path, rows: list[tuple[str, str]], header=("path", "labels")) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def composite_set(root: Path, offset: int, n: int) -> Path:
    """A real multi-label set: LFW faces and crops of scikit-image's brick and grass texture photos,
    alone or two side by side (a composite carries both classes), and LFW background crops that
    carry no label. `n` images of each kind (face, brick, grass alone; the three pairs side by side; no label),
    from real crops starting at `offset`; returns its labels.csv."""
    images, labels = lfw_arrays()
    faces, backgrounds = images[labels == 1][offset:], images[labels == 0][offset:]
    textures = texture_crops(9 * n, seed=offset)
    bricks, grasses = textures[0::3], textures[1::3]
    root.mkdir(parents=True, exist_ok=True)
    rows = []

    def save(name: str, picture: np.ndarray, classes: list[str]) -> None:
        Image.fromarray(picture).save(root / f"{name}.png")
        rows.append((f"{name}.png", "|".join(classes)))

    for i in range(n):
        save(f"face{i}", faces[i], ["face"])
        save(f"brick{i}", bricks[i], ["brick"])
        save(f"grass{i}", grasses[i], ["grass"])
        save(f"face_brick{i}", np.hstack([faces[n + i], bricks[n + i]]), ["face", "brick"])
        save(f"face_grass{i}", np.hstack([faces[2 * n + i], grasses[n + i]]), ["face", "grass"])
        save(f"brick_grass{i}", np.hstack([bricks[2 * n + i], grasses[2 * n + i]]), ["brick", "grass"])
        save(f"none{i}", backgrounds[i], [])
    return write_csv(root / "labels.csv", rows)


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    train_csv, test_csv = composite_set(root / "train", 0, 10), composite_set(root / "test", 30, 5)
    out = root / "run"
    from typer.testing import CliRunner

    from transferkit.cli import app

    result = CliRunner().invoke(app, ["train", str(train_csv), "--out", str(out), "--image-size", str(SIZE),
                                 "--epochs", "6", "--fine-tune-epochs", "1", "--batch-size", "16", "--seed", "1",
                                 "--threshold-metric", "f1"])
    assert result.exit_code == 0, result.output
    assert "Multi-label data: 3 classes, 1.29 labels per image on average, 10 image(s) with none" in result.output
    return out, train_csv, test_csv


@pytest.fixture(scope="session")
def multilabel_export(multilabel_run, tmp_path_factory):
    import shutil

    from transferkit.deploy.export import export

    run = tmp_path_factory.mktemp("mlexport") / "run"
    shutil.copytree(multilabel_run[0], run)
    export(run)
    return run


SLOW_FIXTURES = {"binary_run", "exported", "server", "browser", "multilabel_run", "multilabel_export"}
# a training run, a service, chromium


def pytest_collection_modifyitems(items):
    """Tests that need a trained run, a service or a browser are `slow`, as are those marked so."""
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture()
def old_run(binary_run, tmp_path) -> Path:
    """The shared run as a run trained before OOD scores: no ood.safetensors, no "ood" entry."""
    import json
    import shutil

    from transferkit.openworld import ood

    run = tmp_path / "old"
    shutil.copytree(binary_run[1], run)
    meta = json.loads((run / "model.json").read_text())
    for key in ("ood", "conformal"):
        meta.pop(key)
    meta["config"].pop("ood_keep")
    (run / "model.json").write_text(json.dumps(meta))
    (run / ood.FILE).unlink()
    return run
