"""`transferkit check` measured: near-duplicate recall and precision on planted copies of real
images, the thresholds' evidence, duplicates and leaks in the benchmark suite's sets, and time.
Writes bench/results/check.json (each part updates its own entry), except for the parts with a
table in docs/check.md, each in its own file: the threshold sweep (check_sweep.json), the suite's
clusters (check_suite_hash.json, check_suite_features.json) and the Fashion-MNIST timing
(check_time.json).

    python bench/check.py planted --sets elpv textures   # copies of each kind: recall, precision
    python bench/check.py suite                          # clusters and leaks in data/suite/*
    python bench/check.py timing --n 1000                # cold and warm, this many ELPV images
    python bench/check.py knn                            # the nearest-neighbour step alone, 10k and 50k
    python bench/check.py sweep --sets elpv digits textures lfw   # recall and false pairs per threshold
    python bench/check.py fashion --sizes 1000 10000     # cold and warm time on Fashion-MNIST PNGs

Copies: JPEG quality 60, resized to half, cropped 4 % and 10 % a side, brightness +15 %. Each set's
originals go to train/ (their own classes), the copies to test/; a copy counts as found when `check`
links it to its original (a leak); precision counts every linked pair that is not (copy, original),
the pairs of distinct originals included.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).parent))
from results import RESULTS, Quiet, write  # noqa: E402

KINDS = ("jpeg60", "resized50", "crop4", "crop10", "bright15")


def copy_of(picture: Image.Image, kind: str) -> Image.Image:
    w, h = picture.size
    if kind == "jpeg60":
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resized50":
        return picture.resize((max(8, w // 2), max(8, h // 2)), Image.Resampling.BILINEAR)
    if kind.startswith("crop"):
        f = int(kind[4:]) / 100
        dx, dy = max(1, round(w * f)), max(1, round(h * f))
        return picture.crop((dx, dy, w - dx, h - dy))
    if kind == "bright15":
        return ImageEnhance.Brightness(picture).enhance(1.15)
    raise ValueError(kind)


def real_set(name: str, limit: int | None = None, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """(image, class) of a real set, `limit` of them drawn at random."""
    if name == "elpv":
        from prepare_elpv import elpv_labels

        paths, labels = elpv_labels()
        found = [(Image.open(p).copy(), ["functional", "defective"][y]) for p, y in zip(paths, labels)]
    elif name == "textures":
        from skimage import data

        found = []
        for cls in ("brick", "grass", "gravel"):
            photo = getattr(data, cls)()
            found += [(Image.fromarray(np.ascontiguousarray(photo[y:y + 64, x:x + 64])), cls)
                      for y in range(0, photo.shape[0] - 63, 64) for x in range(0, photo.shape[1] - 63, 64)]
    elif name == "digits":  # as bench/suite.py writes them: 8 px drawings shown at 32 px
        from sklearn.datasets import load_digits

        digits = load_digits()
        found = [(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR), str(t))
                 for x, t in zip(digits.images, digits.target)]
    elif name == "lfw":
        from skimage.data import lfw_subset

        images = (lfw_subset() * 255).round().astype(np.uint8)
        found = [(Image.fromarray(x), "face" if i < 100 else "background") for i, x in enumerate(images)]
    else:
        raise SystemExit(f"unknown set {name}")
    if limit and limit < len(found):
        pick = np.sort(np.random.default_rng(seed).choice(len(found), limit, replace=False))
        found = [found[i] for i in pick]
    return found


def planted(sets: list[str], n_originals: int, copies: int, cache: Path) -> list[dict]:
    from transferkit.curate.check import run_check

    rows = []
    for name in sets:
        found = real_set(name, n_originals)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for i, (picture, cls) in enumerate(found):
                (root / "train" / cls).mkdir(parents=True, exist_ok=True)
                picture.save(root / "train" / cls / f"{i:05d}.png")
            rng = np.random.default_rng(1)
            origin = {}
            for kind in KINDS:
                for i in rng.choice(len(found), copies, replace=False):
                    picture, cls = found[i]
                    folder = root / "test" / cls
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"{kind}-{i:05d}.png"
                    copy_of(picture, kind).save(path)
                    origin[str(path)] = (str(root / "train" / cls / f"{i:05d}.png"), kind)
            started = time.perf_counter()
            report = run_check(root / "train", test_data=root / "test", cache_dir=str(cache))
            seconds = time.perf_counter() - started
            linked = set()
            for f in report.findings:
                if f.kind in ("exact_duplicate", "near_duplicate"):
                    for pair in f.detail["pairs"]:
                        linked.add(frozenset((pair["a"], pair["b"])))
            clusters = [set(f.paths) for f in report.findings if f.kind in ("exact_duplicate", "near_duplicate")]
            row = {"set": name, "originals": len(found), "copies_per_kind": copies, "seconds": round(seconds, 1),
                   "thresholds": {"phash_distance": report.thresholds.phash_distance,
                                  "cosine": report.thresholds.cosine}, "kinds": {}}
            for kind in KINDS:
                mine = [(c, o) for c, (o, k) in origin.items() if k == kind]
                found_kind = sum(any(c in cl and o in cl for cl in clusters) for c, o in mine)
                row["kinds"][kind] = {"recall": round(found_kind / len(mine), 3), "found": found_kind, "of": len(mine)}
            # a linked pair is right when both are copies of one original (or one is the original)
            def right(pair) -> bool:
                a, b = tuple(pair)
                oa = origin.get(a, (a,))[0]
                ob = origin.get(b, (b,))[0]
                return oa == ob
            wrong = [sorted(p) for p in linked if not right(p)]
            row["linked_pairs"] = len(linked)
            row["wrong_pairs"] = len(wrong)
            row["precision"] = round(1 - len(wrong) / max(len(linked), 1), 3)
            row["wrong_examples"] = wrong[:5]
            row["distinct_originals_linked"] = sum(1 for p in wrong if not (set(p) & set(origin)))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "wrong_examples"}), flush=True)
    return rows


def measured_distances(sets: list[str], n_originals: int, copies: int, cache: Path) -> list[dict]:
    """Per set and kind: percentiles of copy-original Hamming distance and cosine; of distinct
    originals' nearest-neighbour Hamming distance and cosine."""
    from transferkit.curate.check import Embedder, unit
    from transferkit.data.decode import read_image
    from transferkit.data.listing import image_key
    from transferkit.data.phash import match, nearest, phash, signs, thumbnails

    embed = Embedder(cache_dir=str(cache))
    rows = []

    def decoded(picture: Image.Image) -> np.ndarray:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        return read_image(io.BytesIO(buffer.getvalue()), embed.size)

    def features(images: np.ndarray) -> np.ndarray:
        return np.concatenate([embed(images[i:i + 256], [image_key(x) for x in images[i:i + 256]])
                               for i in range(0, len(images), 256)])

    for name in sets:
        found = real_set(name, n_originals)
        originals = np.stack([decoded(p) for p, _ in found])
        f, bits, thumbs = unit(features(originals)), phash(originals), thumbnails(originals)
        cos_index, cos = nearest(f, 3)
        hash_index, hs = nearest(signs(bits), 3)
        ham = (64 - hs[:, 0]) / 2
        n = len(found)
        candidates = np.unique(np.sort(np.r_[np.c_[np.repeat(np.arange(n), 3), cos_index.ravel()],
                                             np.c_[np.repeat(np.arange(n), 3), hash_index.ravel()]], axis=1), axis=0)
        distinct_match = match(thumbs, candidates)
        row = {"set": name, "originals": len(found),
               "distinct_nearest_cosine_percentiles_50_90_99_100": np.round(
                   np.percentile(cos[:, 0], [50, 90, 99, 100]), 4).tolist(),
               "distinct_nearest_hamming_percentiles_0_1_10_50": np.percentile(ham, [0, 1, 10, 50]).tolist(),
               "distinct_candidates": len(candidates),
               "distinct_candidate_match_percentiles_50_90_99_100": np.round(
                   np.percentile(distinct_match, [50, 90, 99, 100]), 4).tolist(),
               "distinct_candidates_matching_0.90_0.95_0.98": [int((distinct_match >= t).sum()) for t in (.9, .95, .98)],
               "kinds": {}}
        pick = np.random.default_rng(1).choice(len(found), min(copies, len(found)), replace=False)
        for kind in KINDS:
            made = np.stack([decoded(copy_of(found[i][0], kind)) for i in pick])
            cosine = (unit(features(made)) * f[pick]).sum(1)
            hamming = (phash(made) != bits[pick]).sum(1)
            both = np.concatenate([thumbs, thumbnails(made)])
            matched = match(both, np.c_[pick, n + np.arange(len(pick))])
            row["kinds"][kind] = {"cosine_percentiles_0_10_50": np.round(np.percentile(cosine, [0, 10, 50]), 4).tolist(),
                                  "hamming_percentiles_50_90_100": np.percentile(hamming, [50, 90, 100]).tolist(),
                                  "match_percentiles_0_10_50": np.round(np.percentile(matched, [0, 10, 50]), 4).tolist(),
                                  "match_at_least_0.95": round(float((matched >= 0.95).mean()), 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


SWEEP_PHASH = (-1, 2, 4, 6, 8, 10)
SWEEP_COSINE = (0.85, 0.90, 0.95, 2.0)  # 2.0: the feature pass off
SWEEP_MATCH = (0.90, 0.95, 0.98, 0.99, 0.995, 0.998)


def sweep(sets: list[str], n_originals: int | None, copies: int, cache: Path) -> list[dict]:
    """Every set whole (or `n_originals` of it) plus `copies` planted copies of each kind, one
    `check` pass as `run_check` proposes pairs (each image's 10 nearest hashes and 10 nearest
    features, `duplicate_edges`) at the loosest thresholds swept; each proposed pair keeps its
    Hamming distance, cosine and thumbnail match, so that every threshold triple is evaluated on
    the same pairs: a copy is found when the pair (copy, its original) is confirmed; a false pair
    is a confirmed pair of two originals (distinct images of the set: none of these sets holds
    exact copies), and the clusters and label conflicts they make among the originals."""
    from transferkit.curate.check import Embedder, Images, Thresholds, duplicate_edges, unit
    from transferkit.data.decode import read_image
    from transferkit.data.listing import image_key
    from transferkit.data.phash import clusters, phash, thumbnails

    embed = Embedder(cache_dir=str(cache))
    loose = Thresholds(phash_distance=max(SWEEP_PHASH), cosine=min(SWEEP_COSINE), min_match=-1.0)
    rows = []
    for name in sets:
        started = time.perf_counter()
        found = real_set(name, n_originals)
        rng = np.random.default_rng(1)
        pictures, labels, origin, kinds = [p for p, _ in found], [c for _, c in found], list(range(len(found))), [None] * len(found)
        for kind in KINDS:
            for i in rng.choice(len(found), min(copies, len(found)), replace=False):
                pictures.append(copy_of(found[i][0], kind))
                labels.append(found[i][1])
                origin.append(int(i))
                kinds.append(kind)
        decoded = []
        for picture in pictures:
            buffer = io.BytesIO()
            picture.save(buffer, "PNG")
            decoded.append(read_image(io.BytesIO(buffer.getvalue()), embed.size))
        images = Images(paths=[str(i) for i in range(len(decoded))], sets=["train"] * len(decoded),
                        labels=labels, keys=[image_key(x) for x in decoded])
        feats = []
        for i in range(0, len(decoded), 256):
            batch = np.stack(decoded[i:i + 256])
            images.bits.extend(phash(batch))
            images.thumbs.extend(thumbnails(batch))
            feats.append(embed(batch, images.keys[i:i + 256]))
        images.features = np.concatenate(feats)
        _, evidence = duplicate_edges(images, loose)
        n = len(found)
        f, bits = unit(images.features), np.asarray(images.bits)
        pairs = np.array(list(evidence), dtype=np.int64).reshape(-1, 2)
        hashed = np.array(["hamming" in evidence[tuple(p)] for p in pairs], bool)
        featured = np.array(["cosine" in evidence[tuple(p)] for p in pairs], bool)
        same = np.array([evidence[tuple(p)].get("same_pixels", False) for p in pairs], bool)
        ham = (bits[pairs[:, 0]] != bits[pairs[:, 1]]).sum(1) if len(pairs) else np.zeros(0, int)
        cos = (f[pairs[:, 0]] * f[pairs[:, 1]]).sum(1) if len(pairs) else np.zeros(0)
        matched = np.array([evidence[tuple(p)].get("match", 1.0 if same[k] else -1.0) for k, p in enumerate(pairs)])
        a, b = (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.zeros(0, int), np.zeros(0, int))
        distinct = (a < n) & (b < n)
        origin_arr = np.array(origin)
        copy_pair = (b >= n) & (origin_arr[b] == a) if len(pairs) else np.zeros(0, bool)
        grid = []
        for d in SWEEP_PHASH:
            for c in SWEEP_COSINE:
                for m in SWEEP_MATCH:
                    ok = same | (((hashed & (ham <= d)) | (featured & (cos >= c))) & (matched >= m))
                    recall = {}
                    for kind in KINDS:
                        mine = [k for k in range(n, len(origin)) if kinds[k] == kind]
                        hit = {int(x) for x in b[ok & copy_pair]}
                        recall[kind] = round(sum(k in hit for k in mine) / max(len(mine), 1), 3)
                    false = ok & distinct
                    ids = clusters(n, pairs[false]) if false.any() else np.arange(n)
                    sizes = np.bincount(ids)
                    members: dict[int, set] = {}
                    for i, cid in enumerate(ids):
                        if sizes[cid] > 1:
                            members.setdefault(int(cid), set()).add(labels[i])
                    grid.append({"phash_distance": d, "cosine": c, "min_match": m, "recall": recall,
                                 "false_pairs": int(false.sum()), "false_clusters": int((sizes > 1).sum()),
                                 "images_in_false_clusters": int(sizes[sizes > 1].sum()),
                                 "label_conflicts": sum(len(v) > 1 for v in members.values())})
        def pct(x, q):
            return np.round(np.percentile(x, q), 4).tolist() if len(x) else None
        row = {"set": name, "originals": n, "copies_per_kind": min(copies, n), "proposed_pairs": len(pairs),
               "distinct_match_percentiles_50_90_99_100": pct(matched[distinct & ~same], [50, 90, 99, 100]),
               "copy_match_percentiles_0_1_10": {kind: pct(matched[copy_pair & (np.array(kinds + [None])[np.minimum(b, len(kinds))] == kind)], [0, 1, 10])
                                                 for kind in KINDS},
               "seconds": round(time.perf_counter() - started, 1), "grid": grid}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "grid"}), flush=True)
    return rows


