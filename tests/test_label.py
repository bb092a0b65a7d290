"""`transferkit label`: the labels CSV (what `train` reads, atomic, locked), the pool listing
(bad files and links out of the pool skipped), the app in-process on real features (ranking,
retraining, review, path safety), and a real server for concurrent requests and SIGKILL.
The page itself in chromium: test_label_browser.py."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import SIZE, free_port, lfw_arrays
from fastapi.testclient import TestClient
from PIL import Image

from transferkit.apps.label import Featurizer, LabelFile, Session, check_class_name, create_app, list_pool
from transferkit.curate.active import UNLABELLED, k_center_greedy
from transferkit.data.listing import from_csv
from transferkit.utils.errors import DataError

SRC = Path(__file__).parents[1] / "src"


def make_pool(root: Path, faces: int = 16, backgrounds: int = 16) -> dict[str, str]:
    """Real LFW crops in nested folders, plus every kind of file `train` skips and two links out of
    the pool; returns {path relative to the pool: true class} of the usable images."""
    images, labels = lfw_arrays()
    truth = {}
    for i in range(faces):
        truth[f"people/p{i % 2}/face-{i:02d}.png"] = "face"
    for i in range(backgrounds):
        truth[f"scenes/bg-{i:02d}.png"] = "background"
    faces_, backgrounds_ = iter(images[labels == 1]), iter(images[labels == 0])
    for path, cls in truth.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(next(faces_ if cls == "face" else backgrounds_)).save(root / path)
    (root / "notes.txt").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "cut.png").write_bytes((root / "scenes/bg-00.png").read_bytes()[:60])
    (root / "scenes/copy-of-bg-00.png").write_bytes((root / "scenes/bg-00.png").read_bytes())
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    Image.fromarray(images[150]).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return truth


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("label") / "pool"
    root.mkdir()
    return root, make_pool(root)


@pytest.fixture(scope="module")
def featurizer(tmp_path_factory) -> Featurizer:
    return Featurizer.build(image_size=SIZE, cache_dir=str(tmp_path_factory.mktemp("store")))


def rows(csv_path: Path) -> list[str]:
    return csv_path.read_text().splitlines()


def row(csv_path: Path, file: Path, label: str) -> str:
    return f"{os.path.relpath(file, csv_path.parent)},{label}"


# --- the labels CSV ---

def test_labels_csv_is_exactly_what_train_reads_and_resumes(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    csv_path = folder / "labels.csv"
    odd = 'has, a comma and "quotes"'
    labels = LabelFile(csv_path)
    assert labels.set(tmp_path / "pool/a.png", "cat") is None
    labels.set(tmp_path / "pool/sub/b.png", "dog")
    labels.set(tmp_path / "pool/c.png", odd)
    assert labels.set(tmp_path / "pool/sub/b.png", None) == "dog"  # undo: the line goes
    assert labels.set(tmp_path / "pool/a.png", "dog") == "cat"  # a fix: the line changes in place
    assert rows(csv_path) == ["path,label", "../pool/a.png,dog", '../pool/c.png,"has, a comma and ""quotes"""']
    read = from_csv(csv_path)
    assert read.paths == [str(tmp_path / "pool/a.png"), str(tmp_path / "pool/c.png")]
    assert [read.classes[i] for i in read.labels] == ["dog", odd]
    with pytest.raises(DataError, match="in use by another `transferkit label`"):
        LabelFile(csv_path)
    labels.close()
    again = LabelFile(csv_path)  # a restart resumes
    assert again.rows == labels.rows
    again.set(tmp_path / "pool/d.png", "cat")
    assert rows(csv_path)[1:] == ["../pool/a.png,dog", '../pool/c.png,"has, a comma and ""quotes"""',
                                  "../pool/d.png,cat"]
    again.close()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("text, message", [
    ("file,class\na.png,cat\n", r"expected exactly the columns path,label"),
    ("path,label,note\na.png,cat,x\n", r"expected exactly the columns path,label"),
    ("path,label\na.png,cat\nb.png,\n", r"labels.csv:3: empty path or label"),
    ("path,label\na.png,cat\n./a.png,dog\n", r"labels.csv:3: ./a.png is labelled 'dog' here and 'cat' earlier"),
    (b"path,label\n\xff\xfe,cat\n", r"labels.csv: cannot read CSV"),
    ("path,label\na.png," + "x" * 101 + "\n", r"labels.csv:2: class name must be 1-100 characters"),
])
def test_a_bad_labels_csv_is_refused_with_the_line(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    with pytest.raises(DataError, match=message):
        LabelFile(path)
    LabelFile(path.with_name("other.csv")).close()  # the failed one released its lock
    assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())  # untouched


