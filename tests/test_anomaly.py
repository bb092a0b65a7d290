"""`train --task anomaly`: a patch memory bank from good images alone, on real images (scikit-image's
LFW faces and texture photographs), with synthetic defects pasted into real good images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import lfw_arrays, texture_crops, write_folders
from transferkit.cli import app

SIZE = 96  # 12 x 12 patch cells at stride 8: fine enough to find a pasted defect
runner = CliRunner()


def brick_crops(n: int, seed: int) -> list[np.ndarray]:
    """Real good parts: 96 x 96 crops of scikit-image's brick-wall photograph at random places."""
    from skimage import data

    brick = data.brick()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, brick.shape[0] - SIZE, 2)
        out.append(np.ascontiguousarray(brick[y:y + SIZE, x:x + SIZE]))
    return out


def train(data: Path, out: Path, *options: str):
    result = runner.invoke(app, ["train", str(data), "--out", str(out), "--task", "anomaly", "--image-size", str(SIZE),
                                 "--seed", "0", *options])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    """Trained on 70 real LFW faces (class folders: the backgrounds are left out and counted)."""
    images, labels = lfw_arrays()
    faces, backgrounds = images[labels == 1], images[labels == 0]
    root = tmp_path_factory.mktemp("faces")
    write_folders(root / "train", {"face": list(faces[:70]), "background": list(backgrounds[:70])})
    write_folders(root / "test", {"face": list(faces[70:]), "background": list(backgrounds[70:]),
                                  "texture": texture_crops(30, seed=5)})
    result = train(root / "train", root / "run", "--normal-class", "face")
    return root, result


@pytest.fixture(scope="module")
def brick_run(tmp_path_factory):
    """Trained on 60 real brick crops, the threshold fitted on 99 more at keep 0.9 (--val-dir)."""
    root = tmp_path_factory.mktemp("brick")
    write_folders(root, {"good": brick_crops(60, seed=1), "threshold": brick_crops(99, seed=2)})
    train(root / "good", root / "run", "--val-dir", str(root / "threshold"), "--anomaly-keep", "0.9")
    from transferkit.predict.anomaly_engine import load_detector

    return root, load_detector(root / "run")


@pytest.fixture(scope="module")
def brick_gaussian(tmp_path_factory):
    """brick_run's images and settings, with one Gaussian per cell (--anomaly-method gaussian)."""
    root = tmp_path_factory.mktemp("brick-gaussian")
    write_folders(root, {"good": brick_crops(60, seed=1), "threshold": brick_crops(99, seed=2)})
    train(root / "good", root / "run", "--val-dir", str(root / "threshold"), "--anomaly-keep", "0.9",
          "--anomaly-method", "gaussian")
    from transferkit.predict.anomaly_engine import load_detector

    return root, load_detector(root / "run")


BOTH = pytest.mark.parametrize("method_run", ["brick_run", "brick_gaussian"])


def test_other_real_classes_score_higher_than_held_out_images_of_the_normal_class(faces_run):
    root, result = faces_run
    assert "Normal class 'face': 70 image(s) train the model; left out of training: background 70" in result.output
    out = runner.invoke(app, ["evaluate", str(root / "run"), str(root / "test"), "--normal-class", "face",
                              "--output", str(root / "metrics.json")])
    assert out.exit_code == 0, out.output
    metrics = json.loads((root / "metrics.json").read_text())
    assert (metrics["n_normal"], metrics["n_anomalous"]) == (30, 60)
    # a random score's AUROC on 30 vs 60 images lies within 0.5 +- 0.13 (95 %); this margin it fails
    assert metrics["auroc"] > 0.9 and metrics["auroc_ci95"][0] > 0.75, metrics
    assert 0 <= metrics["false_alarm_rate"] <= 1 and 0 <= metrics["miss_rate"] <= 1
    assert metrics["auroc_ci95"][0] <= metrics["auroc"] <= metrics["auroc_ci95"][1]
    meta = json.loads((root / "run" / "model.json").read_text())
    assert meta["task"] == "anomaly" and meta["normal_class"] == "face" and meta["left_out"] == {"background": 70}
    assert meta["anomaly"]["keep"] == 0.99 and meta["threshold"] == meta["anomaly"]["threshold"]


