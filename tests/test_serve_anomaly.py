"""`transferkit serve` of an anomaly run (`train --task anomaly`) on real images (scikit-image's brick
photograph, good crops and crops with a pasted defect): /predict is `predict`'s record plus the map
`explain` writes, /health says the task and threshold, the limits answer as for a classifier, the
page shows the verdict, the score against the threshold and the map in headless chromium."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serving
from fastapi.testclient import TestClient
from PIL import Image
from test_anomaly import brick_crops, paste
from test_browser import DevTools, websockets
from typer.testing import CliRunner

import test_browser
from transferkit.apps.serve import create_app
from transferkit.cfg.service import Limits
from transferkit.cli import app

browser = test_browser.browser  # the fixture: headless chromium with a fresh profile
SIZE = 96  # test_anomaly's: 12 x 12 patch cells, fine enough to find a pasted defect


@pytest.fixture(scope="module")
def anomaly_run(tmp_path_factory):
    """An anomaly run on 40 real brick crops, the threshold on 40 more (keep 0.9); its detector; a
    folder of good and defective crops it never saw."""
    from conftest import write_folders

    from transferkit.predict.anomaly_engine import load_detector

    root = tmp_path_factory.mktemp("serve-anomaly")
    write_folders(root, {"good": brick_crops(40, seed=1), "threshold": brick_crops(40, seed=2)})
    result = CliRunner().invoke(app, ["train", str(root / "good"), "--out", str(root / "run"), "--task", "anomaly",
                                      "--image-size", str(SIZE), "--val-dir", str(root / "threshold"),
                                      "--anomaly-keep", "0.9", "--seed", "0"])
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(9)
    clean = brick_crops(4, seed=5)
    (root / "new").mkdir()
    for i, picture in enumerate(clean):
        Image.fromarray(picture).save(root / "new" / f"good{i}.png")
        Image.fromarray(paste(picture, "blob", rng)[0]).save(root / "new" / f"bad{i}.png")
    return root / "run", load_detector(root / "run"), sorted((root / "new").glob("*.png"))


@pytest.fixture(scope="module")
def client(anomaly_run):
    with TestClient(create_app(anomaly_run[0])) as c:
        yield c


def records(detector, paths) -> dict[str, dict]:
    """What `transferkit predict` prints for each file."""
    return {Path(r["path"]).name: r for r in detector.predict_files([str(p) for p in paths])}


def explained(detector, paths, out: Path) -> dict[str, np.ndarray]:
    """What `transferkit explain` writes for each file: the map over the image. One image a batch,
    as the service scores a lone request: a batch of others moves the map by ~1e-5, a colour level."""
    from transferkit.reports.anomaly import explain_anomaly

    return {Path(r["path"]).name: np.asarray(Image.open(r["output"]))
            for p in paths for r in explain_anomaly(detector, [p], out, batch_size=1)}


def data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def assert_same_map(shown: np.ndarray, want: np.ndarray) -> None:
    """Maps computed in another process or batch: the patch distances move by ~1e-5 of the
    threshold, at most 2 colour levels of the overlay."""
    assert shown.shape == want.shape
    assert np.abs(shown.astype(int) - want.astype(int)).max() <= 2


def test_health_says_the_task_and_threshold(client, anomaly_run):
    run, detector, _ = anomaly_run
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["task"] == "anomaly" and health["engine"] == "torch"
    assert health["threshold"] == detector.threshold and health["image_size"] == SIZE
    assert health["normal_class"] == detector.meta["normal_class"]
    assert health["model_version"] == detector.version and len(detector.version) == 16
    page = client.get("/")
    assert page.status_code == 200 and 'id="map"' in page.text
    assert "img-src blob: data:" in page.headers["content-security-policy"]


def test_predict_is_predicts_record_with_explains_map(client, anomaly_run, tmp_path):
    run, detector, paths = anomaly_run
    want, maps = records(detector, paths), explained(detector, paths, tmp_path)
    assert {want[p.name]["label"] for p in paths if p.name.startswith("bad")} == {"anomaly"}
    assert {want[p.name]["label"] for p in paths if p.name.startswith("good")} == {"normal"}
    for path in paths:
        for response in (client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}),
                         client.post("/predict", content=path.read_bytes())):
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == {"anomaly_score", "label", "threshold", "model_version", "map"}
            record = want[path.name]
            assert body["label"] == record["label"] and body["threshold"] == record["threshold"]
            assert abs(body["anomaly_score"] - record["anomaly_score"]) <= 1e-5 * max(1, record["anomaly_score"])
            assert np.array_equal(data_url_image(body["map"]), maps[path.name])
    alone = client.post("/explain", content=paths[0].read_bytes())  # the map alone, as PNG
    assert alone.status_code == 200 and alone.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(alone.content))), maps[paths[0].name])


def assert_error(response, status: int, words: str):
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_limits_and_bad_uploads_answer_as_for_a_classifier(anomaly_run):
    run, _, paths = anomaly_run
    with TestClient(create_app(run, limits=Limits(max_bytes=100_000, max_pixels=50_000))) as client:
        png = paths[0].read_bytes()
        assert_error(client.post("/predict", content=b"\0" * 200_000), 413, "too large")
        assert_error(client.post("/predict", content=b"not an image"), 415, "not an image")
        assert_error(client.post("/predict", content=png[: len(png) // 2]), 422, "unreadable image")
        assert_error(client.post("/predict", content=b""), 400, "empty upload")
        big = io.BytesIO()
        Image.new("RGB", (300, 300), 128).save(big, "PNG")
        assert_error(client.post("/predict", content=big.getvalue()), 413, "too many pixels")
        assert_error(client.post("/explain?label=good", content=png), 422, "label is for classifiers")
        assert client.post("/predict", content=png).status_code == 200  # still serving


@pytest.mark.parametrize("options, words", [
    (["--engine", "onnx"], "--engine onnx is for classifiers"),
    (["--ood-keep", "0.9"], "--ood-keep is for classifiers"),
    (["--coverage", "0.9"], "--coverage is for classifiers"),
])
def test_classifier_options_on_an_anomaly_run_are_one_line(anomaly_run, options, words):
    result = CliRunner().invoke(app, ["serve", str(anomaly_run[0]), *options])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and words in result.output


def test_concurrent_answers_equal_sequential(anomaly_run):
    run, _, paths = anomaly_run
    with serving(run) as url:
        def ask(path):
            response = httpx.post(url + "/predict", files={"file": (path.name, path.read_bytes())}, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()

        sequential = [ask(p) for p in paths]
        with ThreadPoolExecutor(16) as pool:
            concurrent = list(pool.map(ask, paths + paths))  # micro-batched, padded
    for s, c in zip(sequential + sequential, concurrent):
        assert c["label"] == s["label"]
        assert abs(c["anomaly_score"] - s["anomaly_score"]) <= 1e-5 * max(1, s["anomaly_score"])
        assert_same_map(data_url_image(c["map"]), data_url_image(s["map"]))


def test_the_page_shows_the_verdict_the_score_and_the_map(browser, anomaly_run, tmp_path):
    run, detector, paths = anomaly_run
    chosen = [next(p for p in paths if p.name == name) for name in ("good0.png", "bad0.png")]
    want, maps = records(detector, chosen), explained(detector, chosen, tmp_path)
    with serving(run) as url:
        page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
        with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            tools = DevTools(ws)
            tools.call("Page.enable")
            tools.call("Page.navigate", url=url + "/")
            tools.wait_for("document.readyState === 'complete' && "
                           "document.getElementById('meta').textContent.includes('anomaly run')")
            for path in chosen:
                record = want[path.name]
                root = tools.call("DOM.getDocument")["root"]["nodeId"]
                node = tools.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
                tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
                tools.wait_for(f"document.getElementById('verdict').dataset.verdict === {record['label']!r} && "
                               "document.getElementById('label').dataset.state === 'done'")
                shown = json.loads(tools.evaluate(
                    "JSON.stringify({label: document.getElementById('label').textContent, "
                    "verdict: document.getElementById('verdict').textContent, "
                    "value: document.getElementById('score-value').textContent, "
                    "text: document.getElementById('score-text').textContent, "
                    "width: document.getElementById('score-bar').style.width, "
                    "shown: getComputedStyle(document.getElementById('anomaly')).display, "
                    "bars: document.querySelectorAll('#bars .row').length, map: document.getElementById('map').src})"))
                score, threshold = record["anomaly_score"], record["threshold"]
                assert shown["label"] == record["label"] and shown["shown"] == "block" and shown["bars"] == 0
                assert shown["verdict"].startswith("Anomaly: " if record["label"] == "anomaly" else "Normal: ")
                assert shown["value"] == f"{score:.3f}"
                sign = ">" if record["label"] == "anomaly" else "≤"
                assert shown["text"] == f"anomaly score {score:.3f} {sign} threshold {threshold:.3f}"
                assert abs(float(shown["width"].rstrip("%")) - min(100, 50 * score / threshold)) <= 0.05  # threshold: half
                assert tools.wait_for("document.getElementById('map').naturalWidth") == maps[path.name].shape[1]
                assert_same_map(data_url_image(shown["map"]), maps[path.name])  # the server is another process
