"""`transferkit check` and the group-aware validation split, on real images: tiles of scikit-image's
texture photos (brick, grass, gravel: distinct images of one class that look alike, the hard case
for precision) and scikit-image / scikit-learn photos, with planted copies made as users make them
(JPEG quality 60, resized, slightly cropped, brightness-shifted)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from transferkit.cli import app
from transferkit.curate.check import KINDS, Thresholds, run_check, write_outputs
from transferkit.data.listing import LabelledImages, from_csv
from transferkit.data.phash import MATCH, SCALES, THUMB, clusters, match, nearest, phash, thumbnails
from transferkit.data.split import group_split, split_groups
from transferkit.utils.errors import ConfigError, DataError

TILE = 96


def tiles(name: str, side: int = TILE) -> list[np.ndarray]:
    """Non-overlapping side x side tiles of one of scikit-image's 512 x 512 texture photos."""
    from skimage import data

    photo = getattr(data, name)()
    return [np.ascontiguousarray(photo[y:y + side, x:x + side])
            for y in range(0, photo.shape[0] - side + 1, side) for x in range(0, photo.shape[1] - side + 1, side)]


def photos() -> list[np.ndarray]:
    """Ten different real photos (RGB), each shrunk to 160 px on its long side."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    found = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera(),
             data.hubble_deep_field(), data.retina(), data.immunohistochemistry(), *load_sample_images().images]
    out = []
    for image in found:
        picture = Image.fromarray(image).convert("RGB")
        picture.thumbnail((160, 160))
        out.append(np.asarray(picture))
    return out


def copy_of(image: np.ndarray, kind: str) -> Image.Image:
    picture = Image.fromarray(image)
    w, h = picture.size
    if kind == "jpeg60":  # re-encoded at quality 60, then kept losslessly
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resized":
        return picture.resize((w * 2 // 3, h * 2 // 3), Image.Resampling.BILINEAR)
    if kind == "brighter":
        return ImageEnhance.Brightness(picture).enhance(1.15)
    if kind == "cropped":
        dx, dy = round(w * 0.04), round(h * 0.04)
        return picture.crop((dx, dy, w - dx, h - dy))
    raise ValueError(kind)


def save(root, name: str, images, prefix: str = "") -> list[str]:
    (root / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = root / name / f"{prefix}{i:03d}.png"
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """train/: 20 brick and 20 grass tiles; test/: 5 other tiles of each (distinct, same classes)
    plus copies of 3 training tiles of each class, one per kind the hash catches. Returns the root
    and {copy path: its original}."""
    root = tmp_path_factory.mktemp("planted")
    origin = {}
    for name in ("brick", "grass"):
        found = tiles(name)
        save(root / "train", name, found[:20])
        save(root / "test", name, found[20:25])
        for i, kind in enumerate(("jpeg60", "resized", "brighter")):
            path = root / "test" / name / f"copy-{kind}.png"
            copy_of(found[3 * i], kind).save(path)
            origin[str(path)] = str(root / "train" / name / f"{3 * i:03d}.png")
    return root, origin


def pairs_of(report, kind: str) -> set[frozenset]:
    return {frozenset(p) for f in report.findings if f.kind == kind for p in
            [(a, b) for i, a in enumerate(f.paths) for b in f.paths[i + 1:]]}


# -- the perceptual hash -------------------------------------------------------------------------

def test_phash_is_imagehash_bit_for_bit():
    """Golden values from imagehash 4.3.2's `phash` on the same 224 px images; where imagehash is
    installed, compared directly as well."""
    from skimage import data

    golden = {"astronaut": "c2924c5532bddfc8", "coffee": "bb8320376c0f3637", "chelsea": "b15fe6465121175e"}
    images = [np.asarray(Image.fromarray(getattr(data, name)()).resize((224, 224))) for name in golden]
    for name, bits in zip(golden, phash(np.stack(images))):
        assert f"{int(''.join('1' if b else '0' for b in bits), 2):016x}" == golden[name]
    try:
        import imagehash
    except ImportError:
        return
    for image, bits in zip(images, phash(np.stack(images))):
        assert (imagehash.phash(Image.fromarray(image)).hash.flatten() == bits).all()


def test_nearest_is_exact_and_blocked():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    index, score = nearest(x, 3, block_bytes=4 * 300 * 7)  # 7 rows per block
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1)[:, :3]
    assert (index == expected).all()
    assert np.allclose(score, np.take_along_axis(full, expected, axis=1), atol=1e-5)


# -- check without a backbone (the hash pass) ------------------------------------------------------

def test_hash_pass_finds_planted_copies_as_leaks_and_pairs_no_distinct_tiles(planted):
    root, origin = planted
    report = run_check(root / "train", test_data=root / "test", embeddings=False)
    leaks = pairs_of(report, "leak")
    expected = {frozenset(pair) for pair in origin.items()}
    assert expected <= leaks, sorted(map(sorted, expected - leaks))  # recall 1 on these kinds
    assert leaks == expected  # precision 1: no two distinct tiles paired
    assert not pairs_of(report, "near_duplicate") - expected
    assert report.findings[0].kind == "leak"  # leakage is the first thing shown
    assert report.exit_code == 1


def test_clean_data_exits_0_and_the_table_says_so(planted, tmp_path):
    root, _ = planted
    result = CliRunner().invoke(app, ["check", str(root / "train"), "--no-features", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "no leakage, no conflicting labels" in result.output
    assert "train: 40 usable of 40 file(s), 0 unreadable; classes: brick 20, grass 20" in result.output


def test_json_schema_exit_1_and_the_page(planted, tmp_path):
    root, origin = planted
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["check", str(root / "train"), "--test-dir", str(root / "test"), "--no-features",
                                      "--format", "json", "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    document = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(document["findings"], list) and document["findings"]
    for finding in document["findings"]:
        assert finding["kind"] in KINDS
        assert isinstance(finding["paths"], list) and all(isinstance(p, str) for p in finding["paths"])
        assert "score" in finding
    assert document["findings"][0]["kind"] == "leak"
    assert document["counts"]["leak"] == len(origin)
    page = (out / "check.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 * len(origin)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing from the network
    assert json.loads((out / "check.json").read_text())["counts"] == document["counts"]


def test_conflicting_labels_in_a_cluster(tmp_path):
    found = tiles("brick")
    save(tmp_path / "data", "brick", found[:8])
    save(tmp_path / "data", "grass", tiles("grass")[:8])
    copy_of(found[2], "jpeg60").save(tmp_path / "data" / "grass" / "relabelled.png")
    report = run_check(tmp_path / "data", embeddings=False)
    conflicts = [f for f in report.findings if f.kind == "label_conflict"]
    assert len(conflicts) == 1 and set(conflicts[0].detail["labels"]) == {"brick", "grass"}
    assert report.exit_code == 1 and not report.count("leak")


def test_unreadable_files_are_counted_and_listed(planted, tmp_path):
    root, _ = planted
    data = tmp_path / "data"
    save(data, "brick", tiles("brick")[:4])
    save(data, "grass", tiles("grass")[:4])
    (data / "brick" / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "grass" / "empty.jpg").write_bytes(b"")
    result = CliRunner().invoke(app, ["check", str(data), "--no-features", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "train: 8 usable of 10 file(s), 2 unreadable" in result.output
    assert "broken.png" in result.output and "empty.jpg" in result.output


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "flat").mkdir() or p / "flat", "no class folders"),
])
def test_bad_input_is_one_line(tmp_path, make, message):
    result = CliRunner().invoke(app, ["check", str(make(tmp_path)), "--no-features", "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_one_image_and_a_missing_test_dir(tmp_path):
    save(tmp_path / "one", "brick", tiles("brick")[:1])
    report = run_check(tmp_path / "one", embeddings=False)
    assert report.exit_code == 0 and report.summary["train"]["usable"] == 1
    with pytest.raises(DataError, match="--test-dir"):
        run_check(tmp_path / "one", test_data=tmp_path / "nope", embeddings=False)
    with pytest.raises(DataError, match="cosine"):
        Thresholds(cosine=3)


# -- the group-aware split -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(25))
def test_group_split_never_splits_a_group(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 400))
    labels = rng.integers(0, int(rng.integers(2, 5)), n)
    groups = rng.integers(0, max(4, n // int(rng.integers(2, 8))), n)
    for c in np.unique(labels):  # every class in at least two groups
        members = np.flatnonzero(labels == c)
        groups[members[0]], groups[members[-1]] = 10_000 + 2 * c, 10_001 + 2 * c
    train, val = group_split(labels, groups, 0.2, seed)
    assert len(train) + len(val) == n and not set(train) & set(val)
    assert not set(groups[train]) & set(groups[val])
    assert set(labels[train]) == set(labels[val]) == set(labels)  # every class on both sides
    assert 0.05 < len(val) / n < 0.45


def test_group_split_is_the_plain_split_without_groups_and_refuses_a_one_group_class():
    labels = np.array([0] * 10 + [1] * 10)
    from transferkit.data.split import stratified_split

    assert all((a == b).all() for a, b in zip(group_split(labels, None, 0.2, 3), stratified_split(labels, 0.2, 3)))
    assert all((a == b).all() for a, b in zip(group_split(labels, np.arange(20), 0.2, 3),
                                              stratified_split(labels, 0.2, 3)))
    groups = np.r_[np.zeros(10), np.arange(1, 11)]
    with pytest.raises(DataError, match="'cats': all of its images are in one group"):
        group_split(labels, groups, 0.2, 0, ["cats", "dogs"])


def test_split_groups_from_a_pattern_a_csv_column_and_near_duplicates(tmp_path):
    found = tiles("brick")[:6]
    images = np.stack([np.asarray(Image.fromarray(t).convert("RGB").resize((64, 64))) for t in found])
    near = np.asarray(copy_of(images[0], "brighter"))
    data = LabelledImages([f"/d/patient{i % 3}/x{i}.png" for i in range(7)], np.zeros(7, int), ["a", "b"],
                          images=np.concatenate([images, near[None]]))
    ids, notes = split_groups(data, r"patient(\d+)/", duplicates=False)
    assert len(set(ids)) == 3 and "found 3 group(s) in 7 path(s)" in notes[0]
    ids, notes = split_groups(data, None, duplicates=True)
    assert ids[6] == ids[0] and len(set(ids)) == 6 and "1 near-duplicate cluster(s) of 2 images" in notes[0]
    with pytest.raises(DataError, match="names a group in none of the 7 paths"):
        split_groups(data, r"visit(\d+)", duplicates=False)
    from transferkit.cfg.settings import TrainConfig

    with pytest.raises(ConfigError, match="group in parentheses"):
        TrainConfig(group_by="patient")
    with pytest.raises(ConfigError, match="regular expression"):
        TrainConfig(group_by="(unclosed")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,group\na.png,x,p1\nb.png,x,p1\nc.png,y,\n")
    listed = from_csv(csv)
    assert listed.groups[0] == listed.groups[1] != listed.groups[2]


def pil_windows(thumb: np.ndarray) -> np.ndarray:
    """The windows `match` compares, one PIL resize each (mode F: no rounding), centred, unit length."""
    picture = Image.fromarray(thumb.astype(np.float32), mode="F")
    boxes = [(0.0, 0.0, float(THUMB), float(THUMB))]
    for s in SCALES[1:]:
        side = s * THUMB
        for y in (0.0, (THUMB - side) / 2, THUMB - side):
            for x in (0.0, (THUMB - side) / 2, THUMB - side):
                boxes.append((x, y, x + side, y + side))
    v = np.stack([np.asarray(picture.resize((MATCH, MATCH), Image.Resampling.BILINEAR, box=b)).ravel()
                  for b in boxes]).astype(np.float64)
    v -= v.mean(1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)


def test_match_is_the_best_window_correlation_that_pil_resizes_give():
    """The batched products equal a window-by-window PIL computation on real photos, either way
    round, and a 10 % crop of a photo matches it while another photo does not."""
    from skimage import data

    faces = (data.lfw_subset()[:60] * 255).round().astype(np.uint8)
    crop = faces[0][1:24, 1:24]
    thumbs = thumbnails(np.concatenate([faces, np.asarray(Image.fromarray(crop).resize((25, 25)))[None]]))
    rng = np.random.default_rng(0)
    pairs = np.array([(a, b) for a, b in rng.integers(0, len(thumbs), (200, 2)) if a != b] + [(0, 60), (1, 60)])
    got = match(thumbs, pairs)
    windows = {i: pil_windows(thumbs[i]) for i in np.unique(pairs)}
    want = [max((windows[i] @ windows[j][0]).max(), (windows[j] @ windows[i][0]).max()) for i, j in pairs]
    assert np.abs(got - np.array(want)).max() < 1e-5
    assert got[-2] >= 0.95 > got[-1]


def test_clusters_are_connected_components():
    assert clusters(6, [(0, 1), (1, 2), (4, 5)]).tolist() == [0, 0, 0, 1, 2, 2]


def test_look_alike_digits_pair_at_the_default_match_and_not_at_0998_while_a_copy_stays_found(tmp_path):
    """docs/check.md's sweep in small: distinct 8 px drawings of one digit (scikit-learn's digits,
    at 32 px as the benchmark suite writes them) are confirmed as near-duplicates at the default
    --min-match 0.95; at 0.998 none is, and a JPEG-60 copy planted in test/ is still a leak."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(400):
        picture = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        (tmp_path / "train" / str(digits.target[i])).mkdir(parents=True, exist_ok=True)
        picture.save(tmp_path / "train" / str(digits.target[i]) / f"{i:03d}.png")
    original = tmp_path / "train" / str(digits.target[7]) / "007.png"
    (tmp_path / "test" / str(digits.target[7])).mkdir(parents=True)
    copy = tmp_path / "test" / str(digits.target[7]) / "copy.png"
    copy_of(np.asarray(Image.open(original)), "jpeg60").save(copy)
    found = {}
    for match in ("0.95", "0.998"):
        result = CliRunner().invoke(app, ["check", str(tmp_path / "train"), "--test-dir", str(tmp_path / "test"),
                                          "--no-features", "--format", "json", "--quiet", "--min-match", match])
        assert result.exit_code == 1, result.output  # the planted copy leaks at both
        document = json.loads(result.stdout.strip().splitlines()[-1])
        assert document["thresholds"]["min_match"] == float(match)
        leaks = [set(f["paths"]) for f in document["findings"] if f["kind"] == "leak"]
        assert any({str(copy), str(original)} <= cluster for cluster in leaks), leaks
        found[match] = [f for f in document["findings"] if f["kind"] == "near_duplicate"
                        and str(copy) not in f["paths"]]
    assert len(found["0.95"]) >= 3, found["0.95"]  # look-alikes confirmed at the default
    assert found["0.998"] == []