def paste(image: np.ndarray, kind: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """A real good image with a synthetic defect pasted in, and the defect's mask."""
    out, mask = image.copy(), np.zeros(image.shape[:2], bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(24, SIZE - 24, 2)
    if kind == "scratch":  # a dark line 3 px wide, 36 px long, at a random angle
        angle = rng.uniform(0, np.pi)
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = (np.abs(along) <= 18) & (np.abs(across) <= 1.5)
        out[mask] = 10
    else:  # a bright round blob of radius 7 px
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= 49
        out[mask] = 250
    return out, mask


@BOTH
@pytest.mark.parametrize("kind", ["scratch", "blob"])
def test_a_pasted_defect_scores_higher_than_the_clean_image_and_the_map_peaks_on_it(method_run, kind, request):
    from scipy.ndimage import binary_dilation

    _, detector = request.getfixturevalue(method_run)
    rng = np.random.default_rng({"scratch": 7, "blob": 8}[kind])
    clean = np.stack([np.repeat(c[..., None], 3, 2) for c in brick_crops(12, seed=3)])
    pasted = [paste(c[..., 0], kind, rng) for c in clean]
    defective = np.stack([np.repeat(p[..., None], 3, 2) for p, _ in pasted])
    clean_scores, _ = detector.score(clean)
    scores, maps = detector.score(defective, maps=True)
    assert (scores > clean_scores).all(), (scores, clean_scores)
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
    # within the defect, or at most one patch cell (8 px) from it
    inside = [binary_dilation(mask, iterations=8)[peak] for (_, mask), peak in zip(pasted, peaks)]
    assert sum(inside) >= 11, inside


@BOTH
def test_the_threshold_holds_its_false_alarm_rate_on_new_good_images(method_run, request):
    """Split-conformal: with n held-out good images and k = ceil((n + 1) keep), a new good image's
    chance of an alarm is, over the draw of the held-out images, Beta(n + 1 - k, k) (mean 1 - keep);
    so the alarms among 300 fresh good crops follow a beta-binomial, and lie in its 95 % interval
    (about 13-53 of 300 here; a threshold at the largest held-out score gives about 3, one at
    their median about 150)."""
    import math

    from scipy.stats import betabinom

    root, detector = request.getfixturevalue(method_run)
    meta = detector.meta
    n = meta["anomaly"]["holdout_images"]
    assert n >= 95 and meta["anomaly"]["threshold_reached"]  # duplicates merged
    fresh = np.stack([np.repeat(c[..., None], 3, 2) for c in brick_crops(300, seed=4)])
    scores, _ = detector.score(fresh)
    alarms = int((scores > detector.threshold).sum())
    k = math.ceil((n + 1) * 0.9)
    low, high = betabinom(len(fresh), n + 1 - k, k).interval(0.95)
    assert low <= alarms <= high, (alarms, low, high)
    held = json.loads((root / "run" / "metrics.json").read_text())
    assert held["false_alarm_rate"] <= 0.1


def test_predict_and_explain_on_an_anomaly_run(brick_run, tmp_path):
    root, detector = brick_run
    rng = np.random.default_rng(9)
    good = brick_crops(1, seed=5)[0]
    bad, _ = paste(good, "blob", rng)
    Image.fromarray(good).save(tmp_path / "good.png")
    Image.fromarray(bad).save(tmp_path / "bad.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = runner.invoke(app, ["predict", str(root / "run"), str(tmp_path / "good.png"), str(tmp_path / "bad.png"),
                              str(tmp_path / "broken.png"), "--format", "json"])
    assert out.exit_code == 0, out.output
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r.get("label") for r in records] == ["normal", "anomaly", None]
    assert records[0]["anomaly_score"] < records[0]["threshold"] < records[1]["anomaly_score"]
    assert "error" in records[2]
    out = runner.invoke(app, ["explain", str(root / "run"), str(tmp_path / "bad.png"), "--out", str(tmp_path / "maps")])
    assert out.exit_code == 0, out.output
    picture = np.asarray(Image.open(tmp_path / "maps" / "bad.png"))
    assert picture.shape[2] == 3 and picture.shape[0] >= 224


