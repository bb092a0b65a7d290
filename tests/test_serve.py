"""The HTTP service: in-process (TestClient) for answers and limits, a real uvicorn in a subprocess
for concurrency and the web page in headless chromium."""

from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import transferkit.apps.serve as serve
from transferkit.apps.serve import create_app
from transferkit.cfg.service import Limits
from transferkit.predict.run import model_version


@pytest.fixture(scope="module")
def client(binary_run):
    with TestClient(create_app(binary_run[1], engine="torch")) as c:
        yield c


@pytest.fixture(scope="module")
def images(lfw_split) -> list[Path]:
    return sorted(lfw_split[1].rglob("*.png"))


def expected(binary_run, paths):
    return {r["path"]: r for r in binary_run[0].predict_files([str(p) for p in paths])}


def assert_error(response, status: int, words: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words in response.json()["error"]


def test_health_and_page(client, binary_run):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["classes"] == binary_run[0].classes
    assert health["model_version"] == model_version(binary_run[1]) and health["engine"] == "torch"
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_predict_multipart_and_raw_body(client, binary_run, images):
    want = expected(binary_run, images[:3])
    for path in images[:3]:
        record = want[str(path)]
        for response in (client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}),
                         client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"}),
                         client.post("/predict", content=path.read_bytes())):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["label"] == record["label"]
            assert body["threshold"] == binary_run[0].threshold
            assert body["model_version"] == model_version(binary_run[1])
            for c, p in record["probabilities"].items():
                assert abs(body["probabilities"][c] - p) < 1e-5


def test_explain_returns_the_gradcam_overlay_of_the_prediction(client, binary_run, images, tmp_path):
    from transferkit.reports.explain import explain_files

    path = images[0]
    response = client.post("/explain", files={"file": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    record = next(explain_files(binary_run[0], [str(path)], tmp_path))  # what `transferkit explain` writes
    assert np.array_equal(served, np.asarray(Image.open(record["output"])))
    assert client.get("/health").json()["explain"] is True
    assert_error(client.post("/explain", content=b""), 400, "empty upload")
    assert_error(client.post("/explain", content=b"not an image"), 415, "not an image")


def test_explain_without_pytorch_weights_is_a_clear_4xx(binary_run, tmp_path):
    from transferkit.deploy.export import export_onnx

    onnx_file = export_onnx(binary_run[0], binary_run[1], tmp_path / "alone.onnx")
    with TestClient(create_app(onnx_file, engine="onnx")) as alone:
        assert alone.get("/health").json()["explain"] is False
        assert_error(alone.post("/explain", content=encoded()), 404, "model.safetensors")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries (almost) no data: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(size=(32, 32), fmt="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, fmt)
    return buffer.getvalue()


def test_every_limit_is_a_4xx_json_error(binary_run, images):
    limits = Limits(max_bytes=200_000, max_pixels=1_000_000)
    with TestClient(create_app(binary_run[1], engine="torch", limits=limits)) as client:
        post = client.post
        assert_error(post("/predict", content=b"\0" * 300_000), 413, "too large")
        assert_error(post("/predict", files={"file": ("big.png", b"\0" * 300_000)}), 413, "too large")
        assert_error(post("/predict", content=b"this is not an image"), 415, "not an image")
        png = images[0].read_bytes()
        assert_error(post("/predict", content=png[: len(png) // 2]), 422, "unreadable image")
        assert_error(post("/predict", content=png_header_only(5000, 5000)), 413, "too many pixels")
        assert_error(post("/predict", content=png_header_only(30000, 30000)), 413, "decompression bomb")
        assert_error(post("/predict", files={"image": ("a.png", png, "image/png")}), 422, "field 'file'")
        assert_error(post("/predict", data={"file": "a string, not a file"},
                          files={"other": ("x", b"x")}), 422, "field 'file'")
        assert_error(post("/predict", content=b""), 400, "empty upload")
        assert_error(post("/predict", files={"file": ("a.png", b"", "image/png")}), 400, "empty upload")
        assert_error(post("/predict", content=encoded(fmt="ICO")), 415, "format ICO not allowed")
        assert_error(post("/predict", data={"file": "x"}), 415, "multipart/form-data")
        assert_error(post("/predict", content=b"--nope\r\n\r\n",
                          headers={"content-type": "multipart/form-data; boundary=abc"}), 400, "malformed multipart")
        assert_error(client.get("/predict"), 405, "Method Not Allowed")
        assert_error(client.get("/nowhere"), 404, "Not Found")
        assert post("/predict", content=png).status_code == 200  # still serving


def test_request_timeout(binary_run, images, monkeypatch):
    def slow(*args):
        time.sleep(1.0)
        return original(*args)

    original = serve.decode_upload
    monkeypatch.setattr(serve, "decode_upload", slow)
    with TestClient(create_app(binary_run[1], engine="torch", limits=Limits(timeout=0.2))) as client:
        assert_error(client.post("/predict", content=images[0].read_bytes()), 408, "longer than 0.2 s")


def test_concurrent_answers_equal_sequential(server, images):
    def ask(path):
        body = httpx.post(server + "/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
        assert body.status_code == 200, body.text
        return body.json()

    sequential = [ask(p) for p in images]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(ask, images + images))
    for s, c in zip(sequential + sequential, concurrent):
        assert c["label"] == s["label"]
        assert max(abs(c["probabilities"][k] - v) for k, v in s["probabilities"].items()) < 1e-5


def test_batches_are_padded_to_a_few_shapes():
    from transferkit.apps.serve import padded

    assert [len(padded(np.zeros((n, 2, 2, 3), np.uint8))) for n in (1, 2, 3, 5, 9, 32)] == [1, 2, 4, 8, 16, 32]
    batch = np.arange(5 * 12, dtype=np.uint8).reshape(5, 2, 2, 3)
    grown = padded(batch)
    assert np.array_equal(grown[:5], batch) and all(np.array_equal(row, batch[-1]) for row in grown[5:])
