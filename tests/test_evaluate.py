"""Metrics, calibration and threshold choice against hand-computed values; test-time augmentation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from transferkit.data.balance import class_weights, epoch_order
from transferkit.predict.metrics import (
    classification_metrics,
    epoch_metrics,
    expected_calibration_error,
    multilabel_metrics,
    wilson_interval,
)
from transferkit.training.calibrate import choose_threshold, fit_temperature, nll

# 4 negatives (3 right, p1 = 0.6 wrong) and 6 positives (4 right, 0.4 and 0.45 wrong)
P1 = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.45, 0.7, 0.8, 0.9, 0.95])
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])


def test_binary_metrics_match_hand_computed_values():
    m = classification_metrics(Y, np.stack([1 - P1, P1], 1), ["neg", "pos"])
    assert m["confusion_matrix"]["rows_true_cols_predicted"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["per_class"]["neg"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    assert m["per_class"]["pos"] == pytest.approx({"precision": 4 / 5, "recall": 4 / 6, "f1": 8 / 11, "support": 6})
    assert m["averages"]["macro"]["f1"] == pytest.approx((2 / 3 + 8 / 11) / 2)
    assert m["averages"]["weighted"]["recall"] == pytest.approx(0.7)
    assert m["roc_auc"] == pytest.approx(22 / 24)  # 22 of the 24 (positive, negative) pairs ranked right
    assert m["average_precision"] == pytest.approx((4 + 5 / 6 + 6 / 7) / 6)
    p_true = np.where(Y == 1, P1, 1 - P1)
    assert m["loss"] == pytest.approx(-np.log(p_true).mean())
    assert m["accuracy_ci95"] == pytest.approx([0.3968, 0.8922], abs=1e-4)  # Wilson, 7 of 10
    assert m["positive_class"] == "pos" and "top_k_accuracy" not in m


def test_epoch_metrics_are_the_headline_numbers_of_the_full_metrics():
    probabilities = np.stack([1 - P1, P1], 1)
    each_epoch, full = epoch_metrics(Y, probabilities, 0.5), classification_metrics(Y, probabilities, ["n", "p"])
    assert each_epoch == {k: full[k] for k in ("loss", "accuracy", "map")}
    assert each_epoch["accuracy"] == pytest.approx(0.7)
    assert epoch_metrics(Y, probabilities, 0.42)["accuracy"] == pytest.approx(0.8)  # 0.45 is now right
    truth = np.array([[1, 0], [0, 1], [1, 1]])
    p = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.3]])
    bce = -np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p))
    for thresholds, subset_accuracy in (([0.5, 0.5], 2 / 3), ([0.5, 0.25], 1.0)):
        each_epoch = epoch_metrics(truth, p, thresholds)
        full = multilabel_metrics(truth, p, ["a", "b"], thresholds)
        assert each_epoch["accuracy"] == pytest.approx(subset_accuracy) == full["accuracy"]
        assert each_epoch["loss"] == pytest.approx(bce) == full["loss"]
        assert each_epoch["map"] == pytest.approx(full["map"])


def test_threshold_changes_predictions():
    m = classification_metrics(Y, np.stack([1 - P1, P1], 1), ["neg", "pos"], threshold=0.35)
    assert m["confusion_matrix"]["rows_true_cols_predicted"] == [[3, 1], [0, 6]]


def test_ece_and_wilson():
    # all in one bin with 2 bins: |accuracy 0.7 - mean confidence 0.75|
    assert expected_calibration_error(Y, np.stack([1 - P1, P1], 1), bins=2) == pytest.approx(0.05)
    perfect = np.array([[0.25, 0.75]] * 4)
    assert expected_calibration_error(np.array([1, 1, 1, 0]), perfect) == pytest.approx(0.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)


def test_multiclass_top_k():
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.35, 0.15, 0.1], [0.15, 0.05, 0.2, 0.6]])
    y = np.array([0, 2, 1, 1])
    m = classification_metrics(y, probs, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["top_k_accuracy"] == pytest.approx({"2": 0.75, "3": 0.75})  # the last is never in the top 3
    assert m["threshold"] is None and "roc_auc" not in m


def test_threshold_choice_on_a_constructed_case():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7])  # separable between 0.3 and 0.35 only
    for metric in ("balanced_accuracy", "youden"):
        chosen = choose_threshold(y, p, metric)
        assert chosen["threshold"] == pytest.approx(0.325) and chosen["score"] == pytest.approx(1.0)
    assert choose_threshold(y, p)["score_at_0.5"] == pytest.approx((2 / 3 + 1) / 2)
    # F1 prefers catching both positives at the price of one false positive: 4/5 at 0.4
    y, p = np.array([0, 0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.9])
    f1 = choose_threshold(y, p, "f1")
    assert f1["threshold"] == pytest.approx(0.4) and f1["score"] == pytest.approx(0.8)
    with pytest.raises(ValueError):
        choose_threshold(y, p, "accuracy")


@pytest.mark.parametrize("classes", [2, 4])
def test_temperature_scaling_recovers_a_known_temperature(classes):
    rng = np.random.default_rng(0)
    n, true_t = 4000, 3.0
    logits = rng.normal(0, 4, (n, 1 if classes == 2 else classes))
    if classes == 2:
        labels = (rng.random(n) < 1 / (1 + np.exp(-logits[:, 0] / true_t))).astype(int)
    else:
        p = np.exp(logits / true_t)
        p /= p.sum(1, keepdims=True)
        labels = np.array([rng.choice(classes, p=row) for row in p])
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.15)
    assert nll(logits, labels, t) < nll(logits, labels, 1.0)


def test_temperature_stays_one_on_a_separated_validation_set():
    logits = np.array([[-3.0], [-1.0], [0.5], [2.0]])  # every label right: NLL -> 0 as T -> 0
    assert fit_temperature(logits, np.array([0, 0, 1, 1])) == 1.0


def test_class_weights_and_balanced_order():
    labels = np.array([0] * 90 + [1] * 10)
    assert class_weights(labels, 2, "balanced").tolist() == pytest.approx([100 / 180, 100 / 20])
    assert class_weights(labels, 2, "none") is None
    order = epoch_order(labels, np.random.default_rng(0), "balanced")
    assert len(order) == 100 and 0.35 < labels[order].mean() < 0.65  # about half minority draws
    assert sorted(epoch_order(labels, np.random.default_rng(0), "none")) == list(range(100))


def test_weighted_loss_is_the_weighted_mean(binary_run):
    model = binary_run[0].model
    logits, target = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0])
    each = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    assert model.loss(logits, target).item() == pytest.approx(sum(each) / 3, rel=1e-6)
    weighted = model.loss(logits, target, torch.tensor([1.0, 3.0]))  # class 1 counts three times
    assert weighted.item() == pytest.approx((each[0] * 3 + each[1] + each[2]) / 5, rel=1e-6)


def test_tta_is_the_mean_over_the_mirror(binary_run, lfw_split):
    classifier, _ = binary_run
    from transferkit.data.decode import decode
    from transferkit.data.listing import load_labelled

    images = decode(load_labelled(lfw_split[1]), classifier.image_size).images[:8]
    plain = classifier.predict_proba(images)
    mirror = classifier.predict_proba(np.ascontiguousarray(images[:, :, ::-1]))
    assert not np.allclose(plain, mirror)
    assert np.allclose(classifier.predict_proba(images, tta=True), (plain + mirror) / 2, atol=1e-6)
    symmetric = np.concatenate([images[:, :, :32], images[:, :, :32][:, :, ::-1]], axis=2)
    assert np.allclose(classifier.predict_proba(symmetric, tta=True), classifier.predict_proba(symmetric), atol=1e-5)


def test_temperature_in_model_json_scales_probabilities(binary_run, lfw_split, tmp_path):
    import shutil

    import transferkit
    from transferkit.data.decode import decode
    from transferkit.data.listing import load_labelled

    classifier, out = binary_run
    images = decode(load_labelled(lfw_split[1]), classifier.image_size).images[:6]
    run = tmp_path / "run"
    shutil.copytree(out, run)
    meta = json.loads((run / "model.json").read_text())
    meta["temperature"] = 1.0
    (run / "model.json").write_text(json.dumps(meta))
    p1 = transferkit.load(run).predict_proba(images)[:, 1]
    meta["temperature"] = 2.0
    (run / "model.json").write_text(json.dumps(meta))
    p2 = transferkit.load(run).predict_proba(images)[:, 1]
    logit = np.log(p1 / (1 - p1))
    assert np.allclose(p2, 1 / (1 + np.exp(-logit / 2)), atol=1e-5)


def test_calibrate_fits_temperature_and_threshold_or_keeps_a_fixed_one(binary_run):
    import copy

    from transferkit.cfg.settings import TrainConfig
    from transferkit.training.calibrate import calibrate

    model = copy.deepcopy(binary_run[0].model)
    logits = np.array([[-4.0], [-2.0], [1.0], [-0.5], [3.0], [5.0], [0.2], [-1.0]])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    probs, calibration, selection = calibrate(model, logits, labels, TrainConfig(threshold=0.3))
    assert selection == {"metric": "fixed", "threshold": 0.3}
    assert model.temperature == calibration["temperature"] == pytest.approx(fit_temperature(logits, labels))
    assert probs[:, 1] == pytest.approx(1 / (1 + np.exp(-logits[:, 0] / model.temperature)), abs=1e-6)
    assert calibration["loss_after"] <= calibration["loss_before"]
    _, _, selection = calibrate(model, logits, labels, TrainConfig(threshold_metric="f1"))
    assert selection["metric"] == "f1"
    assert selection == choose_threshold(labels, probs[:, 1], "f1")