def test_a_second_run_reuses_the_stored_patch_features_and_builds_the_same_bank(brick_run, tmp_path):
    root, detector = brick_run
    result = train(root / "good", tmp_path / "again", "--val-dir", str(root / "threshold"), "--anomaly-keep", "0.9",
                   "--anomaly-bank-mib", "0.5")
    assert "60 reused from the view store" in result.output
    meta = json.loads((tmp_path / "again" / "model.json").read_text())
    assert meta["anomaly"]["bank_rows"] == 0.5 * 2**20 // (4 * meta["anomaly"]["dims"])  # the cap, by a coreset
    assert "coreset" in meta["anomaly"]["coreset"]
    assert meta["anomaly"]["bank_rows"] < detector.meta["anomaly"]["bank_rows"]


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_bad_input_is_one_clear_line(brick_run, tmp_path):
    root, _ = brick_run
    write_folders(tmp_path / "one", {"good": brick_crops(1, seed=6)})
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "one" / "good"), "--out", str(tmp_path / "r1"),
                                       "--task", "anomaly"]), "1 good image(s)", "at least 2")
    assert not (tmp_path / "r1").exists()
    write_folders(tmp_path / "classes", {"good": brick_crops(3, seed=6), "bad": brick_crops(2, seed=7)})
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "classes"), "--out", str(tmp_path / "r2"),
                                       "--task", "anomaly", "--normal-class", "fine"]),
                   "--normal-class 'fine' names no class", "bad, good")
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "classes"), "--out", str(tmp_path / "r2"),
                                       "--task", "anomaly"]), "name the normal one with --normal-class")
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "classes"), "--out", str(tmp_path / "r2"),
                                       "--normal-class", "good"]), "normal_class is for --task anomaly")
    # a test folder without the normal class: the run's own ("normal": it trained on a folder of good images)
    one_line_error(runner.invoke(app, ["evaluate", str(root / "run"), str(tmp_path / "classes")]),
                   "no class 'normal'", "name another with --normal-class")
    one_line_error(runner.invoke(app, ["evaluate", str(root / "run"), str(tmp_path / "classes"), "--normal-class",
                                       "nothing"]), "no class 'nothing'")
    # an anomaly run where a classifier's option is needed (serve's and label's: tests/test_serve_anomaly.py,
    # tests/test_label_scores.py)
    one_line_error(runner.invoke(app, ["export", str(root / "run"), "--format", "openvino"]),
                   "an anomaly run exports to onnx only")
    # a damaged bank
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(root / "run", damaged)
    bank = damaged / "bank.safetensors"
    data = bytearray(bank.read_bytes())
    data[-100:] = bytes(100)
    bank.write_bytes(bytes(data))
    one_line_error(runner.invoke(app, ["predict", str(damaged), str(tmp_path / "classes" / "good" / "000.png")]),
                   "bank.safetensors: does not match the SHA-256")


def test_a_classifier_run_given_to_anomaly_evaluation_is_one_clear_line(binary_run, lfw_split):
    one_line_error(runner.invoke(app, ["evaluate", str(binary_run[1]), str(lfw_split[1]), "--normal-class", "face"]),
                   "a classifier run, not an anomaly run")


