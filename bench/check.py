"""`transferkit check` measured: near-duplicate recall and precision on planted copies of real
images, the thresholds' evidence, duplicates and leaks in the benchmark suite's sets, and time.
Writes bench/results/check.json (each part updates its own entry).

    python bench/check.py planted --sets elpv textures   # copies of each kind: recall, precision
    python bench/check.py suite                          # clusters and leaks in data/suite/*
    python bench/check.py timing --n 1000                # cold and warm, this many ELPV images
    python bench/check.py knn                            # the nearest-neighbour step alone, 10k and 50k

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
    parser.add_argument("part", choices=("planted", "distances", "suite", "timing", "knn"))
    parser.add_argument("--sets", nargs="+", default=["elpv", "textures"])
    parser.add_argument("--originals", type=int, default=300)
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--features", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--knn-sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "transferkit-bench-check"))
    args = parser.parse_args()
    quiet = Quiet()
    cache = Path(args.cache)
    if args.part == "planted":
        value = planted(args.sets, args.originals, args.copies, cache)
    elif args.part == "distances":
        value = measured_distances(args.sets, args.originals, args.copies, cache)
    elif args.part == "suite":
        value = suite(args.sets, args.features, cache)
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
