"""Multi-label data end to end: any number of labels per image, from the CSV to every command, on
real photos side by side (conftest's `composite_set`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import serving, write_csv
from typer.testing import CliRunner

from transferkit.cfg.settings import TrainConfig
from transferkit.cli import app
from transferkit.data.balance import class_weights
from transferkit.data.listing import check_labels, from_csv, load_labelled
from transferkit.data.split import multilabel_split, stratified_split
from transferkit.predict.metrics import multilabel_metrics, predict_sets
from transferkit.utils.errors import ConfigError, DataError

CLASSES = ["brick", "face", "grass"]
runner = CliRunner()


# -- reading multi-label data ----------------------------------------------------------------------

def test_labels_column_reads_any_number_of_classes_and_no_label_is_a_negative(tmp_path):
    data = from_csv(write_csv(tmp_path / "l.csv", [("a.png", "cat|dog"), ("b.png", ""), ("c.png", " dog ")]))
    assert data.multilabel and data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert data.counts() == {"cat": 1, "dog": 2}
    assert data.names(0) == ["cat", "dog"] and data.names(1) == []


def test_another_separator(tmp_path):
    path = write_csv(tmp_path / "l.csv", [("a.png", "red car;blue"), ("b.png", "blue")])
    data = load_labelled(path, sep=";")
    assert data.classes == ["blue", "red car"] and data.labels.tolist() == [[1, 1], [1, 0]]


def test_a_path_on_several_rows_of_a_label_csv_is_multilabel_when_asked(tmp_path):
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat"), ("a.png", "dog"), ("b.png", "dog"), ("b.png", "dog")],
                     header=("path", "label"))
    with pytest.raises(DataError, match=r"l.csv:3: a.png is labelled 'dog' here and 'cat' on line 2; .*multilabel"):
        from_csv(path)  # one label per image, unless asked
    data = from_csv(path, task="multilabel")
    assert data.labels.tolist() == [[1, 1], [0, 1]]
    assert any("1 row(s) gave more labels" in n for n in data.notes)
    assert any("1 repeated row(s)" in n for n in data.notes)


def test_duplicated_rows_with_conflicting_labels_are_merged_and_said_so(tmp_path):
    data = from_csv(write_csv(tmp_path / "l.csv", [("a.png", "cat"), ("./a.png", "dog|cat"), ("b.png", "dog")]))
    assert len(data) == 2 and data.labels.tolist() == [[1, 1], [0, 1]]
    assert data.notes == [f"{tmp_path / 'l.csv'}: 1 row(s) gave more labels to a path listed before; their labels merged"]


@pytest.mark.parametrize("cell", ["|", "||", "cat|", "|dog", "cat||dog"])
def test_a_label_cell_with_an_empty_name_is_refused_naming_the_line(tmp_path, cell):
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat"), ("b.png", cell)])
    with pytest.raises(DataError, match=r"l.csv:3: empty class name .*separated by '\|'"):
        from_csv(path)


def test_a_class_name_holding_the_separator_is_refused(tmp_path):
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat|dog"), ("b.png", "dog")], header=("path", "label"))
    with pytest.raises(DataError, match=r"l.csv:2: class name 'cat\|dog' contains the label separator"):
        from_csv(path, task="multilabel")
    (tmp_path / "folders" / "a|b").mkdir(parents=True)
    with pytest.raises(DataError, match="contains the label separator"):
        load_labelled(tmp_path / "folders", task="multilabel")


def test_a_labels_column_with_task_multiclass_is_refused(tmp_path):
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat|dog")])
    with pytest.raises(DataError, match="'labels' column is multi-label data, but the task is multiclass"):
        from_csv(path, task="multiclass")


def test_a_label_on_fewer_than_two_images_is_refused_before_any_decoding(tmp_path):
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat|dog"), ("b.png", "dog"), ("c.png", "cat"),
                                          ("d.png", "bird|dog")])  # the files need not exist: no decoding
    with pytest.raises(DataError, match=r"label\(s\) \['bird'\] occur on fewer than 2 images"):
        check_labels(load_labelled(path), str(path), split=True)


def test_train_refuses_bad_multilabel_data_before_building_anything(tmp_path, monkeypatch):
    import transferkit.training.recipe as recipe

    monkeypatch.setattr(recipe, "create_backbone", lambda *a, **k: pytest.fail("built the backbone"))
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat|dog"), ("b.png", "dog"), ("c.png", "cat"), ("d.png", "")])
    with pytest.raises(ConfigError, match="sampler balanced draws single-label classes"):
        recipe.train(path, tmp_path / "run", sampler="balanced")
    val = write_csv(tmp_path / "v.csv", [("a.png", "cat|owl")])
    with pytest.raises(DataError, match=r"v.csv: labels \['owl'\] are not among the model's classes"):
        recipe.train(path, tmp_path / "run", val_data=val)
    assert not (tmp_path / "run").exists()


def test_multilabel_split_keeps_every_label_on_both_sides_and_is_reproducible():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 6)) < [0.5, 0.3, 0.2, 0.1, 0.02, 0.01]).astype(np.uint8)
    labels[:2, 5] = 1  # a label on exactly two images
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(set(train) | set(val)) == 200 and not set(train) & set(val)
    assert labels[train].sum(0).min() >= 1 and labels[val].sum(0).min() >= 1
    assert 30 <= len(val) <= 50
    again = multilabel_split(labels, 0.2, seed=3)
    assert (again[0] == train).all() and (again[1] == val).all()
    # the frequent labels keep their share on both sides (stratified)
    assert abs(labels[val, 0].mean() - labels[train, 0].mean()) < 0.08


# -- the model's arithmetic ------------------------------------------------------------------------

def test_pos_weight_is_negatives_over_positives_per_class():
    labels = np.array([[1, 0], [1, 1], [0, 0], [1, 0]], dtype=np.uint8)
    assert class_weights(labels, 2, "balanced").tolist() == pytest.approx([1 / 3, 3.0])
    assert class_weights(labels, 2, "none") is None


def test_model_loss_and_probabilities_are_per_class_sigmoids():
    from transferkit.models.backbones import Preprocess
    from transferkit.models.transfer import TransferModel

    backbone = torch.nn.Sequential()
    backbone.num_features = 4
    model = TransferModel(backbone, 3, Preprocess(32, (0.5,) * 3, (0.5,) * 3), multilabel=True)
    assert model.head.out_features == 3 and not model.binary
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 3.0, -2.0]])
    target = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8)
    weight = torch.tensor([1.0, 2.0, 4.0])
    expected = F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=weight)
    assert model.loss(logits, target, weight).item() == pytest.approx(expected.item())
    model.temperature = [1.0, 2.0, 0.5]
    assert torch.allclose(model.probabilities(logits), torch.sigmoid(logits / torch.tensor([1.0, 2.0, 0.5])))


def test_multilabel_metrics_are_scikit_learns():
    from sklearn.metrics import average_precision_score, f1_score, hamming_loss

    rng = np.random.default_rng(1)
    truth = (rng.random((60, 3)) < 0.4).astype(np.uint8)
    probs = np.clip(truth * 0.6 + rng.random((60, 3)) * 0.5, 0, 1)
    thresholds = [0.5, 0.6, 0.4]
    m = multilabel_metrics(truth, probs, ["a", "b", "c"], thresholds)
    pred = predict_sets(probs, thresholds)
    assert (pred == (probs >= np.array(thresholds))).all()
    assert m["map"] == pytest.approx(average_precision_score(truth, probs, average="macro"))
    assert m["f1_micro"] == pytest.approx(f1_score(truth, pred, average="micro"))
    assert m["f1_macro"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(truth, pred))
    assert m["accuracy"] == pytest.approx((pred == truth).all(1).mean())
    assert m["label_cardinality"] == {"true": pytest.approx(truth.sum(1).mean()),
                                      "predicted": pytest.approx(pred.sum(1).mean())}
    assert m["per_class"]["b"]["support"] == int(truth[:, 1].sum())
    assert m["thresholds"] == {"a": 0.5, "b": 0.6, "c": 0.4}


# -- end to end, through the command line -----------------------------------------------------------

@pytest.mark.slow
def test_training_writes_a_multilabel_run(multilabel_run):
    out, _, _ = multilabel_run
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == CLASSES and meta["label_sep"] == "|"
    assert meta["num_outputs"] == 3
    assert len(meta["temperature"]) == 3 and all(t > 0 for t in meta["temperature"])
    assert len(meta["threshold"]) == 3 and meta["threshold_selection"]["metric"] == "f1"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["map"] > 0.8
    history = list(csv.DictReader(open(out / "history.csv")))
    assert "val_map" in history[0]
    with open(out / "val_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"path", "labels", "p_brick", "p_face", "p_grass"}
    assert any(r["labels"] == "" for r in rows) and any("|" in r["labels"] for r in rows)


@pytest.mark.slow
def test_evaluate_on_held_out_multilabel_data_clears_the_bar(multilabel_run, tmp_path):
    out, _, test_csv = multilabel_run
    result = runner.invoke(app, ["evaluate", str(out), str(test_csv), "--output", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == 35
    # chance: each class's prevalence (3/7), so a mean average precision near 0.43
    assert m["map"] > 0.85, m["map"]
    assert m["f1_micro"] > 0.75, m["f1_micro"]
    assert "mAP" in result.output and "Hamming loss" in result.output and "face" in result.output


@pytest.mark.slow
def test_predict_gives_label_lists_in_every_format(multilabel_run):
    out, _, test_csv = multilabel_run
    pair = str(test_csv.parent / "face_grass0.png")
    result = runner.invoke(app, ["predict", str(out), pair, "--format", "json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.splitlines()[0])
    assert set(record) == {"path", "labels", "probabilities", "ood_score", "unknown"} and isinstance(record["labels"], list)
    meta = json.loads((out / "model.json").read_text())
    expected = [c for c, t in zip(CLASSES, meta["threshold"]) if record["probabilities"][c] >= t]
    assert record["labels"] == expected
    as_csv = runner.invoke(app, ["predict", str(out), pair, "--format", "csv"])
    header, row = list(csv.reader(as_csv.output.splitlines()))[:2]
    assert header[:2] == ["path", "labels"] and row[1] == "|".join(expected)
    table = runner.invoke(app, ["predict", str(out), pair])
    assert f"\t{'|'.join(expected) or '(no label)'}\t" in table.output


@pytest.mark.slow
def test_onnx_export_matches_pytorch_and_applies_the_same_thresholds(multilabel_export, multilabel_run):
    from transferkit.data.decode import decode_source
    from transferkit.predict.onnx_engine import OnnxClassifier
    from transferkit.predict.run import load

    torch_engine, onnx_engine = load(multilabel_export), OnnxClassifier(multilabel_export / "model.onnx")
    assert onnx_engine.multilabel and onnx_engine.threshold == pytest.approx(torch_engine.threshold)
    data = decode_source(multilabel_run[2], torch_engine.image_size, torch_engine.classes, "multilabel")
    p_torch, p_onnx = torch_engine.predict_proba(data.images), onnx_engine.predict_proba(data.images)
    assert np.abs(p_torch - p_onnx).max() < 1e-4
    assert torch_engine.labels(p_torch) == onnx_engine.labels(p_onnx)
    assert onnx_engine.evaluate(multilabel_run[2])["map"] == pytest.approx(
        torch_engine.evaluate(multilabel_run[2])["map"], abs=1e-3)
    cli = runner.invoke(app, ["predict", str(multilabel_export), str(multilabel_run[2].parent), "--engine", "onnx",
                              "--format", "json"])
    records = [json.loads(line) for line in cli.output.splitlines() if line.startswith("{")]
    by_name = {Path(r["path"]).name: r["labels"] for r in records if "labels" in r}
    names = [Path(p).name for p in data.paths]
    assert [by_name[n] for n in names] == torch_engine.labels(p_torch)


@pytest.mark.slow
def test_the_service_answers_with_label_lists_like_the_engines(multilabel_export, multilabel_run):
    import httpx

    from transferkit.predict.run import load

    with serving(multilabel_export) as url:
        health = httpx.get(url + "/health").json()
        assert health["task"] == "multilabel" and health["engine"] == "onnx" and len(health["threshold"]) == 3
        classifier = load(multilabel_export)
        for name in ("face_brick0.png", "none0.png", "grass1.png"):
            path = multilabel_run[2].parent / name
            answer = httpx.post(url + "/predict", files={"file": path.read_bytes()}, timeout=60).json()
            expected = next(classifier.predict_files([str(path)]))
            assert answer["labels"] == expected["labels"], name
            assert all(abs(answer["probabilities"][c] - expected["probabilities"][c]) < 1e-4 for c in CLASSES)
        heat = httpx.post(url + "/explain?label=grass", files={"file": path.read_bytes()}, timeout=60)
        assert heat.status_code == 200 and heat.content[:4] == b"\x89PNG"
        wrong = httpx.post(url + "/explain?label=owl", files={"file": path.read_bytes()}, timeout=60)
        assert wrong.status_code == 422 and "owl" in wrong.json()["error"]


@pytest.mark.slow
def test_explain_writes_one_overlay_per_predicted_label_or_the_asked_one(multilabel_run, tmp_path):
    from transferkit.predict.run import load

    out, _, test_csv = multilabel_run
    pair = test_csv.parent / "face_brick1.png"
    labels = next(load(out).predict_files([str(pair)]))["labels"]
    result = runner.invoke(app, ["explain", str(out), str(pair), "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert written == sorted(f"face_brick1_{c}.png" for c in (labels or [result.output.split("\t")[1]]))
    one = runner.invoke(app, ["explain", str(out), str(pair), "--out", str(tmp_path / "one"), "--label", "grass"])
    assert one.exit_code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["face_brick1_grass.png"]
    bad = runner.invoke(app, ["explain", str(out), str(pair), "--out", str(tmp_path / "x"), "--label", "owl"])
    assert bad.exit_code == 2 and "owl" in bad.output


@pytest.mark.slow
def test_the_report_shows_multilabel_metrics_and_missed_and_extra_labels(multilabel_run, tmp_path):
    out, _, test_csv = multilabel_run
    result = runner.invoke(app, ["report", str(out), str(test_csv), "--output", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    for text in ("mean average precision", "micro-F1", "Hamming loss", "Per-class metrics and precision-recall",
                 "thresholds"):
        assert text in page, text
    assert "confusion matrix" not in page

    # a page that must show mistakes: the test images the model gets exactly right, two of them
    # relabelled here with a class they do not show (and the model does not predict); the page shows
    # those two, and only those, with what each missed and added and the Grad-CAM of its prediction
    import transferkit

    rows = list(csv.DictReader(open(test_csv, newline="")))
    records = transferkit.load(out).predict_files([str(test_csv.parent / r["path"]) for r in rows])
    right = [r for r, rec in zip(rows, records) if sorted(rec["labels"]) == sorted(filter(None, r["labels"].split("|")))]
    single = [r for r in right if len(r["labels"].split("|")) == 1 and r["labels"]]
    assert len(right) >= 10 and len(single) >= 2, "the shared run gets too few test images right"
    wrong = {r["path"]: next(c for c in CLASSES if c != r["labels"]) for r in single[:2]}
    mislabelled = write_csv(tmp_path / "mislabelled.csv", [
        (str(test_csv.parent / r["path"]), wrong.get(r["path"], r["labels"])) for r in right])
    result = runner.invoke(app, ["report", str(out), str(mislabelled), "--output", str(tmp_path / "m.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "m.html").read_text()
    assert "No mistakes on this set" not in page and page.count("<b>missed</b>") == 2
    for row in single[:2]:
        assert (f"evidence for <b>{row['labels']}</b><br>true {wrong[row['path']]}; predicted {row['labels']}<br>"
                f"<b>missed</b> {wrong[row['path']]}, <b>extra</b> {row['labels']} (") in page, row["path"]
        assert str(test_csv.parent / row["path"]) in page


def test_bad_multilabel_input_through_the_cli_is_one_line(tmp_path):
    path = write_csv(tmp_path / "l.csv", [("a.png", "cat"), ("b.png", "|")])
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "l.csv:3: empty class name" in result.output
    sep = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run"), "--label-sep", ","])
    assert sep.exit_code == 2 and "label_sep must be" in sep.output


def test_config_knows_the_task():
    assert TrainConfig(task="multilabel").task == "multilabel"
    with pytest.raises(ConfigError, match="task must be one of auto, multiclass, multilabel"):
        TrainConfig(task="multi")


def test_monitor_val_map_keeps_the_epoch_with_the_best_mean_average_precision():
    from transferkit.training.callbacks import is_better

    first = {"val_map": 0.80, "val_loss": 0.30, "val_accuracy": 0.5}
    better_map_worse_loss = {"val_map": 0.85, "val_loss": 0.40, "val_accuracy": 0.4}
    same_map_lower_loss = {"val_map": 0.85, "val_loss": 0.35, "val_accuracy": 0.4}
    assert is_better(better_map_worse_loss, first, "val_map")
    assert not is_better(better_map_worse_loss, first, "val_loss")
    assert is_better(same_map_lower_loss, better_map_worse_loss, "val_map")
    assert TrainConfig(monitor="val_map").monitor == "val_map"


@pytest.mark.slow
def test_quantized_export_is_guarded_by_the_subset_accuracy(multilabel_export, multilabel_run, tmp_path, monkeypatch):
    """The guard compares subset accuracies (every label of an image right) on the validation
    data: a quantized model that drops more than the tolerance is refused and nothing is written;
    one within it is written. The accuracies are checked against a count made here."""
    import onnx

    import transferkit
    import transferkit.deploy.export as exporting
    from transferkit.predict.onnx_engine import OnnxClassifier
    from transferkit.utils.errors import ExportError

    val = multilabel_run[2]
    data = transferkit.load(multilabel_export).read_labelled(val)
    assert data.multilabel

    def subset_accuracy(path) -> float:
        engine = OnnxClassifier(path)
        assert engine.multilabel
        predicted = engine.predict_proba(data.images) >= np.asarray(engine.threshold)
        return float((predicted == data.labels.astype(bool)).all(1).mean())

    float_accuracy = subset_accuracy(multilabel_export / "model.onnx")
    # the real int8-dynamic model, written at a tolerance just above its measured drop
    forced = exporting.export(multilabel_export, out=tmp_path / "forced.onnx", quantize_mode="int8-dynamic",
                              val_data=val, force=True)
    assert forced["float_accuracy"] == pytest.approx(float_accuracy)
    assert forced["quantized_accuracy"] == pytest.approx(subset_accuracy(tmp_path / "forced.onnx"))
    drop = forced["drop"] * 100
    kept = exporting.export(multilabel_export, out=tmp_path / "q.onnx", quantize_mode="int8-dynamic",
                            val_data=val, tolerance=max(drop, 0) + 0.5)
    assert kept == {**forced, "path": str(tmp_path / "q.onnx")} and (tmp_path / "q.onnx").is_file()

    # a quantized model that predicts every label on every image (threshold 0): no image here has all
    # three, so its subset accuracy is 0; refused at a tolerance under that drop, kept above it
    real = exporting.quantize

    def every_label(float_path, out, mode, images):
        path = real(float_path, out, mode, images)
        proto = onnx.load(str(path))
        props = {p.key: p.value for p in proto.metadata_props}
        exporting.set_metadata(proto, {**props, "threshold": json.dumps([0.0] * len(CLASSES))})
        onnx.save(proto, str(path))
        return path

    monkeypatch.setattr(exporting, "quantize", every_label)
    assert data.labels.sum(1).max() < len(CLASSES)
    bad_drop = float_accuracy * 100
    assert bad_drop > 10, float_accuracy
    for tolerance in (1.0, bad_drop - 0.5):
        with pytest.raises(ExportError, match=rf"quantized model refused: validation accuracy .* \(drop "
                                              rf"{bad_drop:.2f} points > tolerance {tolerance:g}\); nothing written"):
            exporting.export(multilabel_export, out=tmp_path / "bad.onnx", quantize_mode="int8-dynamic",
                             val_data=val, tolerance=tolerance)
        assert not (tmp_path / "bad.onnx").exists()
    report = exporting.export(multilabel_export, out=tmp_path / "bad.onnx", quantize_mode="int8-dynamic",
                              val_data=val, tolerance=bad_drop + 0.5)
    assert report["drop"] * 100 == pytest.approx(bad_drop) and (tmp_path / "bad.onnx").is_file()


def test_the_same_picture_in_two_class_folders_carries_both_classes(tmp_path):
    from conftest import lfw_arrays, write_folders

    from transferkit.data.decode import decode
    from transferkit.data.dedupe import merge_duplicates

    images, _ = lfw_arrays()
    root = write_folders(tmp_path / "data", {"cat": [images[0], images[1]], "dog": [images[0], images[2]]})
    data = merge_duplicates(decode(load_labelled(root, task="multilabel"), 32), "data")
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert data.skipped == [(str(root / "dog" / "000.png"),
                             f"same image as {root / 'cat' / '000.png'} (merged; their labels combined)")]
    assert data.notes == ["data: 1 duplicate image(s) merged, 1 of them with their labels combined "
                          "(listed in skipped.csv)"]