@BOTH
def test_onnx_export_carries_the_bank_and_gives_the_scores_and_maps_of_pytorch(method_run, tmp_path, request):
    import onnxruntime as ort

    root, detector = request.getfixturevalue(method_run)
    out = runner.invoke(app, ["export", str(root / "run"), "--out", str(tmp_path / "a.onnx")])
    assert out.exit_code == 0, out.output
    assert not list(tmp_path.glob("*.data"))  # the bank is inside the file, not beside it
    rng = np.random.default_rng(10)
    clean = brick_crops(3, seed=11)
    images = np.stack([np.repeat(c[..., None], 3, 2) for c in [*clean, paste(clean[0], "scratch", rng)[0]]])
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    scores, maps = session.run(None, {"images": images})
    want_scores, want_maps = detector.score(images, maps=True)
    assert np.abs(scores - want_scores).max() < 1e-4 * max(1.0, float(np.abs(want_scores).max()))
    assert np.abs(maps - want_maps).max() < 1e-3 * max(1.0, float(np.abs(want_maps).max()))
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "a.onnx")).metadata_props}
    assert props["task"] == "anomaly" and json.loads(props["threshold"]) == detector.threshold


def test_f1_threshold_is_the_best_cut_between_distinct_scores():
    from transferkit.openworld.anomaly import f1_threshold

    # flagging {6}: F1 2/3; {6, 5}: 1/2; {6, 5, 4}: 4/5 (the best); {6, 5, 4, 3}: 2/3
    assert f1_threshold(np.array([1, 2, 3, 5.0]), np.array([4, 6.0])) == 3.5
    # a perfect separation: halfway between the highest good score and the lowest anomalous one
    assert f1_threshold(np.array([1, 2, 3, 4.0]), np.array([5, 6.0])) == 4.5
    # flag {9}: 2/3, {9, 8}: 1/2, {9, 8, 7}: 4/5 (the best), {9, 8, 7, 1}: 2/3
    assert f1_threshold(np.array([8.0, 1.0]), np.array([9.0, 7.0])) == 4.0
    # equal F1 at two cuts (flag {9}: 2/3, flag all four: 2/3): the higher threshold, fewer false alarms
    assert f1_threshold(np.array([8.0, 7.5]), np.array([9.0, 7.0])) == 8.5
    # ties are never split: every score equal, so every image is flagged (F1 2/3 beats flagging none)
    t = f1_threshold(np.array([1.0, 1.0]), np.array([1.0]))
    assert t < 1.0 and t > 0.999


def test_a_few_labelled_defects_fit_the_threshold_at_the_best_f1(tmp_path):
    """--anomaly-threshold f1: the labelled anomalies (a class folder beside the normal one) are scored
    and never enter the bank; the threshold separates them from the held-out good images as well as
    any threshold can, and model.json says how it was fitted."""
    from transferkit.openworld.anomaly import f1_threshold

    good = brick_crops(40, seed=3)
    rng = np.random.default_rng(4)
    defects = [paste(image, "blob", rng)[0] for image in brick_crops(6, seed=4)]
    write_folders(tmp_path / "train", {"good": good, "defect": defects})
    result = train(tmp_path / "train", tmp_path / "run", "--normal-class", "good", "--anomaly-threshold", "f1")
    assert "the best F1 on 8 held-out good images and 6 labelled anomalies" in result.output
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["anomaly"]["threshold_rule"] == "f1" and meta["anomaly"]["threshold_anomalies"] == 6
    assert meta["anomaly"]["bank_images"] == 32 and meta["left_out"] == {"defect": 6}
    held = [float(row.split(",")[1]) for row in (tmp_path / "run" / "val_scores.csv").read_text().splitlines()[1:]]
    from transferkit.predict.anomaly_engine import load_detector

    detector = load_detector(tmp_path / "run")
    scores = [r["anomaly_score"] for r in detector.predict_files(sorted((tmp_path / "train" / "defect").iterdir()))]
    assert meta["threshold"] == pytest.approx(f1_threshold(np.array(held), np.array(scores)), rel=1e-5)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labelled_anomalies"]["flagged"] == sum(s > meta["threshold"] for s in scores)
    # without labelled anomalies the rule cannot be fitted: one line
    write_folders(tmp_path / "only", {"good": good})
    one_line_error(runner.invoke(app, ["train", str(tmp_path / "only"), "--out", str(tmp_path / "r2"), "--task",
                                       "anomaly", "--normal-class", "good", "--anomaly-threshold", "f1"]),
                   "--anomaly-threshold f1 fits the threshold on labelled anomalies")