def sweep_tables(rows: list[dict], phash: int = 6, cosine: float = 0.90, match: float = 0.95) -> dict:
    """docs/check.md's tables: recall and false pairs per --min-match at the other defaults, and per
    proposal threshold (hash bits, cosine) at the default --min-match."""
    kinds = [{"title": kind, "key": kind, "format": "{:.2f}"} for kind in KINDS]
    by_match = []
    for row in rows:
        for g in row["grid"]:
            if (g["phash_distance"], g["cosine"]) == (phash, cosine):
                by_match.append({"set": row["set"], "min_match": g["min_match"], **g["recall"],
                                 "false_pairs": g["false_pairs"], "false_clusters": g["false_clusters"],
                                 "conflicts": g["label_conflicts"]})
    counted = {"title": "false pairs", "key": "false_pairs"}
    by_proposal = []
    sets = {row["set"]: row for row in rows}
    natural = [name for name in ("textures", "lfw") if name in sets]
    for d in SWEEP_PHASH:
        for c in SWEEP_COSINE:
            cell = {name: next(g for g in sets[name]["grid"] if (g["phash_distance"], g["cosine"], g["min_match"])
                               == (d, c, match)) for name in sets}
            found = [v for name in natural for v in cell[name]["recall"].values()]
            by_proposal.append({"phash_distance": "off" if d < 0 else d, "cosine": "off" if c > 1 else f"{c:.2f}",
                                **{f"{name}_recall": (sum(cell[name]["recall"].values()) / len(KINDS)) for name in sets},
                                "natural_min": min(found) if found else None,
                                **{f"{name}_false": cell[name]["false_pairs"] for name in sets},
                                **{f"{name}_clusters": cell[name]["false_clusters"] for name in sets}})
    proposal_columns = ([{"title": "hash bits", "key": "phash_distance"}, {"title": "cosine", "key": "cosine"}]
                        + [{"title": f"{name}: mean recall", "key": f"{name}_recall", "format": "{:.2f}"}
                           for name in sets]
                        + [{"title": "textures + lfw: lowest kind", "key": "natural_min", "format": "{:.2f}"}]
                        + [{"title": f"{name}: false pairs (clusters)", "key": f"{name}_false"} for name in sets])
    for r in by_proposal:
        for name in sets:
            r[f"{name}_false"] = f"{r[f'{name}_false']} ({r.pop(f'{name}_clusters')})"
    return {
        "by_match": {"columns": [{"title": "set", "key": "set"}, {"title": "--min-match", "key": "min_match"}] + kinds
                     + [counted, {"title": "false clusters", "key": "false_clusters"},
                        {"title": "label conflicts", "key": "conflicts"}],
                     "rows": by_match,
                     "note": f"Recall: the share of each kind's planted copies confirmed with their original, at "
                             f"--phash-distance {phash} and --cosine {cosine:.2f}; false pairs: confirmed pairs of two "
                             "distinct images of the set, the clusters and label conflicts they make."},
        "by_proposal": {"columns": proposal_columns, "rows": by_proposal,
                        "note": f"At --min-match {match}; mean recall over the five kinds of copies; lowest kind: the "
                                "worst kind's recall on textures and lfw."},
    }


