"""Which OOD score, and what it costs: near-OOD (one class of a real set held out of training),
far-OOD (other real sets), conformal coverage, and the time the score adds. Writes
bench/results/ood.json (and one JSON line per run to runs/ood/rows.jsonl, so that a stopped
bench continues where it stopped).

    python bench/ood.py                                   # textures and digits, every class held out, seeds 0 1 2
    python bench/ood.py --sets textures --seeds 0 --holdout 0   # one run
    python bench/ood.py --far-sets elpv                   # also an ELPV model shown the other sets
    python bench/ood.py --table                           # the summary of the rows so far

Every run trains with transferkit's defaults (at --image-size, 96 px by default to fit a 2-core
machine) on the set's training folder without the held-out class. Each candidate score is computed
from the same trained model: its own pooled features (penultimate layer) and logits; the naive
baseline `frozen_knn` is kNN (k = 10) on the frozen, pretrained backbone's features, the
measurement the issue was filed with. In-distribution images: the set's test images of the
trained classes; near-OOD: every image (train and test) of the held-out class; far-OOD: up to 300
test images of each other set. Coverage: `--coverage 0.9` sets of the product (APS) on the
in-distribution test images, against the naive sets (the most probable classes until 90 %).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import Quiet, read, write  # noqa: E402
from suite import SETS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("knn", "knn_k1", "knn_k50", "mahalanobis", "mahalanobis_normalised", "energy", "max_logit", "msp",
              "frozen_knn")


def images_of(paths: list[str], size: int) -> np.ndarray:
    from transferkit.data.decode import decoded_batches

    out = []
    for batch in decoded_batches(paths, size, 256):
        if isinstance(batch, tuple):
            raise SystemExit(f"unreadable: {batch}")
        out += [a for _, a in batch]
    return np.stack(out)


def files(folder: Path, classes: list[str] | None = None) -> list[str]:
    return [str(p) for c in sorted(folder.iterdir()) if c.is_dir() and (classes is None or c.name in classes)
            for p in sorted(c.glob("*.png"))]


def frozen_features(name: str, size: int, images: list[np.ndarray]) -> list[np.ndarray]:
    """The pretrained backbone's pooled features: the naive baseline's."""
    from transferkit.models.backbones import create_backbone
    from transferkit.models.inference import predict_logits
    from transferkit.models.transfer import TransferModel, to_unit

    backbone = create_backbone(name, None, size)
    model = TransferModel(backbone.model, 2, backbone.preprocess).eval()
    return [predict_logits(model, x, lambda b: model.features(model.normalize(to_unit(b))), 64) for x in images]


def candidate_scores(computed: dict, train_labels: np.ndarray, frozen: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Every candidate's scores of every group of images (from their features and logits,
    `computed`, the training images' under "train"), and the milliseconds each takes per 1,000
    images."""
    from transferkit.openworld import ood

    groups = [g for g in computed if g != "train"]
    scores, seconds = {}, {}
    for method in CANDIDATES:
        if method == "frozen_knn":
            scorer = ood.fit("knn", frozen["train"], train_labels, frozen["in"], np.zeros((len(frozen["in"]), 2)), k=10)
            feats = {g: (frozen[g], np.zeros((len(frozen[g]), 2))) for g in groups}
        else:
            base, _, k = method.partition("_k")
            transform = ood.normalised if method == "mahalanobis_normalised" else (lambda f: f)
            base = "mahalanobis" if method == "mahalanobis_normalised" else base
            train_f = computed["train"][0]
            scorer = ood.fit(base, transform(train_f), train_labels, transform(computed["in"][0]), computed["in"][1],
                             k=int(k) if k else 10)  # `knn`: k = 10, the naive version's k
            feats = {g: (transform(computed[g][0]), computed[g][1]) for g in groups}
        started = time.perf_counter()
        scores[method] = {g: scorer.score(*feats[g]) for g in groups}
        seconds[method] = (time.perf_counter() - started) / sum(len(feats[g][0]) for g in groups) * 1e6
    return scores, seconds