def test_gaussians_per_cell_fit_the_cap_and_score_other_real_classes_higher(tmp_path):
    """--anomaly-method gaussian on the real LFW faces: the other classes score higher than held-out
    faces; the statistics fit the cap by using fewer channels, and the file holds what was fitted."""
    from safetensors.numpy import load_file

    from transferkit.openworld.anomaly import gaussian_channels

    images, labels = lfw_arrays()
    faces, backgrounds = images[labels == 1], images[labels == 0]
    write_folders(tmp_path / "train", {"face": list(faces[:70])})
    write_folders(tmp_path / "test", {"face": list(faces[70:]), "background": list(backgrounds[70:]),
                                      "texture": texture_crops(30, seed=5)})
    result = train(tmp_path / "train", tmp_path / "run", "--normal-class", "face", "--anomaly-method", "gaussian",
                   "--anomaly-bank-mib", "2")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    section = meta["anomaly"]
    cells = section["grid"] ** 2
    assert section["scorer"] == "gaussian" and section["channels"] == gaussian_channels(cells, section["dims"], 2.0)
    assert section["channels"] < section["dims"] and section["bank_mib"] <= 2.0  # 144 cells x 152^2 would be 13 MiB
    assert f"over {section['channels']} of {section['dims']} channels" in result.output
    stats = load_file(str(tmp_path / "run" / "bank.safetensors"))
    assert stats["precision"].shape == (cells, section["channels"], section["channels"])
    assert np.allclose(stats["precision"], np.transpose(stats["precision"], (0, 2, 1)), atol=1e-3)
    out = runner.invoke(app, ["evaluate", str(tmp_path / "run"), str(tmp_path / "test"), "--normal-class", "face",
                              "--output", str(tmp_path / "m.json")])
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["auroc"] > 0.9 and metrics["auroc_ci95"][0] > 0.75, metrics


def test_a_coreset_in_parts_covers_real_patches_almost_as_well_as_one_greedy_pass():
    """`coreset(chunks=8)` keeps n distinct rows whose covering radius (the farthest patch from its
    nearest kept one) is within 5 % of the single greedy pass's and below a random sample's; the
    default splits only when the greedy work passes GREEDY_WORK."""
    import torch
    from skimage import data

    from transferkit.openworld.anomaly import GREEDY_WORK, coreset, coreset_chunks

    faces = torch.from_numpy(data.lfw_subset()).float()
    patches = faces.unfold(1, 5, 2).unfold(2, 5, 2).reshape(-1, 25)  # 24,200 real 5 x 5 patches

    def radius(index):
        return torch.cdist(patches, patches[index]).min(1).values.max().item()

    whole, parts = coreset(patches, 300, 0, chunks=1), coreset(patches, 300, 0, chunks=8)
    sample = torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:300]
    assert len(parts) == len(set(parts.tolist())) == 300
    assert radius(parts) <= 1.05 * radius(whole) and radius(parts) < radius(sample)
    assert torch.equal(coreset(patches, 300, 0), whole)  # a small pool: one part by default
    assert coreset_chunks(137_970, 13_797) == 1 and coreset_chunks(848_288, 172_463) == 37
    assert coreset_chunks(848_288, 172_463) * GREEDY_WORK >= 848_288 * 172_463
