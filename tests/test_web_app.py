"""The offline browser app (`export --format web`) in a real headless chromium: served statically
and opened from disk, its probabilities are PyTorch's within 1e-4 on real images, and it fetches
nothing but its own files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from conftest import free_port
from test_browser import DevTools, browser, websockets  # noqa: F401 - the fixture, and chromium's check

from transferkit.deploy.export import export
from transferkit.deploy.web import ORT_WEB_VERSION
from transferkit.utils.errors import ExportError


@pytest.fixture(scope="module")
def web_app(binary_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("web") / "run"
    shutil.copytree(binary_run[1], run)
    return Path(export(run, format="web", out=run / "web")["path"])


def page_results(browser: str, url: str, images: list, requests: list) -> dict:
    page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
    with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
        tools = DevTools(ws)
        tools.call("Network.enable")
        tools.call("Page.navigate", url=url)
        tools.wait_for("!!document.getElementById('status') && "
                       "['ready', 'error'].includes(document.getElementById('status').dataset.state)", 120)
        assert tools.evaluate("document.getElementById('status').dataset.state") == "ready", \
            tools.evaluate("document.getElementById('status').textContent")
        assert ORT_WEB_VERSION in tools.evaluate("document.getElementById('meta').textContent")
        root = tools.call("DOM.getDocument")["root"]["nodeId"]
        node = tools.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in images])
        state = tools.wait_for("['done', 'error'].includes(document.getElementById('status').dataset.state)"
                               " && document.getElementById('status').dataset.state", 120)
        assert state == "done", tools.evaluate("document.getElementById('status').textContent")
        shown = tools.evaluate("[...document.querySelectorAll('.result')].map(r => [r.dataset.name, r.dataset.probs,"
                               " r.querySelector('.label').textContent])")
        requests += tools.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    return {name: (json.loads(probs), label) for name, probs, label in shown}


def check(results: dict, images: list, binary_run) -> None:
    assert len(results) == len(images)
    for want in binary_run[0].predict_files([str(p) for p in images]):
        probs, label = results[want["path"].rsplit("/", 1)[-1]]
        assert max(abs(p - want["probabilities"][c]) for c, p in zip(binary_run[0].classes, probs)) < 1e-4
        assert label == want["label"]


def test_served_app_gives_pytorchs_probabilities(browser, web_app, binary_run, lfw_split):  # noqa: F811
    images = sorted((lfw_split[1] / "face").glob("*.png"))[:15] + sorted((lfw_split[1] / "background").glob("*.png"))[:15]
    names = {p.name for p in images}
    assert len(names) < len(images)  # face/000.png and background/000.png: the page names files, not folders
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(web_app)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/index.html", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        for folder in ("face", "background"):  # one folder at a time: file names repeat across folders
            requests = []
            chosen = [p for p in images if p.parent.name == folder]
            check(page_results(browser, url + "/index.html", chosen, requests), chosen, binary_run)
            assert requests and all(r.startswith((url + "/", "data:", "blob:")) for r in requests), requests
            assert url + "/model.onnx" in requests
    finally:
        server.terminate()
        server.wait(10)


def test_app_opened_from_disk(browser, web_app, binary_run, lfw_split, tmp_path):  # noqa: F811
    from skimage import data

    chosen = sorted((lfw_split[1] / "face").glob("*.png"))[15:18]
    for name, picture in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("camera", data.camera()),
                          ("rocket", data.rocket())):  # large, non-square and grey photos: Pillow's downscaling
        Image.fromarray(np.asarray(picture)).save(tmp_path / f"{name}.png")
        chosen.append(tmp_path / f"{name}.png")
    requests = []
    check(page_results(browser, (web_app / "index.html").as_uri(), chosen, requests), chosen, binary_run)
    assert all(r.startswith(("file:", "data:", "blob:")) for r in requests), requests


def test_web_export_refusals(binary_run, tmp_path):
    with pytest.raises(ExportError, match="float model"):
        export(binary_run[1], format="web", out=tmp_path / "w", quantize_mode="int8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export(binary_run[1], format="web", out=tmp_path / "file")