# -- with the backbone (slow) ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def featured(tmp_path_factory):
    """train/: 10 real photos (class photo), 12 gravel tiles (class texture) and one more tile
    labelled photo (a planted mislabel); test/: 3 other tiles, and 4 % crops of 3 photos and 2
    tiles from train/."""
    root = tmp_path_factory.mktemp("featured")
    pictures, gravel = photos(), tiles("gravel", 128)
    save(root / "train", "photo", pictures)
    save(root / "train", "texture", gravel[:12])
    Image.fromarray(gravel[12]).save(root / "train" / "photo" / "mislabelled.png")
    save(root / "test", "texture", gravel[13:16])
    (root / "test" / "photo").mkdir(parents=True)
    origin = {}
    for i in (0, 2, 4):
        path = root / "test" / "photo" / f"crop{i}.png"
        copy_of(pictures[i], "cropped").save(path)
        origin[str(path)] = str(root / "train" / "photo" / f"{i:03d}.png")
    for i in (1, 5):
        path = root / "test" / "texture" / f"crop{i}.png"
        copy_of(gravel[i], "cropped").save(path)
        origin[str(path)] = str(root / "train" / "texture" / f"{i:03d}.png")
    report = run_check(root / "train", test_data=root / "test", cache_dir=str(root / "cache"))
    return root, origin, report


