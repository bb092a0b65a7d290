"""End to end on real images: train both phases, the run directory, reload, predict, evaluate,
multi-class, CSV input, reproducibility, and the CLI's errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SIZE, lfw_arrays, texture_crops, write_folders
from PIL import Image

import transferkit
from transferkit.data.decode import decode
from transferkit.data.listing import load_labelled
from transferkit.predict.run import read_skipped
from transferkit.utils.errors import DataError


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "transferkit.cli", *map(str, args)],
                            capture_output=True, text=True, env={"CI": "1", "HF_HUB_OFFLINE": "1",
                                                                 "PATH": "/usr/bin:/bin"})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_binary_run_beats_chance_on_held_out_faces(binary_run, lfw_split):
    classifier, _ = binary_run
    metrics = classifier.evaluate(lfw_split[1])
    assert metrics["n"] == 60 and metrics["accuracy"] >= 0.85


def test_run_directory_contents(binary_run):
    classifier, out = binary_run
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["background", "face"] and meta["num_outputs"] == 1
    assert meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["threshold_selection"] == {"metric": "fixed", "threshold": 0.5} and meta["threshold"] == 0.5
    assert meta["config"]["class_weight"] == "balanced" and meta["config"]["sampler"] == "none"
    assert meta["preprocess"] == {"image_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3,
                                  "window": "data", "intensity_window": None, "pages": "first"}  # 8-bit: no window
    assert meta["fine_tune_at"]["num_layers"] == 98 and meta["versions"]["torch"]
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in rows] == ["1", "1", "1", "2", "2"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3] * 3 + [1e-4] * 2)
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert meta["best_epoch"] == int(best["epoch"])  # the kept checkpoint is the best epoch
    metrics = json.loads((out / "metrics.json").read_text())
    # the kept epoch's uncalibrated validation loss, then the deployed model's: temperature
    # scaling can only lower it, the chosen threshold cannot lower balanced accuracy
    calibration = metrics["calibration"]
    assert calibration["loss_before"] == pytest.approx(float(best["val_loss"]), rel=1e-3)  # fp16 cache vs full model
    assert metrics["loss"] == pytest.approx(calibration["loss_after"], rel=1e-4)
    assert calibration["loss_after"] <= calibration["loss_before"] + 1e-9
    assert meta["temperature"] == calibration["temperature"] > 0
    assert set(metrics["per_class"]) == {"background", "face"}
    assert np.sum(metrics["confusion_matrix"]["rows_true_cols_predicted"]) == metrics["n"] == 28
    assert read_skipped(out / "skipped.csv") == []
    png = Image.open(out / "learning_curves.png")
    assert png.size[0] > 400 and np.asarray(png.convert("L")).std() > 10


def test_reloaded_run_predicts_the_same_probabilities(binary_run, lfw_split):
    classifier, out = binary_run
    data = decode(load_labelled(lfw_split[1]), SIZE)
    reloaded = transferkit.load(out)
    in_memory, from_disk = classifier.predict_proba(data.images), reloaded.predict_proba(data.images)
    assert np.abs(in_memory - from_disk).max() < 1e-6
    records = list(reloaded.predict_files(data.paths[:5]))
    assert [r["label"] for r in records] == reloaded.labels(from_disk[:5])


def test_same_seed_same_split_and_metrics(binary_run, lfw_split, tmp_path):
    again = transferkit.train(lfw_split[0], tmp_path / "again", image_size=SIZE, epochs=3,
                              fine_tune_epochs=2, batch_size=16, seed=1)
    first = (binary_run[1] / "history.csv").read_text().splitlines()
    second = (tmp_path / "again" / "history.csv").read_text().splitlines()
    strip = lambda lines: [line.rsplit(",", 1)[0] for line in lines]  # noqa: E731 (drop seconds)
    assert strip(first) == strip(second)
    assert again.meta["best_epoch"] == binary_run[0].meta["best_epoch"]


def test_multiclass_from_csv_with_val_dir(tmp_path):
    images, labels = lfw_arrays()
    textures = texture_crops(60)
    groups = {"background": list(images[labels == 0][:30]), "face": list(images[labels == 1][:30]),
              "texture": textures[:30]}
    write_folders(tmp_path / "all", groups)
    with open(tmp_path / "train.csv", "w") as fh:
        fh.write("path,label\n" + "".join(f"all/{c}/{i:03d}.png,{c}\n" for c in groups for i in range(20)))
    write_folders(tmp_path / "val", {c: g[20:] for c, g in groups.items()})
    classifier = transferkit.train(tmp_path / "train.csv", tmp_path / "run", val_data=tmp_path / "val",
                                   image_size=SIZE, epochs=4, fine_tune_epochs=1, batch_size=16)
    assert classifier.classes == ["background", "face", "texture"]
    assert classifier.model.head.out_features == 3
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 30 and metrics["accuracy"] > 0.6  # chance is 1/3
    assert len(metrics["confusion_matrix"]["rows_true_cols_predicted"]) == 3
    assert set(metrics["top_k_accuracy"]) == {"2"} and metrics["top_k_accuracy"]["2"] >= metrics["accuracy"]
    assert metrics["threshold"] is None and "roc_auc" not in metrics
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "top-2 accuracy" in page and "ROC, precision-recall" not in page and "texture" in page


def test_bad_files_in_training_data_are_skipped_and_listed(lfw_split, tmp_path):
    images, labels = lfw_arrays()
    root = write_folders(tmp_path / "d", {"face": list(images[:12]), "background": list(images[100:112])})
    (root / "face" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "background" / "empty.png").write_bytes(b"")
    transferkit.train(root, tmp_path / "run", image_size=SIZE, epochs=1, fine_tune_epochs=0)
    skipped = read_skipped(tmp_path / "run" / "skipped.csv")
    assert sorted(path for path, _ in skipped) == sorted(
        [str(root / "face" / "broken.jpg"), str(root / "background" / "empty.png")])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["counts"]["skipped"] == 2


def test_unusable_data_fails_before_training(tmp_path):
    (tmp_path / "only" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "cats" / "a.png")
    with pytest.raises(DataError, match="only one class"):
        transferkit.train(tmp_path / "only", tmp_path / "run", image_size=SIZE)
    assert not (tmp_path / "run" / "model.json").exists()


def test_cli_predict_formats_and_unreadable_files(binary_run, lfw_split, tmp_path):
    _, out = binary_run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    face = sorted((lfw_split[1] / "face").iterdir())[0]
    lines = cli("predict", out, face, bad, lfw_split[1] / "background", "--format", "json").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 + 30
    assert records[0]["path"] == str(face) and set(records[0]["probabilities"]) == {"background", "face"}
    assert records[1] == {"path": str(bad), "error": "not an image (unrecognised format)"}
    assert sum(r.get("label") == "background" for r in records[2:]) >= 25
    rows = list(csv.DictReader(cli("predict", out, face, bad, "--format", "csv").stdout.splitlines()))
    assert rows[0]["label"] in ("face", "background") and rows[1]["error"].startswith("not an image")
    table = cli("predict", out, bad, face).stdout
    assert "ERROR: not an image" in table and str(face) in table


def test_cli_errors_are_one_line_without_traceback(tmp_path, binary_run, lfw_split):
    cases = [
        ("train", tmp_path / "missing", "--out", tmp_path / "r"),
        ("train", lfw_split[0], "--out", tmp_path / "r", "--backbone", "nonsense_net"),
        ("train", lfw_split[0], "--out", tmp_path / "r", "--fine-tune-at", "no_such_layer"),
        ("train", lfw_split[0], "--out", tmp_path / "r", "--val-split", "1.5"),
        ("train", lfw_split[0], "--out", tmp_path / "r", "--test-dir", tmp_path / "missing"),
        ("predict", tmp_path / "not_a_run", lfw_split[1]),
        ("evaluate", binary_run[1], tmp_path / "missing"),
        ("layers", "nonsense_net"),
    ]
    for args in cases:
        result = cli(*args, check=False)
        assert result.returncode == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # every train case failed before writing anything


def test_cli_train_with_a_test_dir_reports_the_held_out_metrics(lfw_split, tmp_path):
    out = tmp_path / "run"
    result = cli("train", lfw_split[0], "--out", out, "--test-dir", lfw_split[1], "--preset", "fast",
                 "--image-size", SIZE, "--epochs", 3, "--seed", 1)
    written = json.loads((out / "test_metrics.json").read_text())
    again = transferkit.load(out).evaluate(lfw_split[1])
    assert written["n"] == 60 and written["accuracy"] == again["accuracy"] and written["accuracy"] >= 0.8
    assert abs(written["loss"] - again["loss"]) < 1e-6
    assert f"{lfw_split[1]}: 60 images, accuracy {written['accuracy']:.4f}" in result.stdout
    assert "confusion matrix" in result.stdout


def test_cli_evaluate_backbones_layers(binary_run, lfw_split, tmp_path):
    result = cli("evaluate", binary_run[1], lfw_split[1], "--output", tmp_path / "m.json")
    assert "accuracy" in result.stdout and json.loads((tmp_path / "m.json").read_text())["n"] == 60
    listing = cli("backbones").stdout
    assert "tf_efficientnet_lite0" in listing and "installed" in listing and "ImageNet" in listing
    layers = cli("layers", "tf_efficientnet_lite0").stdout.splitlines()
    assert layers[0] == "Number of layers in the base model: 98"
    assert layers[1].split()[:2] == ["0", "conv_stem"]
    assert sum("default fine_tune_at" in line for line in layers) == 1


def test_the_command_leaves_its_objects_to_the_operating_system_at_exit(monkeypatch, capsys):
    import gc

    from transferkit.cli import main

    monkeypatch.setattr(sys, "argv", ["transferkit", "backbones"])
    gc.unfreeze()
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 0 and "tf_efficientnet_lite0" in capsys.readouterr().out
        assert gc.get_freeze_count() > 0  # the last collection on the way out skips them (1 s with torch loaded)
    finally:
        gc.unfreeze()
