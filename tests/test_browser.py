"""The web page in a real headless chromium, driven over the DevTools protocol (a websocket): pick
an image through the page's file input and see the predicted label and the probability bars.

Skipped when chromium or the websockets package is missing, unless TRANSFERKIT_REQUIRE_BROWSER=1
(CI): then the module fails on import, before anything can be skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest


def browser_missing(required: bool, chromium: str | None, import_error: ImportError | None) -> str | None:
    """Why the browser tests cannot run here (None: they can). `required` (CI): a missing browser
    or library is an error, raised here, before any test can be skipped."""
    missing = [what for what, gone in (("chromium", chromium is None),
                                       ("the websockets package", import_error is not None)) if gone]
    if not missing:
        return None
    if required:
        raise RuntimeError(f"{' and '.join(missing)} not found but TRANSFERKIT_REQUIRE_BROWSER=1"
                           + (f" ({import_error})" if import_error else ""))
    return f"{' and '.join(missing)} not installed"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import websockets.sync.client as websockets
    _import_error = None
except ImportError as exc:
    websockets, _import_error = None, exc
MISSING = browser_missing(os.environ.get("TRANSFERKIT_REQUIRE_BROWSER") == "1", CHROMIUM, _import_error)
needs_browser = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))  # before any fixture is set up


def test_the_guard_fails_when_required_and_skips_only_when_not():
    with pytest.raises(RuntimeError, match=r"^the websockets package not found but TRANSFERKIT_REQUIRE_BROWSER=1"):
        browser_missing(True, "/usr/bin/chromium", ImportError("No module named 'websockets'"))
    with pytest.raises(RuntimeError, match=r"^chromium not found but TRANSFERKIT_REQUIRE_BROWSER=1$"):
        browser_missing(True, None, None)
    assert browser_missing(False, None, ImportError("x")) == "chromium and the websockets package not installed"
    assert browser_missing(True, "/usr/bin/chromium", None) is None
    assert browser_missing(False, "/usr/bin/chromium", None) is None


@pytest.mark.parametrize("required", ["1", ""])
def test_a_missing_library_fails_collection_in_ci_and_is_a_skip_elsewhere(tmp_path, required):
    """This very module, collected with the websockets package made unimportable: with
    TRANSFERKIT_REQUIRE_BROWSER=1 pytest reports an error (exit 2), without it the browser tests skip."""
    import sys

    shadow = tmp_path / "shadow" / "websockets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('websockets hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), *sys.path]),
           "TRANSFERKIT_REQUIRE_BROWSER": required}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             "-k", "upload_through_the_page"], env=env, capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    if required:
        assert result.returncode == 2, result.stdout
        assert "the websockets package not found but TRANSFERKIT_REQUIRE_BROWSER=1" in result.stdout
        assert "skipped" not in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert re.search(r"1 skipped", result.stdout), result.stdout


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
    if MISSING:
        pytest.skip(MISSING)
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


@needs_browser
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


@needs_browser
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