@pytest.mark.slow
def test_features_find_cropped_copies_and_pair_no_distinct_images(featured):
    root, origin, report = featured
    leaks = pairs_of(report, "leak")
    expected = {frozenset(pair) for pair in origin.items()}
    assert len(expected & leaks) >= 4, report.findings  # recall >= 0.8 on 4 % crops
    assert not leaks - expected  # precision 1: no distinct tile or photo paired


@pytest.mark.slow
def test_a_planted_mislabel_ranks_high(featured):
    root, _, report = featured
    issues = [f.paths[0] for f in report.findings if f.kind == "label_issue"]
    assert str(root / "train" / "photo" / "mislabelled.png") in issues[:2], issues


@pytest.mark.slow
def test_a_second_check_reads_the_stored_features(featured):
    root, _, first = featured
    again = run_check(root / "train", test_data=root / "test", cache_dir=str(root / "cache"))
    n = first.summary["train"]["usable"] + first.summary["test"]["usable"]
    assert f"view store: {n} of {n} images' features reused" in again.notes
    assert [(f.kind, f.paths) for f in again.findings] == [(f.kind, f.paths) for f in first.findings]
    write_outputs(again, root / "out")
    assert (root / "out" / "check.html").stat().st_size > 10_000


def test_the_duplicate_and_outlier_passes_share_one_feature_search(monkeypatch):
    """`Images.neighbours` searches once for the larger k; a smaller ask is the search's own slice."""
    import transferkit.curate.check as check
    from skimage import data

    faces = data.lfw_subset()[:80].reshape(80, -1).astype(np.float32)
    images = check.Images(paths=[str(i) for i in range(80)], features=faces)
    calls = []
    monkeypatch.setattr(check, "nearest", lambda x, k: calls.append(k) or nearest(x, k))
    first = images.neighbours(10, at_least=30)
    second = images.neighbours(25)
    direct = nearest(check.unit(faces), 25)
    assert calls == [30]
    assert np.array_equal(second[0], direct[0]) and np.allclose(second[1], direct[1])
    assert np.array_equal(first[0], direct[0][:, :10])
    images.neighbours(40)
    assert calls == [30, 40]