def suite(names: list[str], features: bool, cache: Path) -> list[dict]:
    """Duplicate clusters in each benchmark set (train and test together) and leaks between its
    recorded train and test split (data/suite/NAME, written by bench/suite.py --prepare-only)."""
    from transferkit.curate.check import run_check

    root = Path(__file__).resolve().parents[1] / "data" / "suite"
    rows = []
    for name in names:
        folder = root / name
        if not (folder / "train").is_dir():
            print(f"{name}: not prepared ({folder}); python bench/suite.py --prepare-only --sets {name}")
            continue
        started = time.perf_counter()
        report = run_check(folder / "train", test_data=folder / "test", embeddings=features, cache_dir=str(cache))
        counts = {k: report.count(k) for k in ("exact_duplicate", "near_duplicate", "leak", "label_conflict",
                                               "label_issue", "outlier", "unreadable")}
        leaks = [f.paths for f in report.findings if f.kind == "leak"]
        row = {"set": name, "features": features, "images": sum(s["usable"] for s in report.summary.values()),
               "counts": counts, "leak_examples": leaks[:5], "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def timing(n: int, cache: Path) -> dict:
    """`check` on n ELPV images (300 px PNGs): cold (an empty view store), then warm (the same
    images again: every feature read back)."""
    from transferkit.curate.check import run_check

    found = real_set("elpv", n)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (picture, cls) in enumerate(found):
            (root / cls).mkdir(parents=True, exist_ok=True)
            picture.save(root / cls / f"{i:05d}.png")
        store = Path(tmp) / "store"
        result = {"n": len(found)}
        for label in ("cold", "warm"):
            started = time.perf_counter()
            report = run_check(root, cache_dir=str(store))
            result[label] = {"seconds": round(time.perf_counter() - started, 1), "timings": report.timings}
            print(label, json.dumps(result[label]), flush=True)
        started = time.perf_counter()
        run_check(root, embeddings=False)
        result["no_features_seconds"] = round(time.perf_counter() - started, 1)
    return result


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def fashion_pngs(out: Path, n: int) -> Path:
    """The first n of Fashion-MNIST's 60,000 training garments (28 x 28 grey, from Debian's
    dataset-fashion-mnist) as PNGs in class folders under out/N (written once, kept: outside git)."""
    import gzip

    folder = out / str(n)
    if folder.is_dir() and sum(1 for _ in folder.glob("*/*.png")) == n:
        return folder
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"{FASHION}: not found (apt-get install dataset-fashion-mnist)")
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    for i in range(n):
        (folder / FASHION_CLASSES[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / FASHION_CLASSES[labels[i]] / f"{i:05d}.png")
    return folder


def fashion(sizes: list[int], data: Path) -> list[dict]:
    """`transferkit check` (the command, in a fresh process: the import and the backbone's setup
    count) on n Fashion-MNIST PNGs: cold (an empty view store), then warm (every feature stored);
    and the hash pass alone (--no-features)."""
    import subprocess

    rows = []
    for n in sizes:
        folder = fashion_pngs(data, n)
        with tempfile.TemporaryDirectory() as tmp:
            for label, extra in (("cold", []), ("warm", []), ("no features", ["--no-features"])):
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "transferkit", "check", str(folder), "--format", "json",
                                       "--quiet", "--cache-dir", str(Path(tmp) / "store"), *extra],
                                      capture_output=True, text=True)
                seconds = time.perf_counter() - started
                if done.returncode not in (0, 1):
                    raise SystemExit(f"check failed ({done.returncode}): {done.stderr.strip()[-500:]}")
                document = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"n": n, "run": label, "seconds": round(seconds, 1), "timings": document["timings"],
                             "counts": document["counts"], "notes": document["notes"]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def time_table(rows: list[dict]) -> dict:
    return {"columns": [{"title": "images", "key": "n"}, {"title": "run", "key": "run"},
                        {"title": "seconds (whole command)", "key": "seconds", "format": "{:.1f}"},
                        {"title": "backbone setup", "key": "setup", "format": "{:.1f}"},
                        {"title": "reading + features", "key": "read", "format": "{:.1f}"},
                        {"title": "duplicates", "key": "duplicates", "format": "{:.1f}"},
                        {"title": "outliers", "key": "outliers", "format": "{:.1f}"},
                        {"title": "label errors", "key": "label_issues", "format": "{:.1f}"}],
            "rows": [{"n": r["n"], "run": r["run"], "seconds": r["seconds"], "setup": r["timings"].get("setup_seconds"),
                      "read": r["timings"].get("read_seconds"),
                      "duplicates": r["timings"].get("duplicates_seconds"),
                      "outliers": r["timings"].get("outliers_seconds"),
                      "label_issues": r["timings"].get("label_issues_seconds")} for r in rows],
            "note": "Fashion-MNIST's first training garments (28 x 28 grey PNGs), the `check` command with its "
                    "defaults in a fresh process (the import and the backbone's setup included); warm: the same "
                    "images again, every feature read from the view store."}


