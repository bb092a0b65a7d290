"""`check --out DIR`'s check.html in a real headless chromium over the DevTools protocol: the page
loads from the file with no script error, no console error (a blocked resource is one) and no
request but its own file and inline images; the leak is the first finding shown; every thumbnail
is an image that decodes.

Skipped when chromium is missing, unless TRANSFERKIT_REQUIRE_BROWSER=1 (CI), then it fails
(test_browser's rule, imported with its fixture)."""

from __future__ import annotations

import json

import httpx
import test_browser
from test_browser import DevTools, websockets
from test_check import copy_of, save, tiles

from transferkit.curate.check import run_check, write_outputs

browser = test_browser.browser  # the fixture: headless chromium with a fresh profile


class Recording(DevTools):
    """DevTools that keeps the events it reads past while waiting for its answers."""

    def __init__(self, ws):
        super().__init__(ws)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        id_ = next(self.ids)
        self.ws.send(json.dumps({"id": id_, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == id_:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)


@test_browser.needs_browser
def test_check_page_loads_offline_shows_the_leak_first_and_its_thumbnails_decode(browser, tmp_path):
    brick, grass = tiles("brick"), tiles("grass")
    save(tmp_path / "train", "brick", brick[:10])
    save(tmp_path / "train", "grass", grass[:10])
    save(tmp_path / "test", "brick", brick[10:13])
    copy_of(brick[1], "jpeg60").save(tmp_path / "test" / "brick" / "copy.png")  # the leak
    save(tmp_path / "train", "grass", [grass[4]], prefix="again")  # an exact duplicate inside train
    report = run_check(tmp_path / "train", test_data=tmp_path / "test", embeddings=False)
    assert [f.kind for f in report.findings] == ["leak", "exact_duplicate", "near_duplicate"]
    _, page_path = write_outputs(report, tmp_path / "out")
    url = page_path.resolve().as_uri()
    target = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
    with websockets.connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
        tools = Recording(ws)
        for domain in ("Page", "Network", "Runtime", "Log"):
            tools.call(f"{domain}.enable")
        tools.call("Page.navigate", url=url)
        tools.wait_for("document.readyState === 'complete'")
        assert tools.evaluate("document.title") == "transferkit check"
        images = tools.wait_for("[...document.images].every(i => i.complete) && "
                                "[...document.images].map(i => [i.naturalWidth, i.naturalHeight, "
                                "i.closest('.f').className])")
        first = tools.evaluate("[document.querySelector('h2[id]:not([id=\"\"])').id, "
                               "document.querySelector('.f').className, "
                               "document.querySelector('.f').getBoundingClientRect().top <= "
                               "Math.min(...[...document.querySelectorAll('.f')].map(f => "
                               "f.getBoundingClientRect().top))]")
        tools.call("Runtime.evaluate", expression="1")  # collect what arrived meanwhile
    assert first == ["leak", "f leak", True], first
    assert len(images) == 2 + 2 + 2, images  # the leak's pair, then the duplicate's and the near-duplicate's
    assert all(w > 0 and h > 0 for w, h, _ in images), images  # every thumbnail decoded
    assert [c for _, _, c in images[:2]] == ["f leak", "f leak"]
    requests = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and requests[0] == url
    assert all(r == url or r.startswith("data:") for r in requests), requests  # nothing from the network
    errors = [e for e in tools.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
    assert not errors, errors