def test_outlier_scores_search_deeper_only_for_the_rows_of_a_large_cluster(monkeypatch):
    """The mean distance to the k nearest images outside one's cluster, as a brute-force reference
    gives it, also for members of a cluster larger than the shared search is deep; only those rows
    are searched again."""
    import transferkit.curate.check as check
    from skimage import data

    faces = data.lfw_subset().reshape(200, -1).astype(np.float32)
    faces[:60] = faces[0] + np.random.default_rng(0).normal(0, 0.01, (60, faces.shape[1]))  # 60 copies of a face
    images = check.Images(paths=[str(i) for i in range(200)], features=faces)
    ids = np.arange(200)
    ids[:60] = 0  # one cluster deeper than k + NEIGHBOUR_SPARE (10 + 32)
    ids[60:63] = 1
    asked = []
    real = check.nearest
    monkeypatch.setattr(check, "nearest", lambda x, k, queries=None: asked.append(
        None if queries is None else len(queries)) or real(x, k, queries=queries))
    scores = check.outlier_scores(images, ids, 10)
    unit = check.unit(faces)
    sims = unit @ unit.T
    expected = np.array([1.0 - np.sort(sims[i][ids != ids[i]])[::-1][:10].mean() for i in range(200)])
    assert np.allclose(scores, expected, atol=1e-5)
    assert asked[0] is None and len(asked) == 2 and 0 < asked[1] <= 60