def test_a_header_only_csv_is_an_empty_start(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\n")
    labels = LabelFile(tmp_path / "labels.csv")
    assert labels.rows == {}
    labels.close()


def test_threads_writing_at_once_lose_no_line(tmp_path):
    labels = LabelFile(tmp_path / "labels.csv")
    files = [tmp_path / f"img-{i:03d}.png" for i in range(200)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: labels.set(f, "ab"[int(f.stem[-3:]) % 2]), files))
    read = from_csv(tmp_path / "labels.csv")
    assert sorted(read.paths) == sorted(map(str, files))
    assert all(read.classes[y] == "ab"[int(Path(p).stem[-3:]) % 2] for p, y in zip(read.paths, read.labels))
    labels.close()


@pytest.mark.parametrize("name", ["", " cat", "cat ", "a\nb", "x" * 101, None])
def test_class_names_train_could_not_read_back_are_refused(name):
    with pytest.raises(DataError, match="class name must be"):
        check_class_name(name)


# --- the pool ---

def test_pool_listing_skips_links_out_of_the_pool_and_the_csv(pool):
    root, truth = pool
    (root / "labels.csv").write_text("path,label\n")
    try:
        files, skipped = list_pool(root, {str(root / "labels.csv")})
    finally:
        (root / "labels.csv").unlink()
    names = {f.relative_to(root).as_posix() for f in files}
    assert set(truth) <= names
    assert names - set(truth) == {"notes.txt", "empty.png", "cut.png", "scenes/copy-of-bg-00.png"}  # decoding decides
    reasons = {Path(p).relative_to(root).as_posix(): r for p, r in skipped}
    assert set(reasons) == {"link.png", "linked/secret.png"}
    assert all(r.startswith("symlink out of the pool") for r in reasons.values())


# --- the app, in-process, on real features ---