def one_run(name: str, held: str | None, seed: int, args, far: dict[str, list[str]]) -> dict:
    """Train without `held` (None: every class), then measure every candidate and the product."""
    import torch

    import transferkit
    from transferkit.openworld import conformal, ood
    from transferkit.predict.run import load

    data = args.data / name
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    kept = [c for c in classes if c != held]
    train_dir = args.out / "data" / f"{name}-without-{held}" / "train"
    if not train_dir.exists():
        for c in kept:
            (train_dir / c).parent.mkdir(parents=True, exist_ok=True)
            (train_dir / c).symlink_to((data / "train" / c).resolve())
    out = args.out / "runs" / f"{name}-without-{held}-seed{seed}"
    started = time.perf_counter()
    transferkit.train(train_dir, out, seed=seed, image_size=args.image_size, overwrite=True, reporter=quiet_reporter())
    wall = time.perf_counter() - started
    clf = load(out).configure(coverage=0.9)
    size = clf.image_size
    train_paths, in_paths = files(data / "train", kept), files(data / "test", kept)
    train_labels = np.array([kept.index(Path(p).parent.name) for p in train_paths])
    in_labels = np.array([kept.index(Path(p).parent.name) for p in in_paths])
    groups = {"train": images_of(train_paths, size), "in": images_of(in_paths, size)}
    if held is not None:
        groups["near"] = images_of(files(data / "train", [held]) + files(data / "test", [held]), size)
    for other, paths in far.items():
        if other != name:
            groups[f"far:{other}"] = images_of(paths, size)
    computed = {g: clf.features_logits(x) for g, x in groups.items()}
    frozen = dict(zip(groups, frozen_features(clf.meta["backbone"], size, list(groups.values()))))
    scores, seconds = candidate_scores(computed, train_labels, frozen)
    probs = clf.model.probabilities(torch.from_numpy(computed["in"][1])).numpy()
    threshold = clf.open_world.threshold
    row = {"set": name, "held_out": held, "seed": seed, "image_size": size, "classes": kept,
           "n": {g: len(x) for g, x in groups.items()}, "training_seconds": clf.meta["training_seconds"],
           "wall_seconds": round(wall, 1), "ood_fit_seconds": clf.meta["ood"]["seconds"],
           "test_accuracy": float((probs.argmax(1) == in_labels).mean()),
           "detection": {m: {g: ood.detection_metrics(s["in"], s[g]) for g in s if g != "in"} for m, s in scores.items()},
           "score_us_per_image": seconds,
           "product": {"method": clf.meta["ood"]["method"], "threshold": threshold,
                       "flagged": {g: float((clf.scorer.score(*computed[g]) > threshold).mean())
                                   for g in groups if g != "train"}}}
    member = conformal.sets(probs, clf.open_world.set_threshold, conformal.tie_breaks(groups["in"]), probs.argmax(1))
    row["coverage"] = {"aps": conformal.summary(member, in_labels, 0.9),
                       "naive": conformal.summary(conformal.naive_sets(probs, 0.9), in_labels, 0.9)}
    if seed == args.seeds[0]:
        row["predict_seconds"] = predict_timing(clf, groups["in"][:256])
    return row


def predict_timing(clf, images: np.ndarray, repeats: int = 2) -> dict:
    """The torch engine's seconds for these images: probabilities alone, and with the OOD score."""
    timings = {}
    for name, call in (("probabilities", lambda: clf.predict_proba(images)),
                       ("with_ood", lambda: clf.predict_open(images))):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - started)
        timings[name] = round(best, 3)
    timings["overhead"] = round(timings["with_ood"] / timings["probabilities"] - 1, 4)
    return timings


def quiet_reporter():
    from transferkit.utils.progress import Reporter

    return Reporter(live=False, quiet=True)


