"""Saying "I don't know", on real images: the OOD score flags a held-out real class far more often
than the in-distribution test images, and another real set almost always; the conformal sets
cover as promised; the ONNX export gives the PyTorch engine's scores; the thresholds round-trip
through model.json; runs trained before the feature still predict; every bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, lfw_arrays, texture_crops, write_folders
from scipy.stats import binom
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.openworld import conformal, ood
from transferkit.predict.run import load


def decoded(paths: list[Path]) -> np.ndarray:
    from transferkit.data.decode import decoded_batches

    return np.stack([a for batch in decoded_batches([str(p) for p in paths], SIZE, 64) for _, a in batch])


def tiles(name: str) -> list[np.ndarray]:
    """The 64 non-overlapping 64 x 64 tiles of one of scikit-image's texture photos (512 x 512), in
    a fixed shuffled order."""
    from skimage import data

    photo = getattr(data, name)()
    found = [photo[y:y + 64, x:x + 64] for y in range(0, 512, 64) for x in range(0, 512, 64)]
    return [found[i] for i in np.random.default_rng(0).permutation(len(found))]


@pytest.fixture(scope="module")
def textures_run(tmp_path_factory):
    """Real texture photos, brick vs grass (train/ and test/); gravel, the third texture of the same
    photos, is held out of training; LFW faces are another real set."""
    import transferkit

    root = tmp_path_factory.mktemp("textures")
    brick, grass, gravel = (tiles(name) for name in ("brick", "grass", "gravel"))  # 64 tiles each
    write_folders(root / "train", {"brick": brick[:48], "grass": grass[:48]})
    write_folders(root / "test", {"brick": brick[48:], "grass": grass[48:]})
    write_folders(root / "held_out", {"gravel": gravel})
    images, labels = lfw_arrays()
    write_folders(root / "faces", {"face": list(images[labels == 1][:60])})
    write_folders(root / "crops", {"texture": texture_crops(60)})  # 25 px crops, the size of LFW's
    out = root / "run"
    transferkit.train(root / "train", out, image_size=SIZE, epochs=3, fine_tune_epochs=2, batch_size=16, seed=0)
    return out, root


pytestmark = pytest.mark.slow


def scores_of(classifier, folder: Path) -> dict[str, np.ndarray]:
    return classifier.predict_open(decoded(sorted(folder.rglob("*.png"))))


def test_a_held_out_real_class_is_flagged_far_more_often_than_the_test_images(textures_run):
    run, root = textures_run
    classifier = load(run)
    inside, held = scores_of(classifier, root / "test"), scores_of(classifier, root / "held_out")
    auroc = roc_auc_score(np.r_[np.zeros(len(inside["ood_score"])), np.ones(len(held["ood_score"]))],
                          np.r_[inside["ood_score"], held["ood_score"]])
    assert auroc >= 0.9, auroc  # a random score: 0.5
    flagged_in, flagged_out = inside["unknown"].mean(), held["unknown"].mean()
    assert flagged_in <= 0.2, flagged_in  # the threshold keeps 95 % of validation
    assert flagged_out >= 0.6 and flagged_out >= 4 * max(flagged_in, 0.02), (flagged_in, flagged_out)
    # the label stays the model's best class
    assert (inside["probabilities"].argmax(1) == classifier.predict_proba(decoded(sorted((root / "test").rglob("*.png"))))
            .argmax(1)).all()


def test_another_real_set_is_flagged_almost_always(textures_run, binary_run, lfw_split):
    run, root = textures_run
    faces = scores_of(load(run), root / "faces")  # LFW faces shown a texture model
    assert faces["unknown"].mean() >= 0.9, faces["ood_score"]
    textures = scores_of(binary_run[0], root / "crops")  # texture crops shown the LFW model
    assert textures["unknown"].mean() >= 0.9, textures["ood_score"]
    own = scores_of(binary_run[0], lfw_split[1])
    assert own["unknown"].mean() <= 0.2


def test_conformal_coverage_is_within_its_binomial_interval(binary_run, lfw_split):
    """The product's sets at --coverage 0.9 on the held-out LFW test images: at least the lower end
    of the 95 % binomial interval of 0.9; and the textbook randomised sets on real probabilities,
    calibrated and tested on many random splits of the same real images (exchangeable by
    construction), cover 0.9 on average, within the interval of that average."""
    classifier, run = binary_run
    classifier = load(run).configure(coverage=0.9)
    data = classifier.read_labelled(lfw_split[1])
    answer = classifier.predict_open(data.images)
    member = answer["sets"]
    n = len(member)
    covered = member[np.arange(n), data.labels].mean()
    assert covered >= binom.ppf(0.025, n, 0.9) / n, covered
    assert member[np.arange(n), answer["probabilities"].argmax(1)].all()  # never empty: the label is in it
    # many calibration/test splits of real probabilities: exact coverage of the randomised sets
    train = classifier.read_labelled(lfw_split[0])
    probs = np.r_[classifier.predict_proba(train.images), answer["probabilities"]]
    labels = np.r_[train.labels, data.labels]
    u = conformal.tie_breaks(np.r_[train.images, data.images])
    rng = np.random.default_rng(0)
    coverages = []
    for _ in range(300):
        order = rng.permutation(len(labels))
        cal, test = order[:100], order[100:]
        q = conformal.threshold(conformal.scores(probs[cal], labels[cal], u[cal]), 0.9)
        sets = conformal.sets(probs[test], q, u[test], never_empty=False)
        coverages.append(sets[np.arange(len(test)), labels[test]].mean())
    mean, spread = np.mean(coverages), np.std(coverages) / np.sqrt(len(coverages))
    assert 0.9 - 3 * spread - 0.005 <= mean <= 0.9 + 1 / 101 + 3 * spread + 0.005, (mean, spread)


def test_conformal_arithmetic_by_hand():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    # mass before the true class plus u times its probability
    assert np.allclose(conformal.scores(p, np.array([1, 0]), np.array([0.5, 0.0])), [0.6 + 0.15, 0.8])
    # the sets that always hold the answer: a right answer scores 0 (covered at any threshold)
    assert np.allclose(conformal.scores(p, np.array([0, 0]), np.array([0.5, 0.0]), predicted=np.array([0, 1])),
                       [0.0, 0.8])
    assert conformal.threshold(np.arange(1, 10) / 10, 0.8) == 0.8  # ceil(10 * 0.8) = 8th of 9
    assert conformal.threshold(np.arange(1, 10) / 10, 0.95) == float("inf")  # too few for 0.95
    member = conformal.sets(p, 0.7, np.array([0.5, 0.5]))
    assert member.tolist() == [[True, False, False], [False, True, True]]  # 0.3 | 0.75 0.95 ; 0.25 0.65 | 0.9
    assert conformal.naive_sets(p, 0.85).tolist() == [[True, True, False], [True, True, True]]
    assert conformal.tie_breaks(np.zeros((2, 4, 4, 3), np.uint8)).tolist() == [conformal.tie_breaks(
        np.zeros((1, 4, 4, 3), np.uint8))[0]] * 2


def test_onnx_gives_the_pytorch_scores(exported, lfw_split, textures_run):
    from transferkit.predict.onnx_engine import OnnxClassifier

    run, _ = exported
    images = decoded(sorted(lfw_split[1].rglob("*.png")) + sorted((textures_run[1] / "held_out").rglob("*.png"))[:20])
    torch_engine, onnx_engine = load(run).configure(coverage=0.9), OnnxClassifier(run / "model.onnx").configure(coverage=0.9)
    a, b = torch_engine.predict_open(images), onnx_engine.predict_open(images)
    assert np.abs(a["ood_score"] - b["ood_score"]).max() <= 1e-4
    assert np.abs(a["probabilities"] - b["probabilities"]).max() <= 1e-4
    assert (a["unknown"] == b["unknown"]).all() and (a["sets"] == b["sets"]).all()
    assert onnx_engine.open_world.threshold == pytest.approx(torch_engine.open_world.threshold)
    assert [o.name for o in onnx_engine.session.get_outputs()] == ["probabilities", "ood_score"]
    conformal_meta = onnx_engine.meta["conformal"]
    assert conformal_meta["threshold"] == pytest.approx(json.loads((run / "model.json").read_text())["conformal"]
                                                        ["threshold"])


def test_thresholds_round_trip_through_model_json(binary_run):
    _, run = binary_run
    meta = json.loads((run / "model.json").read_text())
    entry = meta["ood"]
    assert entry["keep"] == 0.95 and entry["method"] == ood.DEFAULT_METHOD and entry["file"] == ood.FILE
    scorer = ood.load(run, entry)
    assert ood.keep_threshold(scorer.val_scores, entry["keep"]) == pytest.approx(entry["threshold"])
    assert conformal.threshold(scorer.extra["conformal_scores"], 0.9) == pytest.approx(meta["conformal"]["threshold"])
    classifier = load(run)
    assert classifier.open_world.threshold == pytest.approx(entry["threshold"])
    passing = (scorer.val_scores <= classifier.configure(ood_keep=0.8).open_world.threshold).mean()
    assert passing >= 0.8 and passing - 0.8 < 1.5 / len(scorer.val_scores)
    assert meta["config"]["ood_keep"] == 0.95


def test_predict_records_the_ood_fields_and_reject_prints_unknown(binary_run, lfw_split, textures_run):
    runner = CliRunner()
    face = sorted((lfw_split[1] / "face").glob("*.png"))[0]
    brick = sorted((textures_run[1] / "held_out").rglob("*.png"))[0]  # gravel, in fact: a texture
    out = runner.invoke(app, ["predict", str(binary_run[1]), str(face), str(brick), "--format", "json",
                              "--coverage", "0.9", "--engine", "torch"])
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["unknown"] for r in records] == [False, True]
    assert all(isinstance(r["ood_score"], float) and r["set"] and r["label"] in r["set"] for r in records)
    assert records[1]["label"] in binary_run[0].classes  # the label stays the best class
    out = runner.invoke(app, ["predict", str(binary_run[1]), str(face), str(brick), "--reject", "--format", "json"])
    rejected = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rejected[0]["label"] == records[0]["label"] and rejected[1]["label"] == "unknown"
    table = runner.invoke(app, ["predict", str(binary_run[1]), str(brick), "--reject"])
    assert "\tunknown\t" in table.stdout and "unlike the training images" in table.stdout


def test_evaluate_ood_dir_reports_auroc_and_coverage(binary_run, lfw_split, textures_run, tmp_path):
    out = CliRunner().invoke(app, ["evaluate", str(binary_run[1]), str(lfw_split[1]), "--ood-dir",
                                   str(textures_run[1] / "crops"), "--output", str(tmp_path / "m.json")])
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["ood"]["auroc"] >= 0.9 and metrics["ood"]["flagged_ood_dir"] >= 0.9
    assert 0 <= metrics["ood"]["fpr_at_95_tpr"] <= 0.2
    sets = metrics["conformal"]
    assert sets["target"] == 0.9 and sets["coverage_ci95"][0] <= sets["coverage"] <= sets["coverage_ci95"][1]
    assert 1 <= sets["mean_set_size"] <= 2
    assert "AUROC" in out.stdout and "empirical coverage" in out.stdout


def test_a_run_trained_before_the_feature_predicts_as_before(old_run, binary_run, lfw_split):
    image = sorted(lfw_split[1].rglob("*.png"))[0]
    out = CliRunner().invoke(app, ["predict", str(old_run), str(image), "--format", "json"])
    assert out.exit_code == 0, out.output
    record = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert set(record) == {"path", "label", "probabilities"}
    assert "trained before OOD scores" in out.stderr
    now = next(binary_run[0].predict_files([str(image)]))
    assert record["label"] == now["label"]
    assert all(abs(record["probabilities"][c] - p) < 1e-6 for c, p in now["probabilities"].items())


def one_line_error(args: list[str], words: str) -> None:
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2, out.output
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.stderr
    assert "Traceback" not in out.output


@pytest.mark.parametrize("option, value", [("--ood-keep", "1.5"), ("--ood-keep", "0"), ("--coverage", "1"),
                                           ("--coverage", "-0.1")])
def test_fractions_outside_zero_one_are_one_line_errors(binary_run, lfw_split, option, value):
    image = str(sorted(lfw_split[1].rglob("*.png"))[0])
    one_line_error(["predict", str(binary_run[1]), image, option, value], f"{option} must be a number in (0, 1)")
    one_line_error(["evaluate", str(binary_run[1]), str(lfw_split[1]), option, value], "must be a number in (0, 1)")


def test_train_refuses_an_ood_keep_outside_zero_one(lfw_split, tmp_path):
    one_line_error(["train", str(lfw_split[0]), "--out", str(tmp_path / "r"), "--ood-keep", "1"],
                   "ood_keep must be a finite number in (0, 1)")


@pytest.mark.parametrize("args, words", [
    (["--reject"], "--reject needs a run trained with OOD scores"),
    (["--coverage", "0.9"], "--coverage needs a run trained with OOD scores"),
    (["--ood-keep", "0.9"], "--ood-keep needs a run trained with OOD scores"),
])
def test_a_run_trained_before_the_feature_says_so_in_one_line(old_run, lfw_split, args, words):
    image = str(sorted(lfw_split[1].rglob("*.png"))[0])
    one_line_error(["predict", str(old_run), image, *args], words)
    one_line_error(["evaluate", str(old_run), str(lfw_split[1]), "--ood-dir", str(lfw_split[0])],
                   "--ood-dir needs a run trained with OOD scores")


def test_a_bank_that_does_not_match_its_hash_is_a_one_line_error(binary_run, lfw_split, tmp_path):
    image = str(sorted(lfw_split[1].rglob("*.png"))[0])
    run = tmp_path / "damaged"
    shutil.copytree(binary_run[1], run)
    data = bytearray((run / ood.FILE).read_bytes())
    data[-5] ^= 0xFF
    (run / ood.FILE).write_bytes(bytes(data))
    one_line_error(["predict", str(run), image, "--engine", "torch"], "does not match the SHA-256 in model.json")
    (run / ood.FILE).unlink()
    one_line_error(["predict", str(run), image, "--engine", "torch"], "ood.safetensors: not found")


def test_multilabel_runs_score_ood_and_say_they_have_no_sets(multilabel_run):
    run, _, test_csv = multilabel_run
    classifier = load(run)
    assert classifier.has_ood and "conformal" not in classifier.meta
    answer = classifier.predict_open(classifier.read_labelled(test_csv).images)
    assert np.isfinite(answer["ood_score"]).all()
    one_line_error(["predict", str(run), str(test_csv.parent / "face0.png"), "--coverage", "0.9"],
                   "conformal sets are for single-label runs")


def test_the_bank_is_capped_by_a_stratified_subsample():
    labels = np.r_[np.zeros(900, int), np.ones(100, int)]
    chosen = ood.subsample(labels, 100, seed=0)
    assert len(chosen) == 100 and (labels[chosen] == 1).sum() == 10
    features = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    scorer = ood.fit("knn", features, labels, features[:20], np.zeros((20, 1)), cap=100)
    assert scorer.bank.shape == (100, 8) and "capped at 100" in scorer.notes[0]


def test_serve_answers_carry_the_ood_fields(binary_run, textures_run):
    from fastapi.testclient import TestClient

    from transferkit.apps.serve import create_app

    brick = sorted((textures_run[1] / "held_out").rglob("*.png"))[0]
    with TestClient(create_app(binary_run[1], engine="torch", coverage=0.9)) as client:
        body = client.post("/predict", content=brick.read_bytes()).json()
        health = client.get("/health").json()
    assert body["unknown"] is True and body["ood_score"] > health["ood"]["threshold"] and body["set"]
    assert health["coverage"] == 0.9


def test_openvino_gives_the_pytorch_scores(binary_run, lfw_split, textures_run, tmp_path):
    pytest.importorskip("openvino")
    from transferkit.deploy.export import export
    from transferkit.predict.openvino_engine import OpenVinoClassifier

    run = tmp_path / "run"
    shutil.copytree(binary_run[1], run)
    export(run, format="openvino")
    images = decoded(sorted(lfw_split[1].rglob("*.png")) + sorted((textures_run[1] / "held_out").rglob("*.png"))[:20])
    a = load(run).configure(coverage=0.9).predict_open(images)
    b = OpenVinoClassifier(run / "model.xml").configure(coverage=0.9).predict_open(images)
    assert np.abs(a["ood_score"] - b["ood_score"]).max() <= 1e-4
    assert (a["unknown"] == b["unknown"]).all() and (a["sets"] == b["sets"]).all()