def wait_ready(client, condition=lambda s: True, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get("/api/state").json()
        assert state["status"] != "failed", state["error"]
        if state["status"] == "ready" and condition(state):
            return state
        time.sleep(0.05)
    raise TimeoutError(condition)


@pytest.fixture()
def app_client(pool, featurizer, tmp_path):
    """The app over the pool, labels in a fresh CSV; yields (client, session, csv path)."""
    csv_path = tmp_path / "labels.csv"
    session = Session(pool[0], LabelFile(csv_path), featurizer, ["background", "face"], retrain_every=4)
    with TestClient(create_app(session, ["127.0.0.1"]), base_url="http://127.0.0.1") as client:
        yield client, session, csv_path


@pytest.mark.slow
def test_bad_files_are_listed_and_only_pool_images_are_served(app_client, pool):
    client, session, _ = app_client
    root, truth = pool
    state = wait_ready(client)
    assert state["pool"] == len(truth)
    reasons = {Path(f["path"]).relative_to(root).as_posix(): f["reason"] for f in state["skipped_files"]}
    assert set(reasons) == {"notes.txt", "empty.png", "cut.png", "scenes/copy-of-bg-00.png", "link.png",
                            "linked/secret.png"}
    assert state["bad_files"] == 6
    assert reasons["empty.png"] == "empty file" and reasons["scenes/copy-of-bg-00.png"].startswith("same image as")
    ok = client.get("/image", params={"path": "scenes/bg-01.png"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(ok.content)).size == (25, 25)
    outside = str(root.parent / f"{root.name}-outside" / "secret.png")
    for path in ["../pool-outside/secret.png", "scenes/../../pool-outside/secret.png", outside,
                 str(root / "scenes/bg-01.png"), "/etc/passwd", "link.png", "linked/secret.png", "notes.txt",
                 "scenes\\..\\..\\x", ""]:
        answer = client.get("/image", params={"path": path})
        assert answer.status_code == 404 and "not an image of the pool" in answer.json()["error"], path
    for raw in ["/image?path=..%2Fpool-outside%2Fsecret.png", "/image?path=%2E%2E/pool-outside/secret.png",
                "/image?path=%2Fetc%2Fpasswd", "/image/../../etc/passwd"]:
        assert client.get(raw).status_code == 404, raw
    # an image replaced by a link out of the pool after the listing is refused
    victim = root / "scenes/bg-02.png"
    kept = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(outside)
    try:
        assert client.get("/image", params={"path": "scenes/bg-02.png"}).status_code == 403
    finally:
        victim.unlink()
        victim.write_bytes(kept)
    assert client.post("/api/label", json={"path": "../pool-outside/secret.png", "label": "face"}).status_code == 404


@pytest.mark.slow
def test_requests_a_web_page_could_forge_are_refused(app_client):
    client, _, csv_path = app_client
    state = wait_ready(client)
    path = state["queue"][0]["path"]
    form = client.post("/api/label", content=f"path={path}&label=face",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    plain = client.post("/api/label", content=f'{{"path": "{path}", "label": "face"}}',
                        headers={"content-type": "text/plain"})
    assert form.status_code == plain.status_code == 415
    huge = client.post("/api/label", content=b'{"path": "' + b"x" * 70000 + b'"}',
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert client.get("/api/state", headers={"host": "attacker.example:8000"}).status_code == 400  # DNS rebinding
    assert not csv_path.exists()
    page = client.get("/")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text


@pytest.mark.slow
def test_cold_start_is_diverse_then_labels_retrain_rerank_and_review(app_client, pool):
    client, session, csv_path = app_client
    root, truth = pool
    state = wait_ready(client)
    assert state["retrains"] == 0 and state["accuracy"] is None
    assert all(item["predictions"] == [] for item in state["queue"])
    cold = k_center_greedy(session.features, np.array([], dtype=np.int64), np.arange(len(session.paths)), 4)
    assert [item["path"] for item in state["queue"]] == [session.paths[i] for i in cold]  # a batch of 4
    labelled = []
    for _ in range(4):  # retrain_every=4: the fourth label starts a retrain
        path = client.get("/api/state").json()["queue"][0]["path"]
        answer = client.post("/api/label", json={"path": path, "label": truth[path]})
        assert answer.status_code == 200 and answer.json()["previous"] is None
        labelled.append(path)
    assert rows(csv_path)[1:] == [row(csv_path, root / p, truth[p]) for p in labelled]  # written before the answer
    assert {truth[p] for p in labelled} == {"face", "background"}  # diversity found both classes
    state = wait_ready(client, lambda s: s["retrains"] == 1 and not s["retraining"])
    assert state["queue"][0]["predictions"][0]["label"] in ("face", "background")
    # label everything else with the truth except one wrong label; the review lists it first
    wrong = next(p for p in truth if truth[p] == "face" and p not in labelled)
    for path in truth:
        if path not in labelled:
            client.post("/api/label", json={"path": path, "label": "background" if path == wrong else truth[path]})
    state = wait_ready(client, lambda s: not s["retraining"])
    assert state["labelled"] == len(truth) and state["queue"] == []
    assert state["accuracy"] is not None and state["folds"] == 5
    issues = client.get("/api/review").json()["issues"]
    assert issues[0] == {**issues[0], "path": wrong, "given": "background", "predicted": "face"}
    fixed = client.post("/api/label", json={"path": wrong, "label": "face"})
    assert fixed.json()["previous"] == "background"
    assert row(csv_path, root / wrong, "face") in rows(csv_path) and len(rows(csv_path)) == len(truth) + 1
    assert wrong not in [i["path"] for i in client.get("/api/review").json()["issues"]]
    assert from_csv(csv_path).counts() == {"background": 16, "face": 16}
    # bad input: one line each
    for body, status, words in [({"path": wrong, "label": "cat"}, 400, "unknown class 'cat'"),
                                ({"path": wrong, "label": 3}, 400, "label must be a class name or null"),
                                ({"path": "nope.png", "label": "face"}, 404, "not an image of the pool")]:
        answer = client.post("/api/label", json=body)
        assert answer.status_code == status and words in answer.json()["error"]
    assert client.post("/api/class", json={"name": "face"}).json()["error"] == "class 'face' exists already"
    assert client.post("/api/strategy", json={"strategy": "best"}).status_code == 400


@pytest.mark.slow
def test_skip_strategy_new_class_and_restart_resume(pool, featurizer, tmp_path):
    root, truth = pool
    csv_path = tmp_path / "labels.csv"
    session = Session(root, LabelFile(csv_path), featurizer, ["background"], strategy="random")
    with TestClient(create_app(session), base_url="http://127.0.0.1") as client:
        state = wait_ready(client)
        first = state["queue"][0]["path"]
        client.post("/api/skip", json={"path": first, "skip": True})
        assert first not in [i["path"] for i in client.get("/api/state").json()["queue"]]
        assert client.post("/api/class", json={"name": "face"}).json()["state"]["classes"] == ["background", "face"]
        faces = [p for p in truth if truth[p] == "face"][:3]
        for path in faces + ["scenes/bg-05.png", "scenes/bg-06.png"]:
            client.post("/api/label", json={"path": path, "label": truth[path]})
        random_queue = [i["path"] for i in client.get("/api/state").json()["queue"]]
        diverse = client.post("/api/strategy", json={"strategy": "diversity"}).json()["state"]["queue"]
        assert [i["path"] for i in diverse] != random_queue
    # a restart resumes: the labels come back from the CSV, the head is retrained at once
    session = Session(root, LabelFile(csv_path), featurizer)
    with TestClient(create_app(session), base_url="http://127.0.0.1") as client:
        state = wait_ready(client, lambda s: s["retrains"] == 1)
        assert state["labelled"] == 5 and state["counts"] == {"background": 2, "face": 3}
        assert state["classes"] == ["face", "background"]  # in the CSV's order
        assert set(faces) <= {p for p, j in zip(session.paths, session.labels) if j == 0}
        assert (session.labels == UNLABELLED).sum() == len(truth) - 5


def test_a_run_gives_the_features_and_the_first_predictions(pool, binary_run, tmp_path):
    root, truth = pool
    classifier, run = binary_run
    session = Session(root, LabelFile(tmp_path / "labels.csv"), Featurizer.build(run=run, cache_dir=""),
                      retrain_every=2)
    with TestClient(create_app(session), base_url="http://127.0.0.1") as client:
        state = wait_ready(client)
    assert state["classes"] == classifier.classes and state["retrains"] == 0
    want = {Path(r["path"]).relative_to(root).as_posix(): r["probabilities"]
            for r in classifier.predict_files([str(root / p) for p in truth])}
    for item in state["queue"]:
        shown = {p["label"]: p["p"] for p in item["predictions"]}
        assert shown == pytest.approx(want[item["path"]], abs=1e-5)
    margins = {p: abs(want[p]["face"] - want[p]["background"]) for p in truth}
    assert {i["path"] for i in state["queue"]} <= set(sorted(margins, key=margins.get)[:6])  # 3k most uncertain


def test_label_binds_loopback_by_default():
    import typer

    from transferkit.cli import app

    command = typer.main.get_command(app).commands["label"]
    assert next(p.default for p in command.params if p.name == "host") == "127.0.0.1"


# --- a real server: concurrent requests, SIGKILL ---

def start_label(pool_root: Path, csv_path: Path, store: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """`transferkit label` in its own process; returns its URL once its features are ready."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "label", str(pool_root), "--labels",
                                str(csv_path), "--image-size", str(SIZE), "--cache-dir", str(store),
                                "--port", str(port), *extra],
                               env={**os.environ, "PYTHONPATH": str(SRC)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            state = httpx.get(url + "/api/state", timeout=5).json()
            assert state["status"] != "failed", state["error"]
            if state["status"] == "ready":
                return url, process
        except httpx.TransportError:
            assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.1)
    process.kill()
    raise TimeoutError(url)


@pytest.mark.slow
def test_concurrent_requests_to_a_real_server_lose_no_line(pool, tmp_path):
    root, truth = pool
    csv_path = tmp_path / "labels.csv"
    url, process = start_label(root, csv_path, tmp_path / "store", "--classes", "background,face")
    try:
        with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(16) as threads:
            answers = list(threads.map(lambda p: client.post("/api/label", json={"path": p, "label": truth[p]}),
                                       truth))
            assert [a.status_code for a in answers] == [200] * len(truth)
            assert client.get("/api/state").json()["labelled"] == len(truth)
        read = from_csv(csv_path)
        assert sorted(read.paths) == sorted(str(root / p) for p in truth)
        assert all(read.classes[y] == truth[Path(p).relative_to(root).as_posix()]
                   for p, y in zip(read.paths, read.labels))
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow
def test_a_killed_server_loses_at_most_the_label_being_written(pool, tmp_path):
    root, truth = pool
    csv_path = tmp_path / "labels.csv"
    # 20,000 rows for files elsewhere: every write takes a while, so the kill lands mid-write
    csv_path.write_text("path,label\n" + "".join(f"elsewhere/{i:05d}.png,background\n" for i in range(20000)))
    url, process = start_label(root, csv_path, tmp_path / "store", "--classes", "face")
    acknowledged, sent, stop = [], [], threading.Event()

    def label_all():
        with httpx.Client(base_url=url, timeout=30) as client:
            for path in truth:
                if stop.is_set():
                    return
                sent.append(path)
                try:
                    client.post("/api/label", json={"path": path, "label": truth[path]}).raise_for_status()
                except httpx.TransportError:
                    return
                acknowledged.append(path)

    worker = threading.Thread(target=label_all)
    worker.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 8 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(acknowledged) >= 8, "the labels were not accepted"
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    stop.set()
    worker.join(60)
    read = from_csv(csv_path)  # a whole file, old or new: never a torn line
    written = {Path(p).relative_to(root).as_posix() for p in read.paths if "elsewhere" not in p}
    assert len(read) - len(written) == 20000
    assert set(acknowledged) <= written <= set(sent)
    assert len(written) - len(acknowledged) <= 1
