"""The labelling page in a real headless chromium over the DevTools protocol: label three images
with the keyboard, undo one (the CSV holds exactly the other two), retrain (the next image
changes), find an injected wrong label in the review and fix it in place, then label two images
selected in the grid with one key.

Skipped when chromium is missing, unless TRANSFERKIT_REQUIRE_BROWSER=1 (CI), then it fails
(test_browser's rule, imported with its fixture)."""

from __future__ import annotations

import time

import httpx
import test_browser
from test_browser import DevTools, websockets
from test_label import make_pool, row, rows, start_label

browser = test_browser.browser  # the fixture: headless chromium with a fresh profile

KEYS = {"1": ("Digit1", 49), "2": ("Digit2", 50), "u": ("KeyU", 85)}


def press(tools: DevTools, key: str) -> None:
    code, virtual = KEYS[key]
    tools.call("Input.dispatchKeyEvent", type="keyDown", key=key, code=code, text=key,
               windowsVirtualKeyCode=virtual)
    tools.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=virtual)


def wait_csv(csv_path, want: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while rows(csv_path) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows(csv_path) == want


def test_label_undo_retrain_and_review_in_the_page(browser, tmp_path):
    root = tmp_path / "pool"
    root.mkdir()
    truth = make_pool(root, faces=40, backgrounds=40)
    faces = [p for p in truth if truth[p] == "face"]
    backgrounds = [p for p in truth if truth[p] == "background"]
    wrong = faces[7]  # the injected label error
    csv_path = tmp_path / "labels.csv"
    initial = ["path,label"] + [row(csv_path, root / p, truth[p]) for p in faces[:6] + backgrounds[:6]]
    initial.append(row(csv_path, root / wrong, "background"))
    csv_path.write_text("\n".join(initial) + "\n")
    url, process = start_label(root, csv_path, tmp_path / "store", "--classes", "background,face",
                               "--retrain-every", "5")
    try:
        page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
        with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            tools = DevTools(ws)
            tools.call("Page.enable")
            tools.call("Page.navigate", url=url + "/")
            tools.wait_for("document.getElementById('status').dataset.status === 'ready'"
                           " && document.getElementById('stats').dataset.retrains === '1'")
            assert tools.evaluate("document.getElementById('bad-summary').textContent").startswith("6 file(s) skipped")
            current = "document.getElementById('current').dataset.path"
            done = []
            for _ in range(3):  # label three images with the keyboard (1: background, 2: face)
                path = tools.wait_for(current)
                assert tools.wait_for("document.getElementById('current').naturalWidth") > 0
                press(tools, "1" if truth[path] == "background" else "2")
                tools.wait_for(f"{current} !== {path!r} && {current}")
                done.append(path)
            wait_csv(csv_path, initial + [row(csv_path, root / p, truth[p]) for p in done])
            press(tools, "u")  # undo the third: its line goes, the page shows it again
            assert tools.wait_for(f"{current} === {done[2]!r}")
            wait_csv(csv_path, initial + [row(csv_path, root / p, truth[p]) for p in done[:2]])
            press(tools, "1" if truth[done[2]] == "background" else "2")
            following = tools.wait_for(f"{current} !== {done[2]!r} && {current}")
            wait_csv(csv_path, initial + [row(csv_path, root / p, truth[p]) for p in done])
            tools.evaluate("document.getElementById('retrain').click()")
            tools.wait_for("document.getElementById('stats').dataset.retrains === '2'")
            assert tools.wait_for(f"{current} !== {following!r} && {current}")  # re-ranked: the next image changed
            assert tools.evaluate("document.querySelectorAll('#preds .row').length") == 2
            assert "cross-validated accuracy" in tools.evaluate("document.getElementById('stats').textContent")
            tools.evaluate("document.querySelector('[data-view=review]').click()")
            issue = f"[...document.querySelectorAll('#review .issue')].find(r => r.dataset.path === {wrong!r})"
            text = tools.wait_for(f"{issue} && {issue}.textContent")
            assert "labelled background, the model says face" in text
            tools.evaluate(f"[...{issue}.querySelectorAll('button')].find(b => b.textContent === '→ face').click()")
            tools.wait_for(f"!{issue}")
            want = [r.replace(row(csv_path, root / wrong, "background"), row(csv_path, root / wrong, "face"))
                    for r in initial] + [row(csv_path, root / p, truth[p]) for p in done]
            wait_csv(csv_path, want)  # fixed in place: the same line, the new label
            tools.evaluate("document.querySelector('[data-view=grid]').click()")  # the grid: select two, one key
            tiles = tools.wait_for("[...document.querySelectorAll('#grid .tile')].map(t => t.dataset.path)")
            assert len(tiles) == 5
            tools.evaluate("document.querySelectorAll('#grid .tile')[0].click()")
            tools.evaluate("document.querySelectorAll('#grid .tile')[1].click()")
            assert tools.evaluate("document.querySelectorAll('#grid .tile.sel').length") == 2
            press(tools, "2")
            wait_csv(csv_path, want + [row(csv_path, root / p, "face") for p in tiles[:2]])
    finally:
        process.terminate()
        process.wait(30)
