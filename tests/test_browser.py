"""The web page in a real headless chromium, driven over the DevTools protocol (a websocket): pick
an image through the page's file input and see the predicted label and the probability bars.

Skipped when chromium is missing, unless TRANSFERKIT_REQUIRE_BROWSER=1 (CI), then it fails.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

websockets = pytest.importorskip("websockets.sync.client")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("TRANSFERKIT_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium not found but TRANSFERKIT_REQUIRE_BROWSER=1")
    pytest.skip("chromium not installed", allow_module_level=True)


class DevTools:
    """The few DevTools protocol calls the test needs, on one page target."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    def call(self, method: str, **params) -> dict:
        id_ = next(self.ids)
        self.ws.send(json.dumps({"id": id_, "method": method, "params": params}))
        while True:  # skip events until our answer
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == id_:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)


@pytest.fixture()
def browser():
    """Headless chromium with a fresh profile; yields the DevTools HTTP endpoint."""
    profile = tempfile.mkdtemp(prefix="transferkit-chromium-")
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = Path(profile) / "DevToolsActivePort"  # chromium writes its chosen port here
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
        assert process.poll() is None, "chromium exited"
        time.sleep(0.1)
    port = port_file.read_text().split()[0]
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)
    shutil.rmtree(profile, ignore_errors=True)


def test_upload_through_the_page_shows_the_label(browser, server, binary_run, lfw_split):  # noqa: F811
    image = sorted((lfw_split[1] / "face").glob("*.png"))[0]
    want = next(binary_run[0].predict_files([str(image)]))
    page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
    with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
        check_page(DevTools(ws), server, image, want)


def check_page(tools: DevTools, server: str, image: Path, want: dict) -> None:
    tools.call("Page.enable")
    tools.call("Page.navigate", url=server + "/")
    tools.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
    root = tools.call("DOM.getDocument")["root"]["nodeId"]
    node = tools.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
    state = tools.wait_for("['done', 'error'].includes(document.getElementById('label').dataset.state)"
                           " && document.getElementById('label').dataset.state")
    assert state == "done", tools.evaluate("document.getElementById('error').textContent")
    text = want["label"] if "label" in want else ", ".join(want["labels"]) or "(no label)"
    assert tools.evaluate("document.getElementById('label').textContent") == text
    if "labels" in want:  # multi-label: every predicted class's bar is marked at once
        marked = tools.evaluate("[...document.querySelectorAll('#bars .row.on .name')].map(n => n.textContent)")
        assert marked == want["labels"]
    shown = tools.evaluate("[...document.querySelectorAll('#bars .row')].map(r => "
                           "[r.querySelector('.name').textContent, r.querySelector('.value').textContent])")
    assert [name for name, _ in shown] == list(want["probabilities"])
    for name, value in shown:
        assert value == f"{100 * want['probabilities'][name]:.1f} %"
    assert tools.evaluate("document.getElementById('meta').textContent").startswith("model ")
    # then the Grad-CAM overlay of the predicted class, fetched from /explain
    assert tools.wait_for("document.getElementById('cam').naturalWidth") >= 224
    assert tools.evaluate("document.getElementById('cam-note').textContent").startswith("Grad-CAM")


def test_a_multilabel_run_shows_every_predicted_label_at_once(browser, multilabel_export, multilabel_run):
    from conftest import serving

    from transferkit.predict.run import load

    image = multilabel_run[2].parent / "face_grass0.png"
    want = next(load(multilabel_export).predict_files([str(image)]))
    assert len(want["labels"]) >= 2, want  # the test needs a two-label answer
    with serving(multilabel_export) as url:
        page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
        with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            check_page(DevTools(ws), url, image, want)


def test_the_page_says_plainly_when_an_image_is_unlike_the_training_images(browser, server, tmp_path):
    from conftest import texture_crops
    from PIL import Image

    Image.fromarray(texture_crops(1)[0]).save(tmp_path / "brick.png")  # a texture shown a faces model
    page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
    with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
        tools = DevTools(ws)
        tools.call("Page.enable")
        tools.call("Page.navigate", url=server + "/")
        tools.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        root = tools.call("DOM.getDocument")["root"]["nodeId"]
        node = tools.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        tools.call("DOM.setFileInputFiles", nodeId=node, files=[str(tmp_path / "brick.png")])
        assert tools.wait_for("document.getElementById('label').dataset.state === 'done'")
        flag = tools.evaluate("[getComputedStyle(document.getElementById('ood')).display, "
                              "document.getElementById('ood').textContent]")
        assert flag[0] == "block" and flag[1].startswith("Unlike the training images"), flag