def knn(sizes: list[int], dim: int = 1280, k: int = 10) -> list[dict]:
    """The blocked nearest-neighbour product alone on unit vectors of the backbone's width (its
    time depends on the shapes, not the values), and its peak extra memory."""
    from transferkit.data.phash import nearest

    rows = []
    for n in sizes:
        x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        started = time.perf_counter()
        nearest(x, k)
        seconds = time.perf_counter() - started
        block = max(1, (1 << 27) // (4 * n))
        rows.append({"n": n, "dim": dim, "k": k, "seconds": round(seconds, 2),
                     "block_rows": block, "block_mib": round(block * n * 4 / 2**20),
                     "full_matrix_mib": round(n * n * 4 / 2**20)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("planted", "distances", "suite", "timing", "knn", "sweep", "fashion"))
    parser.add_argument("--sets", nargs="+", default=["elpv", "textures"])
    parser.add_argument("--originals", type=int, default=300)
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--features", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "fashion-mnist"))
    parser.add_argument("--knn-sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "transferkit-bench-check"))
    args = parser.parse_args()
    quiet = Quiet()
    cache = Path(args.cache)
    if args.part == "planted":
        value = planted(args.sets, args.originals, args.copies, cache)
    elif args.part == "distances":
        value = measured_distances(args.sets, args.originals, args.copies, cache)
    elif args.part == "suite":  # its own file, so that each table's provenance line is its own command
        rows = suite(args.sets, args.features, cache)
        table = {"columns": [{"title": "set", "key": "set"}, {"title": "images", "key": "images"},
                             {"title": "near-duplicate clusters", "key": "near_duplicate"},
                             {"title": "clusters across train/test", "key": "leak"},
                             {"title": "label conflicts", "key": "label_conflict"}],
                 "rows": [{"set": r["set"], "images": r["images"], **r["counts"]} for r in rows]}
        write(f"check_suite_{'features' if args.features else 'hash'}", {"value": rows, "tables": {"suite": table}},
              quiet=quiet, command=sys.argv)
        return
    elif args.part == "sweep":
        rows = sweep(args.sets, args.originals or None, args.copies, cache)
        write("check_sweep", {"value": rows, "tables": sweep_tables(rows)}, quiet=quiet, command=sys.argv)
        return
    elif args.part == "fashion":
        rows = fashion(args.sizes, Path(args.data))
        write("check_time", {"value": rows, "tables": {"time": time_table(rows)}}, quiet=quiet, command=sys.argv)
        return
    elif args.part == "timing":
        value = timing(args.n, cache)
    else:
        value = knn(args.knn_sizes)
    path = RESULTS / "check.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    parts = existing.get("parts", {})
    key = args.part + ("" if args.part not in ("suite",) else "-features" if args.features else "-hash")
    parts[key] = {"value": value, "provenance_of_part": {"command": " ".join(sys.argv), **quiet.measure()}}
    write("check", {"parts": parts}, quiet=quiet, command=sys.argv)


if __name__ == "__main__":
    main()
