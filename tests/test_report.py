"""The HTML report: contents, the `report` command, and a real headless browser (chromium, driven
over the DevTools protocol) that must load every image while the page makes no network request."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.reports.report import confident_mistakes

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("TRANSFERKIT_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium is required (TRANSFERKIT_REQUIRE_BROWSER=1) but not installed")
    pytest.skip("chromium not installed")


def open_in_browser(page: Path, tmp: Path) -> tuple[list[int], list[str], list[str]]:
    """Load `page` in headless chromium driven over the DevTools protocol; returns the
    naturalWidth of every <img> once the load event has fired, the URL of every request the
    page made (Network.requestWillBeSent), its own file and data: URIs excepted, and every
    JavaScript error (Runtime.exceptionThrown) and error-level console or log entry."""
    from websockets.sync.client import connect

    profile = tmp / f"profile-{page.stem}"
    browser = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.is_file() and len(active.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and browser.poll() is None, "chromium did not start"
            time.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        requests: list[str] = []
        errors: list[str] = []
        with connect(url, max_size=None, open_timeout=30) as ws:
            counter = iter(range(1, 100))

            def call(method: str, until: str | None = None, **params) -> dict:
                """Send a command; read messages (recording requests) until its reply, or until
                the event `until` when given."""
                ident = next(counter)
                ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=60))
                    event, params = message.get("method"), message.get("params", {})
                    if event == "Network.requestWillBeSent":
                        requests.append(params["request"]["url"])
                    elif event == "Runtime.exceptionThrown":
                        details = params["exceptionDetails"]
                        errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
                    elif event == "Runtime.consoleAPICalled" and params.get("type") == "error":
                        errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
                    elif event == "Log.entryAdded" and params["entry"].get("level") == "error":
                        errors.append(params["entry"].get("text", ""))
                    if (until and message.get("method") == until) or (not until and message.get("id") == ident):
                        return message

            call("Network.enable")
            call("Runtime.enable")
            call("Log.enable")
            call("Page.enable")
            call("Page.navigate", until="Page.loadEventFired", url=page.as_uri())
            reply = call("Runtime.evaluate", returnByValue=True,
                         expression="JSON.stringify([...document.images].map(i => i.naturalWidth))")
        widths = json.loads(reply["result"]["result"]["value"])
    finally:
        browser.terminate()
        browser.wait(30)
    return widths, [r for r in requests if r != page.as_uri() and not r.startswith("data:")], errors


def test_train_writes_a_self_contained_report(binary_run):
    _, out = binary_run
    page = (out / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) >= 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch, nothing to follow
    for heading in ("Results on validation", "Images per class and split", "Skipped files", "Settings",
                    "Learning curves", "Per-class metrics and confusion matrix", "ROC, precision-recall",
                    "Most confident mistakes", "95% Wilson score interval", "fine-tuning"):
        assert heading in page, heading
    assert "optimistic" in page  # validation numbers are labelled as such


def test_report_command_on_a_test_set(binary_run, lfw_split, tmp_path):
    classifier, out = binary_run
    target = tmp_path / "test.html"
    result = subprocess.run([sys.executable, "-m", "transferkit.cli", "report", str(out), str(lfw_split[1]),
                             "--output", str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = target.read_text(encoding="utf-8")
    metrics = classifier.evaluate(lfw_split[1])
    low, high = metrics["accuracy_ci95"]
    assert f"{metrics['accuracy']:.1%}" in page and f"95% CI {low:.1%} – {high:.1%}" in page
    assert f"Results on test set {lfw_split[1]}" in page and "optimistic" not in page
    wrong = metrics["n"] - round(metrics["accuracy"] * metrics["n"])
    assert page.count("<figure><img alt=\"Grad-CAM") == min(wrong, 8)


def test_report_without_predictions_is_a_one_line_error(binary_run, tmp_path):
    _, out = binary_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "val_predictions.csv").unlink()
    result = subprocess.run([sys.executable, "-m", "transferkit.cli", "report", str(run)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "val_predictions.csv" in result.stderr
    assert "Traceback" not in result.stderr


def test_confident_mistakes_ranks_by_distance_past_the_threshold():
    probs1 = np.array([0.95, 0.6, 0.1, 0.3, 0.99])
    labels = np.array([0, 0, 1, 1, 1])
    predicted = (probs1 >= 0.5).astype(int)
    order = confident_mistakes(labels, np.stack([1 - probs1, probs1], 1), predicted, 8, 0.5)
    assert order.tolist() == [0, 2, 3, 1]  # 0.9, 0.8, 0.4 and 0.2 of the way to certainty


def test_report_in_a_real_browser(binary_run, tmp_path):
    from conftest import lfw_arrays, write_folders

    from transferkit.reports.report import report

    chromium()
    _, out = binary_run
    images, labels = lfw_arrays()
    # held-out faces filed as background: sure mistakes, so the page shows Grad-CAM overlays
    data = write_folders(tmp_path / "noisy", {"background": [*images[labels == 0][80:], *images[labels == 1][95:]],
                                              "face": list(images[labels == 1][80:95])})
    page = report(out, data, output=tmp_path / "report.html")
    assert page.read_text(encoding="utf-8").count("Grad-CAM of") >= 3
    widths, requests, errors = open_in_browser(page, tmp_path)
    assert len(widths) >= 4 and all(w > 0 for w in widths), widths
    assert requests == [] and errors == [], (requests, errors)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                    "--window-size=1200,2400", page.as_uri()], capture_output=True, timeout=120, cwd=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1200) and pixels.std() > 15 and (pixels < 128).mean() > 0.002  # not blank


def test_the_browser_check_catches_a_network_image_and_a_script_error(tmp_path):
    """The detectors above work: a page with a remote image is caught by both, a script that
    throws by the third."""
    chromium()
    page = tmp_path / "remote.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/x.png">'
                    '<script>throw new Error("broken section")</script></body></html>')
    widths, requests, errors = open_in_browser(page, tmp_path)
    assert widths == [0] and requests == ["http://example.invalid/x.png"]
    assert any("broken section" in e for e in errors), errors
