"""A catalogue of bad input: each kind of input -> the one-line error or the counted, listed skip
that transferkit must give, never a traceback and never an answer computed from bad data. The
next kind of bad input is one more test here. Real images (scikit-image's LFW crops), tiny runs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import lfw_arrays, write_folders
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.predict.run import read_predictions, read_skipped

pytestmark = pytest.mark.slow  # nearly every row trains a tiny run or loads one

TINY = ["--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "0", "--cache-dir", "", "--quiet"]


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, pattern: str) -> str:
    """The command failed with exit status 2 and exactly one line, `error: ...`, matching `pattern`."""
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output)
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def succeeded(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def crops():
    images, _ = lfw_arrays()
    return {"face": list(images[:14]), "background": list(images[100:114])}


@pytest.fixture()
def folder(tmp_path, crops) -> Path:
    return write_folders(tmp_path / "data", crops)


def csv_of(folder: Path, rows: list[tuple[str, str]], name="labels.csv", header=("path", "label")) -> Path:
    target = folder / name
    with open(target, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return target


def all_rows(folder: Path) -> list[tuple[str, str]]:
    return [(f"{c}/{p.name}", c) for c in ("background", "face") for p in sorted((folder / c).iterdir())]


@pytest.fixture()
def run_copy(binary_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    return run


# -- training data -----------------------------------------------------------------------------

def test_csv_listing_every_image_twice_is_merged_and_validation_stays_held_out(folder, tmp_path):
    rows = all_rows(folder)
    result = run_cli("train", csv_of(folder, rows + rows), "--out", tmp_path / "run", *TINY[:-1])
    succeeded(result)
    assert "28 repeated row(s) of the same path and label merged" in result.output
    paths, _, _ = read_predictions(tmp_path / "run" / "val_predictions.csv", ["background", "face"])
    counts = json.loads((tmp_path / "run" / "metrics.json").read_text())["counts"]
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 28
    assert len(set(paths)) == len(paths) == sum(counts["validation"].values())


def test_the_same_picture_under_two_names_is_merged_and_listed(folder, tmp_path):
    shutil.copy(folder / "face" / "000.png", folder / "face" / "copy.png")
    succeeded(run_cli("train", folder, "--out", tmp_path / "run", *TINY))
    skipped = dict(read_skipped(tmp_path / "run" / "skipped.csv"))
    assert skipped == {str(folder / "face" / "copy.png"): f"same image as {folder / 'face' / '000.png'} (merged)"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["counts"]["skipped"] == 1


def test_a_path_listed_with_two_labels_is_refused_before_decoding(folder, tmp_path):
    rows = all_rows(folder) + [("face/000.png", "background")]
    one_line_error(run_cli("train", csv_of(folder, rows), "--out", tmp_path / "run", *TINY),
                   r"labels\.csv:30: face/000\.png is labelled 'background' here and 'face' on line \d+")
    assert not (tmp_path / "run").exists()


def test_the_same_picture_in_two_classes_is_refused(folder, tmp_path):
    shutil.copy(folder / "face" / "000.png", folder / "background" / "000-face.png")
    one_line_error(run_cli("train", folder, "--out", tmp_path / "run", *TINY),
                   r"the same image is labelled 'background' \(.*000-face\.png\) and 'face'")


def test_validation_images_that_are_also_training_images_are_refused(folder, tmp_path):
    val = write_folders(tmp_path / "val", {"face": [np.asarray(Image.open(folder / "face" / "003.png"))],
                                          "background": [np.asarray(Image.open(folder / "background" / "003.png"))]})
    one_line_error(run_cli("train", folder, "--out", tmp_path / "run", "--val-dir", val, *TINY),
                   r"2 validation image\(s\) are also in the training data")


def test_a_validation_set_without_one_of_the_classes_is_refused(folder, tmp_path):
    val = write_folders(tmp_path / "val", {"face": [lfw_arrays()[0][50]]})
    one_line_error(run_cli("train", folder, "--out", tmp_path / "run", "--val-dir", val, *TINY),
                   r"no images for class\(es\) \[.background.\]; a validation set must hold every class")


def test_a_skipped_name_with_a_newline_is_listed_and_the_run_stays_readable(folder, tmp_path):
    (folder / "face" / "bad\nname.png").write_bytes(b"not an image")
    rows = all_rows(folder) + [("face/quoted\nnewline.png", "face")]
    for source, out in ((folder, tmp_path / "a"), (csv_of(folder, rows), tmp_path / "b")):
        succeeded(run_cli("train", source, "--out", out, *TINY))
        skipped = read_skipped(out / "skipped.csv")
        assert any(path.endswith("\nname.png") or path.endswith("\nnewline.png") for path, _ in skipped), skipped
        succeeded(run_cli("report", out))


def test_a_symlinked_subfolder_is_followed_and_broken_links_are_listed(folder, tmp_path):
    extra = write_folders(tmp_path / "elsewhere", {"more": [lfw_arrays()[0][60 + i] for i in range(3)]})
    os.symlink(extra / "more", folder / "face" / "linked")
    os.symlink(tmp_path / "nowhere.png", folder / "face" / "dangling.png")
    os.symlink(folder / "face" / "loop-b.png", folder / "face" / "loop-a.png")
    os.symlink(folder / "face" / "loop-a.png", folder / "face" / "loop-b.png")
    os.symlink(folder, folder / "face" / "ancestor")  # a folder loop
    succeeded(run_cli("train", folder, "--out", tmp_path / "run", *TINY))
    counts = json.loads((tmp_path / "run" / "metrics.json").read_text())["counts"]
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 28 + 3
    reasons = dict(read_skipped(tmp_path / "run" / "skipped.csv"))
    assert reasons[str(folder / "face" / "dangling.png")].startswith("dangling symlink")
    assert reasons[str(folder / "face" / "loop-a.png")] == "symlink loop"
    assert "symlink loop" in reasons[str(folder / "face" / "ancestor")]


def test_a_csv_header_with_spaces_is_read(folder, tmp_path):
    source = csv_of(folder, all_rows(folder), header=("path ", " label"))
    succeeded(run_cli("train", source, "--out", tmp_path / "run", *TINY))


@pytest.mark.parametrize("args, pattern", [
    (["--cache-memory-gb", "0"], r"cache_memory_gb must be a finite number > 0 .*got '0'"),
    (["--lr", "inf"], r"lr must be a finite number > 0, got 'inf'"),
    (["--device", "banana"], r"device must be auto, cpu, cuda or cuda:N, got 'banana'"),
    (["--device", "cuda:0"], r"device 'cuda:0' is not available on this machine \(available: cpu"),
    (["--backbone", "nonsense_net"], r"unknown backbone 'nonsense_net'"),
    # a seed is what numpy and torch accept: [0, 2**32 - 1]
    (["--seed", "-1"], r"^error: seed must be an integer in \[0, 4294967295\], got '-1'$"),
    (["--seed", str(2**32)], r"^error: seed must be an integer in \[0, 4294967295\], got '4294967296'$"),
    # a split leaves every class on both sides (14 + 14 images here)
    (["--val-split", "0.99"], r"^error: .*data: val_split 0\.99 leaves 0 training image\(s\) of 28 for 2 classes; "
                              r"every class needs one on both sides: lower --val-split"),
    (["--val-split", "0.97"], r"val_split 0\.97 leaves 1 training image\(s\) of 28 for 2 classes"),
])
def test_absurd_settings_are_one_line_errors(folder, tmp_path, args, pattern):
    one_line_error(run_cli("train", folder, "--out", tmp_path / "run", *TINY, *args), pattern)
    assert not (tmp_path / "run").exists()


def test_the_ends_of_the_seed_and_split_ranges_train(folder, tmp_path):
    """The largest seed numpy accepts, and a split that leaves 3 training images of 28 (one class
    or more on each side), are accepted and train."""
    succeeded(run_cli("train", folder, "--out", tmp_path / "run", *TINY, "--seed", str(2**32 - 1),
                      "--val-split", "0.9"))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["config"]["seed"] == 2**32 - 1 and meta["status"] == "complete"


def test_a_split_that_leaves_a_class_without_validation_images_is_refused_before_decoding(tmp_path, crops,
                                                                                         monkeypatch):
    """2 faces and 14 backgrounds: a 20 % split draws 3 validation images, all backgrounds (the
    stratified shares are 0.4 and 2.6). Refused on the listing, before any image is decoded; at
    val_split 0.5 each class is on both sides and the run trains."""
    import transferkit.training.recipe as recipe

    data = write_folders(tmp_path / "data", {"face": crops["face"][:2], "background": crops["background"]})
    decode = recipe._decode
    monkeypatch.setattr(recipe, "_decode", lambda *a, **k: pytest.fail("decoded before refusing"))
    one_line_error(run_cli("train", data, "--out", tmp_path / "run", *TINY),
                   r"data: val_split 0\.2 leaves no validation image of class\(es\) \['face'\] \(the smallest "
                   r"class has 2 images\); raise --val-split, or give a validation set \(--val-dir\)$")
    monkeypatch.setattr(recipe, "_decode", decode)
    succeeded(run_cli("train", data, "--out", tmp_path / "run", *TINY, "--val-split", "0.5"))


def test_a_backbone_without_offline_weights_fails_fast_when_offline(folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # make transferkit find out by itself
    from transferkit.models import backbones

    if backbones.online():
        pytest.skip("this machine reaches the weights hub")
    started = time.monotonic()
    one_line_error(run_cli("train", folder, "--out", tmp_path / "run", "--backbone", "resnet18", *TINY),
                   r"no pretrained weights for 'resnet18'.*cannot be reached \(offline\)")
    assert time.monotonic() - started < 15


def test_a_diverging_learning_rate_is_a_warning_in_the_log_and_the_run(folder, tmp_path):
    """lr 1e9: the first step throws the head's weights to ~1e9, so epoch 2's training loss is many
    orders of magnitude above epoch 1's (still finite: the loss is computed stably): the run ends with
    one warning that names the learning rate it was given. The default lr on the same data: none."""
    args = [*TINY[:-1], "--epochs", "4", "--threads", "1"]
    result = succeeded(run_cli("train", folder, "--out", tmp_path / "run", *args, "--lr", "1e9"))
    warning = re.findall(r"^warning: .*$", result.output, re.M)
    assert len(warning) == 1 and re.fullmatch(
        r"warning: the training loss grew from [\d.]+ \(epoch 1\) to [\d.e+]+ \(epoch 2\): "
        r"the learning rate \(1e\+09\) is probably too high", warning[0]), result.output
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["warnings"] == [warning[0].removeprefix("warning: ")]
    quiet = succeeded(run_cli("train", folder, "--out", tmp_path / "default", *args))
    assert "warning" not in quiet.output
    assert not json.loads((tmp_path / "default" / "model.json").read_text())["warnings"]


def test_a_vision_transformer_trains_at_another_size(folder, tmp_path):
    succeeded(run_cli("train", folder, "--out", tmp_path / "run", "--backbone", "vit_tiny_patch16_224",
                      "--weights", "random", *TINY))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["timm_kwargs"] == {"dynamic_img_size": True} and meta["preprocess"]["image_size"] == 32
    succeeded(run_cli("predict", tmp_path / "run", folder / "face" / "000.png"))


def test_damaged_cache_entries_are_computed_again(folder, tmp_path):
    cache = tmp_path / "views"
    args = ["--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "1", "--cache-dir", cache]
    succeeded(run_cli("train", folder, "--out", tmp_path / "a", *args))
    entries = sorted(cache.glob("*/*.npz"))
    with np.load(entries[0]) as f:
        arrays = dict(f)
    np.savez(entries[0], **{k: np.full_like(v, np.nan) for k, v in arrays.items()})
    np.savez(entries[1], **{k: v[..., :1] for k, v in arrays.items()})
    (cache / entries[0].parent.name / "stale.tmp").write_bytes(b"x" * 1000)
    os.utime(cache / entries[0].parent.name / "stale.tmp", (0, 0))
    result = succeeded(run_cli("train", folder, "--out", tmp_path / "b", *args))
    assert re.search(r"Extracted 2 views in .*; reused \d+ from", result.output), result.output
    assert not (cache / entries[0].parent.name / "stale.tmp").exists()
    with np.load(entries[0]) as f:
        assert np.isfinite(f["pooled"]).all()


# -- run folders and exported files -------------------------------------------------------------

def test_weights_damaged_in_place_are_refused(run_copy, lfw_split):
    weights = run_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2**20:] = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
    weights.write_bytes(bytes(data))
    one_line_error(run_cli("predict", run_copy, lfw_split[1]), r"model\.safetensors: does not match the SHA-256")


@pytest.mark.parametrize("key, value, pattern", [
    ("temperature", -1, r"temperature must be a finite number > 0, got -1"),
    ("temperature", 0, r"temperature must be a finite number > 0, got 0"),
    ("threshold", 7, r"threshold must be a number in \[0, 1\], got 7"),
    ("threshold", "x", r"threshold must be a number in \[0, 1\], got 'x'"),
    ("image_size", -5, r"image_size must be an integer in \[16, 2048\], got -5"),
    ("image_size", 0, r"image_size must be an integer in \[16, 2048\], got 0"),
    ("image_size", "big", r"image_size must be an integer in \[16, 2048\], got 'big'"),
    ("temperature", None, r"no 'temperature'"),
    ("threshold", None, r"no 'threshold'"),
])
def test_model_json_values_are_checked(run_copy, lfw_split, key, value, pattern):
    meta = json.loads((run_copy / "model.json").read_text())
    if key == "image_size":
        meta["preprocess"]["image_size"] = value
    elif value is None:
        del meta[key]
    else:
        meta[key] = value
    (run_copy / "model.json").write_text(json.dumps(meta))
    for command in (["predict", run_copy, lfw_split[1]], ["evaluate", run_copy, lfw_split[1]]):
        one_line_error(run_cli(*command), pattern)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_onnx_export(exported, tmp_path, lfw_split, damage):
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    onnx_file = run / "model.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    result = succeeded(run_cli("predict", run, lfw_split[1] / "face", "--format", "json"))
    assert "is not usable" in result.output and "using PyTorch" in result.output
    assert sum(line.startswith("{") for line in result.output.splitlines()) == 30
    one_line_error(run_cli("predict", run, lfw_split[1], "--engine", "onnx"), r"model\.onnx: not a readable ONNX file")
    one_line_error(run_cli("serve", onnx_file), r"model\.onnx: not a readable ONNX file")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_batch_size_below_one_is_refused(binary_run, lfw_split, value):
    one_line_error(run_cli("predict", binary_run[1], lfw_split[1], "--batch-size", value),
                   r"Invalid value for '--batch-size'.*greater than or equal to 1")


def test_serve_refuses_a_port_out_of_range(binary_run):
    one_line_error(run_cli("serve", binary_run[1], "--port", "99999"), r"Invalid value for '--port'")


def test_predict_fails_when_no_input_could_be_classified(binary_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_cli("predict", binary_run[1], bad, tmp_path / "missing.png")
    assert result.exit_code == 1 and "2 of 2 file(s) could not be classified" in result.output
    assert result.output.count("ERROR: ") == 2


# -- the service and the process ---------------------------------------------------------------

def test_a_client_that_never_finishes_its_headers_is_disconnected():
    import asyncio

    import uvicorn

    from transferkit.apps.serve import header_timeout_protocol

    async def app_(scope, receive, send):  # a trivial ASGI app: the protocol is what is tested
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="warning",
                                           http=header_timeout_protocol(1.0), lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            started = time.monotonic()
            assert client.recv(1024) == b""  # the server hung up
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:  # a normal client is served
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)


def test_decoding_leaves_the_callers_warnings_filters_alone(tmp_path):
    from transferkit.data.decode import decode
    from transferkit.data.listing import load_labelled

    write_folders(tmp_path / "d", {"a": [np.zeros((40, 40), np.uint8)] * 3, "b": [np.ones((40, 40), np.uint8)] * 3})
    before = list(warnings.filters)
    for _ in range(3):
        decode(load_labelled(tmp_path / "d"), 16, workers=4)
    assert warnings.filters == before