def summary(rows: list[dict]) -> dict:
    """Means over runs: per set and candidate, near-OOD AUROC / FPR95 (mean over held-out classes
    and seeds), far-OOD AUROC; coverage and cost."""
    out = {"near": {}, "far": {}, "coverage": {}, "cost": {}}
    for name in sorted({r["set"] for r in rows}):
        mine = [r for r in rows if r["set"] == name]
        near = [r for r in mine if r["held_out"] is not None]
        if near:
            out["near"][name] = {m: {k: float(np.mean([r["detection"][m]["near"][k] for r in near]))
                                     for k in ("auroc", "fpr_at_95_tpr")} | {"runs": len(near)} for m in CANDIDATES}
            out["near"][name]["product_flagged"] = {
                g: float(np.mean([r["product"]["flagged"][g] for r in near])) for g in ("in", "near")}
        fars = sorted({g for r in mine for g in r["detection"]["knn"] if g.startswith("far:")})
        for g in fars:
            out["far"][f"{name} model vs {g[4:]}"] = {m: float(np.mean([r["detection"][m][g]["auroc"] for r in mine
                                                                        if g in r["detection"][m]])) for m in CANDIDATES}
        out["coverage"][name] = {kind: {k: float(np.mean([r["coverage"][kind][k] for r in mine]))
                                        for k in ("coverage", "mean_set_size")} | {
            "min_coverage": float(min(r["coverage"][kind]["coverage"] for r in mine)),
            "max_coverage": float(max(r["coverage"][kind]["coverage"] for r in mine))} for kind in ("aps", "naive")}
        out["cost"][name] = {"training_overhead": float(np.mean([r["ood_fit_seconds"] / r["training_seconds"]
                                                                 for r in mine])),
                             "prediction_overhead": float(np.mean([r["predict_seconds"]["overhead"] for r in mine
                                                                   if "predict_seconds" in r] or [np.nan])),
                             "score_us_per_image": {m: float(np.mean([r["score_us_per_image"][m] for r in mine]))
                                                    for m in CANDIDATES}}
    nears = [v for v in out["near"].values()]
    if nears:
        out["near_mean_auroc"] = {m: float(np.mean([v[m]["auroc"] for v in nears])) for m in CANDIDATES}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="*", default=["textures", "digits"])
    parser.add_argument("--far-sets", nargs="*", default=[], help="sets trained on every class (e.g. elpv)")
    parser.add_argument("--holdout", nargs="*", type=int, help="indices of the classes to hold out (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--far-per-set", type=int, default=300)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "suite")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ood")
    parser.add_argument("--table", action="store_true", help="the summary of the rows so far (and markdown tables)")
    parser.add_argument("--recalibrate", action="store_true", help="recompute every row's coverage from its run "
                        "folder (the validation predictions and the test images) with the current conformal code")
    parser.add_argument("--time-run", type=Path, help="only time the torch engine of this run on 224 px inputs "
                        "(probabilities alone vs with the OOD score), into ood.json's 'timing'")
    args = parser.parse_args()
    if args.time_run:
        time_only(args.time_run)
        return
    if args.recalibrate:
        recalibrate(args)
    rows_file = args.out / "rows.jsonl"
    quiet = Quiet()
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        every = list(dict.fromkeys([*args.sets, *args.far_sets, "lfw", "textures", "digits"]))
        for name in every:
            if not (args.data / name / "train").is_dir():
                print(f"preparing {name}", flush=True)
                SETS[name].write(args.data / name)
        rng = np.random.default_rng(0)
        far = {}
        for name in every:
            paths = files(args.data / name / "test")
            far[name] = sorted(rng.choice(paths, min(args.far_per_set, len(paths)), replace=False).tolist())
        done = {(r["set"], r["held_out"], r["seed"], r["image_size"]) for r in read_rows(rows_file)}
        plan = []
        for name in args.sets:
            classes = sorted(p.name for p in (args.data / name / "train").iterdir() if p.is_dir())
            plan += [(name, classes[i], s) for i in (args.holdout if args.holdout is not None else range(len(classes)))
                     for s in args.seeds]
        plan += [(name, None, s) for name in args.far_sets for s in args.seeds]
        ran = 0
        for name, held, seed in plan:
            if (name, held, seed, args.image_size) in done:
                continue
            ran += 1
            started = time.perf_counter()
            row = one_run(name, held, seed, args, far)
            with open(rows_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            near = row["detection"]["knn"].get("near", {}).get("auroc")
            print(f"{name} without {held} seed {seed}: knn near AUROC {near}, frozen "
                  f"{row['detection']['frozen_knn'].get('near', {}).get('auroc')}, coverage "
                  f"{row['coverage']['aps']['coverage']:.3f}, {time.perf_counter() - started:.0f}s", flush=True)
    rows = [r for r in read_rows(rows_file) if r["image_size"] == args.image_size]
    result = summary(rows)
    print(json.dumps(result, indent=1))
    print(markdown(result, rows))
    if not args.table:
        try:  # what other invocations wrote (--time-run's timing) stays
            kept = {k: v for k, v in read("ood").items() if k not in ("provenance", "summary", "rows")}
        except OSError:
            kept = {}
        if not ran:  # nothing measured here: the rows' own runs were not watched by this invocation
            quiet = {"quiet": False, "note": "every row was measured by an earlier invocation (runs/ood/rows.jsonl), "
                                             "while other work shared the machine; this one only summarised them"}
        print(write("ood", {**kept, "summary": result, "rows": rows}, quiet=quiet, command=sys.argv))


def coverage_of(clf, data: Path, kept: list[str], out: Path) -> dict:
    """APS and naive coverage of a run's sets at 0.9, calibrated afresh on its validation
    predictions (val_predictions.csv and the images it names) with the current conformal code."""
    from transferkit.openworld import conformal
    from transferkit.predict.metrics import predict_labels
    from transferkit.predict.run import read_predictions

    paths, labels, probs = read_predictions(out / "val_predictions.csv", clf.classes)
    u = conformal.tie_breaks(images_of(paths, clf.image_size))
    q = conformal.threshold(conformal.scores(probs, labels, u, predict_labels(probs, clf.threshold)), 0.9)
    in_paths = files(data / "test", kept)
    in_labels = np.array([kept.index(Path(p).parent.name) for p in in_paths])
    images = images_of(in_paths, clf.image_size)
    test = clf.predict_proba(images)
    member = conformal.sets(test, q, conformal.tie_breaks(images), predict_labels(test, clf.threshold))
    return {"aps": conformal.summary(member, in_labels, 0.9),
            "naive": conformal.summary(conformal.naive_sets(test, 0.9), in_labels, 0.9)}


def recalibrate(args) -> None:
    from transferkit.predict.run import load

    path = args.out / "rows.jsonl"
    rows = read_rows(path)
    for row in rows:
        out = args.out / "runs" / f"{row['set']}-without-{row['held_out']}-seed{row['seed']}"
        row["coverage"] = coverage_of(load(out), args.data / row["set"], row["classes"], out)
        print(row["set"], row["held_out"], row["seed"], round(row["coverage"]["aps"]["coverage"], 3), flush=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def time_only(run: Path, size: int = 224, n: int = 64, repeats: int = 5) -> None:
    """The PyTorch engine's seconds for `n` images of `size` px, probabilities alone and with the
    OOD score, alternated, the best of `repeats`; merged into bench/results/ood.json."""
    from results import read

    from transferkit.predict.run import load

    clf = load(run)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    clf.predict_proba(images[:8]), clf.predict_open(images[:8])
    seconds = {"probabilities": [], "with_ood": []}
    for _ in range(repeats):
        for name, call in (("probabilities", clf.predict_proba), ("with_ood", clf.predict_open)):
            started = time.perf_counter()
            call(images, 32)
            seconds[name].append(time.perf_counter() - started)
    best = {k: round(min(v), 3) for k, v in seconds.items()}
    timing = {"run": str(run), "method": clf.scorer.method, "bank_size": clf.meta["ood"]["bank_size"],
              "image_size": size, "images": n, "seconds": best,
              "overhead": round(best["with_ood"] / best["probabilities"] - 1, 4)}
    print(json.dumps(timing))
    try:
        found = read("ood")
    except OSError:
        found = {}
    found.pop("provenance", None)
    write("ood", {**found, "timing": timing}, command=sys.argv)


def markdown(result: dict, rows: list[dict]) -> str:
    """docs/openworld.md's tables."""
    lines = ["| score | " + " | ".join(f"{name} near AUROC / FPR95" for name in result["near"]) + " | mean AUROC |",
             "|---|" + "---|" * (len(result["near"]) + 1)]
    for m in CANDIDATES:
        cells = [f"{v[m]['auroc']:.3f} / {v[m]['fpr_at_95_tpr']:.3f}" for v in result["near"].values()]
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {result['near_mean_auroc'][m]:.3f} |")
    lines += ["", "| set, held-out class | runs | " + " | ".join(f"`{m}`" for m in CANDIDATES) + " |",
              "|---|---|" + "---|" * len(CANDIDATES)]
    for key in sorted({(r["set"], r["held_out"]) for r in rows if r["held_out"] is not None}):
        mine = [r for r in rows if (r["set"], r["held_out"]) == key]
        lines.append(f"| {key[0]} {key[1]} | {len(mine)} | " + " | ".join(
            f"{np.mean([r['detection'][m]['near']['auroc'] for r in mine]):.3f}" for m in CANDIDATES) + " |")
    lines += ["", "| model vs far-OOD images | " + " | ".join(f"`{m}`" for m in CANDIDATES) + " |",
              "|---|" + "---|" * len(CANDIDATES)]
    for name, values in result["far"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.3f}" for m in CANDIDATES) + " |")
    lines += ["", "| set | runs | test accuracy | APS coverage (min-max) | APS mean set size | naive 90 % coverage | "
              "naive mean set size |", "|---|---|---|---|---|---|---|"]
    for name, c in result["coverage"].items():
        mine = [r for r in rows if r["set"] == name]
        lines.append(f"| {name} | {len(mine)} | {np.mean([r['test_accuracy'] for r in mine]):.3f} | "
                     f"{c['aps']['coverage']:.3f} ({c['aps']['min_coverage']:.3f}-{c['aps']['max_coverage']:.3f}) | "
                     f"{c['aps']['mean_set_size']:.3f} | {c['naive']['coverage']:.3f} | {c['naive']['mean_set_size']:.3f} |")
    lines += ["", "| set | OOD fit / training time | prediction time with the score (96 px, this bench) |", "|---|---|---|"]
    for name, c in result["cost"].items():
        lines.append(f"| {name} | {c['training_overhead']:+.1%} | {c['prediction_overhead']:+.1%} |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


if __name__ == "__main__":
    main()
