"""The labelling pool ordered by a run's score of each image (issues 31 and 32), on real images:
`label --run RUN --strategy ood` puts the images most unlike a classifier's training images first
(texture photos in a pool of LFW crops shown a faces model), and `label --run ANOMALY_RUN` puts the
most anomalous first (brick crops with a pasted defect among good ones), labelling good/defective
as `evaluate` reads it back. A run without the score is one line. The page: in chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import lfw_arrays, texture_crops
from fastapi.testclient import TestClient
from PIL import Image
from test_browser import DevTools, websockets
from test_label import row, rows, start_label, wait_ready
from test_label_browser import press
from test_serve_anomaly import anomaly_run  # noqa: F401 - the fixture: a real anomaly run and new crops
from typer.testing import CliRunner

import test_browser
from transferkit.apps.label import SHOWN, Featurizer, LabelFile, Session, create_app
from transferkit.cli import app
from transferkit.curate.active import STRATEGIES, UNLABELLED, suggest
from transferkit.utils.errors import DataError

browser = test_browser.browser  # the fixture: headless chromium with a fresh profile


def scored_order(records: dict[str, float]) -> list[str]:
    """Paths by descending score (ties by path: the pool's listing order)."""
    return sorted(records, key=lambda p: (-records[p], p))


def test_suggest_orders_the_unlabelled_images_by_their_scores():
    images, _ = lfw_arrays()
    features = images[:12].reshape(12, -1).astype(np.float64)  # real pixels as features
    scores = np.array([0.3, 2.0, 0.1, 1.5, 1.5, 0.0, 3.0, 0.2, 0.9, 0.4, 1.1, 0.5])
    labels = np.full(12, UNLABELLED)
    labels[[6, 3]] = [0, 1]  # labelled images leave the order
    for strategy in ("ood", "anomaly"):
        assert suggest(features, labels, 10, strategy, scores=scores).tolist() == [1, 4, 10, 8, 11, 9, 0, 7, 2, 5]
        assert suggest(features, labels, 3, strategy, scores=scores).tolist() == [1, 4, 10]
    with pytest.raises(DataError, match="orders the images by their scores; none were given"):
        suggest(features, labels, 3, "ood")
    with pytest.raises(DataError, match=r"scores must have shape \(12,\)"):
        suggest(features, labels, 3, "anomaly", scores=scores[:5])
    with pytest.raises(DataError, match="NaN or infinite"):
        suggest(features, labels, 3, "ood", scores=np.r_[scores[:11], np.nan])


def ood_pool(root: Path) -> dict[str, str]:
    """12 LFW faces, 12 LFW backgrounds and 4 texture photo crops (unlike a faces model's images)."""
    images, labels = lfw_arrays()
    truth = {}
    for kind, pictures in (("face", images[labels == 1][:12]), ("background", images[labels == 0][:12]),
                           ("texture", texture_crops(4, seed=3))):
        (root / kind).mkdir(parents=True)
        for i, picture in enumerate(pictures):
            Image.fromarray(picture).save(root / kind / f"{i:02d}.png")
            truth[f"{kind}/{i:02d}.png"] = kind
    return truth


def test_the_ood_order_is_the_runs_ood_score_most_unusual_first(binary_run, tmp_path):
    classifier, run = binary_run
    root = tmp_path / "pool"
    truth = ood_pool(root)
    session = Session(root, LabelFile(tmp_path / "labels.csv"), Featurizer.build(run=run, cache_dir=""),
                      strategy="ood")
    with TestClient(create_app(session), base_url="http://127.0.0.1") as client:
        state = wait_ready(client)
        want = {Path(r["path"]).relative_to(root).as_posix(): r["ood_score"]
                for r in classifier.predict_files([str(root / p) for p in truth])}  # what `predict` prints
        assert state["strategy"] == "ood" and state["strategies"] == ["uncertainty", "diversity", "random", "ood"]
        assert state["score"] == {"name": "ood", "title": "OOD score", "threshold": classifier.open_world.threshold,
                                  "above": "unlike the run's training images"}
        queue = state["queue"]
        assert [session.paths[i] for i in session.queue] == scored_order(want)  # the whole pool, in the score's order
        assert [i["path"] for i in queue] == scored_order(want)[:SHOWN]  # what the page gets of it
        for item in queue:
            assert abs(item["score"] - want[item["path"]]) <= 1e-4 * max(1.0, want[item["path"]])
        # the unusual images first: a texture leads, and every texture is above the LFW crops' median
        assert truth[queue[0]["path"]] == "texture"
        lfw_median = np.median([v for p, v in want.items() if truth[p] != "texture"])
        assert min(v for p, v in want.items() if truth[p] == "texture") > lfw_median
        # labelling takes an image out of the order; the rest keeps it
        client.post("/api/label", json={"path": queue[0]["path"], "label": "face"})
        assert [i["path"] for i in client.get("/api/state").json()["queue"]] == scored_order(want)[1:SHOWN + 1]
        # the page's strategy switch refuses the order of another kind of run
        answer = client.post("/api/strategy", json={"strategy": "anomaly"})
        assert answer.status_code == 400 and "a classifier run, not an anomaly run" in answer.json()["error"]
        assert "strategy 'ood'" in answer.json()["error"]
        uncertain = client.post("/api/strategy", json={"strategy": "uncertainty"}).json()["state"]
        assert len(uncertain["queue"]) == 10  # a batch of retrain_every, no longer the whole pool


def test_an_anomaly_run_orders_the_pool_most_anomalous_first_and_labels_good_or_defective(anomaly_run, tmp_path):
    run, detector, crops = anomaly_run
    root = tmp_path / "pool"
    root.mkdir()
    for path in crops:
        shutil.copy(path, root / path.name)
    (root / "notes.txt").write_text("not an image")
    csv_path = tmp_path / "labels.csv"
    session = Session(root, LabelFile(csv_path), Featurizer.build(run=run, cache_dir=""), retrain_every=3)
    normal = detector.meta["normal_class"]
    with TestClient(create_app(session), base_url="http://127.0.0.1") as client:
        state = wait_ready(client)
        want = {Path(r["path"]).name: r for r in detector.predict_files([str(root / p.name) for p in crops])}
        assert state["strategy"] == "anomaly"  # an anomaly run's default
        assert state["strategies"] == ["uncertainty", "diversity", "random", "anomaly"]
        assert state["classes"] == [normal, "anomaly"] and state["pool"] == 8 and state["bad_files"] == 1
        assert state["score"] == {"name": "anomaly", "title": "anomaly score", "threshold": detector.threshold,
                                  "above": "anomaly"}
        queue = state["queue"]
        assert [i["path"] for i in queue] == scored_order({p: r["anomaly_score"] for p, r in want.items()})
        for item in queue:
            score = want[item["path"]]["anomaly_score"]
            assert abs(item["score"] - score) <= 1e-5 * max(1.0, score)
        assert [i["path"][:3] for i in queue] == ["bad"] * 4 + ["goo"] * 4  # the defects first
        assert all(want[i["path"]]["label"] == "anomaly" for i in queue[:4])
        for item in queue:  # label each as the run would; the order stays the score's
            assert client.get("/api/state").json()["queue"][0]["path"] == item["path"]
            verdict = "anomaly" if item["path"].startswith("bad") else normal
            assert client.post("/api/label", json={"path": item["path"], "label": verdict}).status_code == 200
        state = wait_ready(client, lambda s: not s["retraining"])
        assert state["labelled"] == 8 and state["queue"] == []
        answer = client.post("/api/strategy", json={"strategy": "ood"})
        assert answer.status_code == 400 and "an anomaly run orders the pool by its anomaly score" in answer.json()["error"]
    assert rows(csv_path)[1:] == [row(csv_path, root / i["path"], "anomaly" if i["path"].startswith("bad") else normal)
                                  for i in queue]
    # what labelling wrote is what `evaluate` reads: the run's normal class, every other one anomalous
    result = CliRunner().invoke(app, ["evaluate", str(run), str(csv_path), "--output", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["n_normal"], metrics["n_anomalous"], metrics["auroc"]) == (4, 4, 1.0)


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_an_order_the_run_cannot_give_is_one_line(binary_run, anomaly_run, tmp_path):
    root = tmp_path / "pool"
    ood_pool(root)
    old = tmp_path / "old-run"  # a run from before OOD scores: no "ood" entry in model.json
    shutil.copytree(binary_run[1], old)
    meta = json.loads((old / "model.json").read_text())
    del meta["ood"]
    (old / "model.json").write_text(json.dumps(meta))
    runner = CliRunner()

    def label(*options: str):
        return runner.invoke(app, ["label", str(root), "--labels", str(tmp_path / "labels.csv"), "--cache-dir", "",
                                   *options])

    one_line_error(label("--run", str(old), "--strategy", "ood"), str(old), "no OOD score", "no 'ood' entry")
    one_line_error(label("--run", str(anomaly_run[0]), "--strategy", "ood"),
                   "an anomaly run orders the pool by its anomaly score")
    one_line_error(label("--run", str(binary_run[1]), "--strategy", "anomaly"), "a classifier run, not an anomaly run")
    one_line_error(label("--strategy", "ood", "--image-size", "32"), "give --run RUN")
    one_line_error(label("--strategy", "best", "--image-size", "32"), "unknown strategy 'best'", ", ".join(STRATEGIES))
    assert not (tmp_path / "labels.csv").exists()


def test_the_page_shows_the_pool_in_anomaly_score_order(browser, anomaly_run, tmp_path):  # noqa: F811
    run, detector, crops = anomaly_run
    root = tmp_path / "pool"
    root.mkdir()
    for path in crops:
        shutil.copy(path, root / path.name)
    want = {Path(r["path"]).name: r["anomaly_score"] for r in detector.predict_files([str(root / p.name) for p in crops])}
    order = scored_order(want)
    csv_path = tmp_path / "labels.csv"
    url, process = start_label(root, csv_path, tmp_path / "store", "--run", str(run))
    try:
        page = next(t for t in httpx.get(browser + "/json/list").json() if t["type"] == "page")
        with websockets.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            tools = DevTools(ws)
            tools.call("Page.enable")
            tools.call("Page.navigate", url=url + "/")
            tools.wait_for("document.getElementById('status').dataset.status === 'ready'")
            current = "document.getElementById('current').dataset.path"
            assert tools.wait_for(current) == order[0]
            assert tools.evaluate("document.getElementById('strategy').value") == "anomaly"
            text = tools.evaluate("document.getElementById('current-score').textContent")
            assert text == f"anomaly score {want[order[0]]:.3f} > {detector.threshold:.3f}: anomaly"
            press(tools, "2")  # the classes: 1 the normal class, 2 anomaly
            assert tools.wait_for(f"{current} !== {order[0]!r} && {current}") == order[1]
            tools.evaluate("document.querySelector('[data-view=grid]').click()")
            tiles = tools.wait_for("[...document.querySelectorAll('#grid .tile')].length === 7 && "
                                   "[...document.querySelectorAll('#grid .tile')].map(t => [t.dataset.path, "
                                   "Number(t.dataset.score), t.querySelector('.score').textContent])")
            assert [path for path, _, _ in tiles] == order[1:]  # the rest of the pool, most anomalous first
            for path, score, shown in tiles:
                assert abs(score - want[path]) <= 1e-5 * max(1.0, want[path])
                assert shown.startswith(f"anomaly score {want[path]:.3f}")
                assert shown.endswith(": anomaly") == (want[path] > detector.threshold)
        assert rows(csv_path)[1:] == [row(csv_path, root / order[0], "anomaly")]
    finally:
        process.terminate()
        process.wait(30)
