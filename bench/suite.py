"""The benchmark suite: real, public image sets that install from package registries, each with a
fixed recorded split, and the ways to train on each: transferkit's defaults (and `before`, the
defaults before issue 16), the presets `fast` and `best`, the seed's recipe in transferkit, and
the seed's own Keras code (../shared/peer/keras_peer.py, in its own TensorFlow venv; its "best
epoch" is the best test accuracy over its epochs, chosen on the test set). One table: test accuracy
as mean and spread over seeds (with one run's 95 % interval), balanced accuracy, wall time,
accuracy per minute and peak memory; then each way's mean and worst set.

    python bench/suite.py                          # every set, every way, seeds 0 1 2
    python bench/suite.py --sets digits lfw --ways defaults seed --seeds 0
    python bench/suite.py --list                   # the sets, their sources and licences
    python bench/suite.py --prepare-only           # write the sets' folders and splits
    python bench/suite.py --table                  # the table of runs/suite/results.jsonl so far
Every invocation ends by writing that table to bench/results/suite.json (tools/docs_tables.py
renders it into the docs): per set and way, the mean of the seeds with their range, never one
seed alone; each run records whether the machine was quiet while it ran, and its training time
(model.json's training_seconds), from which the table gives each way's cost against the defaults.

Keras: `--keras-python ~/venv-keras/bin/python` (the peer's README says how to make that venv);
without it the Keras rows are left out. Time only on a quiet machine: each run is a separate
process, measured back to back; results go to runs/suite/results.jsonl as they come, so a
stopped suite continues where it stopped (runs already there are not repeated, unless `--again`:
each row records the commit it ran, and the table shows the last row of each set, way and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import Quiet, write  # noqa: E402

PEER = ROOT.parent / "shared" / "peer" / "keras_peer.py"

WAYS = {
    "defaults": [],
    "before": ["--fine-tune-at", "blocks.4.0.conv_pw", "--fine-tune-epochs", "8"],  # the defaults before issue 16
    "shallow": ["--fine-tune-at", "blocks.5.2.conv_pw"],  # the last quarter of Lite0's layers (layer 78)
    "300px": ["--image-size", "300"],  # the defaults at ELPV's own resolution (Lite0's is 224)
    "lite1": ["--backbone", "tf_efficientnet_lite1"],  # the defaults on EfficientNet-Lite1 at its own 240 px
    "lite2": ["--backbone", "tf_efficientnet_lite2"],  # the defaults on EfficientNet-Lite2 at its own 260 px
    "plain": ["--no-cache"],  # the defaults without the cache: the seed's loop, every epoch through the whole model
    "fast": ["--preset", "fast"],
    "best": ["--preset", "best"],  # its 10-minute budget
    "best-20": ["--preset", "best", "--time-budget", "20"],
    "seed": ["--backbone", "mobilenetv2_100", "--image-size", "160", "--epochs", "5", "--fine-tune-epochs", "5",
             "--fine-tune-at", "120", "--rotation", "0.2"],
    "keras": None,  # the seed's own code
}


@dataclass(frozen=True)
class ImageSet:
    name: str
    source: str
    licence: str
    kind: str
    write: Callable[[Path], dict]  # writes train/ and test/ class folders; returns {split: {class: n}}


def save_split(out: Path, images: list[np.ndarray], labels: list[str], test_size: float | int,
               seed: int = 0, fixed_test: np.ndarray | None = None) -> dict:
    """Stratified fixed split (seed 0), or the given test indices, written as out/train/CLASS/i.png
    and out/test/CLASS/i.png, with the file lists in out/split.json."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(images))
    if fixed_test is None:
        train, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=seed)
    else:
        test, train = fixed_test, np.setdiff1d(index, fixed_test)
    counts: dict[str, dict[str, int]] = {}
    for split, chosen in (("train", train), ("test", test)):
        for i in sorted(chosen):
            folder = out / split / labels[i]
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{i:05d}.png"
            if not target.exists():
                Image.fromarray(images[i]).save(target)
            counts.setdefault(split, {}).setdefault(labels[i], 0)
            counts[split][labels[i]] += 1
    (out / "split.json").write_text(json.dumps({
        split: sorted(str(p.relative_to(out / split)) for p in (out / split).rglob("*.png"))
        for split in ("train", "test")}, indent=1) + "\n")
    return counts


def write_elpv(out: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from prepare_elpv import write

    return write(out, split=True)


def write_digits(out: Path) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.asarray(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
              for x in digits.images]
    return save_split(out, images, [str(t) for t in digits.target], test_size=360)


def write_lfw(out: Path) -> dict:
    from skimage.data import lfw_subset

    images = list((lfw_subset() * 255).round().astype(np.uint8))
    return save_split(out, images, ["face"] * 100 + ["background"] * 100, test_size=60)


def write_textures(out: Path) -> dict:
    """Non-overlapping 64 x 64 tiles of scikit-image's brick, grass and gravel photos (CC0)."""
    from skimage import data

    images, labels = [], []
    for name in ("brick", "grass", "gravel"):
        photo = getattr(data, name)()
        for y in range(0, photo.shape[0] - 63, 64):
            for x in range(0, photo.shape[1] - 63, 64):
                images.append(np.ascontiguousarray(photo[y:y + 64, x:x + 64]))
                labels.append(name)
    return save_split(out, images, labels, test_size=0.3)


FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]


def write_fashion(out: Path, per_class: int | None = None) -> dict:
    """5,000 training and 1,000 test images drawn at random (seed 0) from Fashion-MNIST's own
    training and test files; `per_class`: only the first that many training images of each class
    of those 5,000 (the same 1,000 test images)."""
    import gzip

    if not FASHION.is_dir():
        raise SystemExit("error: Fashion-MNIST is not installed (Debian: apt-get install dataset-fashion-mnist)")

    def read(kind: str) -> tuple[np.ndarray, np.ndarray]:
        images = np.frombuffer(gzip.open(FASHION / f"{kind}-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
        labels = np.frombuffer(gzip.open(FASHION / f"{kind}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
        return images.reshape(-1, 28, 28), labels

    rng = np.random.default_rng(0)
    (train_x, train_y), (test_x, test_y) = read("train"), read("t10k")
    train = np.sort(rng.choice(len(train_y), 5000, replace=False))
    test = np.sort(rng.choice(len(test_y), 1000, replace=False))
    if per_class:
        train = np.sort(np.concatenate([train[train_y[train] == c][:per_class] for c in range(10)]))
    images = [*train_x[train], *test_x[test]]
    labels = [FASHION_CLASSES[y] for y in (*train_y[train], *test_y[test])]
    return save_split(out, images, labels, test_size=1000, fixed_test=np.arange(len(train), len(train) + 1000))


SETS = {s.name: s for s in (
    ImageSet("elpv", "PyPI elpv-dataset (Buerhop-Lutz et al. 2018; Deitsch et al. 2019)", "CC BY-NC-SA 4.0",
             "2 classes, 2,624 electroluminescence images of solar cells, 300 px grey", write_elpv),
    ImageSet("digits", "scikit-learn load_digits (UCI optical digits)", "BSD-3-Clause (scikit-learn); CC BY 4.0 (UCI)",
             "10 classes, 1,797 handwritten digits, 8 px grey (shown at 32 px)", write_digits),
    ImageSet("lfw", "scikit-image data.lfw_subset (Labeled Faces in the Wild)", "BSD-3-Clause (scikit-image)",
             "2 classes, 200 natural photos (faces vs. background), 25 px grey", write_lfw),
    ImageSet("fashion", "Debian dataset-fashion-mnist (Zalando Research, Xiao et al. 2017)", "MIT",
             "10 classes, 6,000 product photos (5,000 training), 28 px grey", write_fashion),
    ImageSet("fashion-small", "Debian dataset-fashion-mnist (Zalando Research, Xiao et al. 2017)", "MIT",
             "10 classes, the first 40 training images per class of `fashion` (400), its 1,000 test images",
             lambda out: write_fashion(out, per_class=40)),
    ImageSet("textures", "scikit-image data.brick/grass/gravel", "CC0",
             "3 classes, 64 px tiles of three natural texture photos", write_textures),
)}


def run_transferkit(data: Path, out: Path, way: str, seed: int) -> dict:
    """One `transferkit train --test-dir` in a child process, the command a user runs: the test
    set's accuracy, the wall time from start to exit, the child's peak memory."""
    args = [sys.executable, "-m", "transferkit", "train", str(data / "train"), "--out", str(out), "--overwrite",
            "--test-dir", str(data / "test"), *WAYS[way], "--seed", str(seed)]
    with tempfile.TemporaryDirectory() as cold:  # a new user's first run: no views stored by an earlier run
        log = Path(cold) / "log"
        quiet = Quiet()
        with open(log, "w") as fh:
            started = time.perf_counter()
            child = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                     env={**os.environ, "XDG_CACHE_HOME": cold})
            _, status, usage = os.wait4(child.pid, 0)  # reaps it with its own resource usage
            seconds = time.perf_counter() - started
            child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"{way} on {data} failed:\n{log.read_text()[-2000:]}")
    m = json.loads((out / "test_metrics.json").read_text())
    meta = json.loads((out / "model.json").read_text())
    machine = quiet.measure()
    return {**{k: m[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "n")},
            "peak_mib": round(usage.ru_maxrss / 1024), "seconds": round(seconds, 1),
            "training_seconds": meta.get("training_seconds"), "quiet": machine["quiet"],
            "others_cpu_share": machine["others_cpu_share"]}


def run_keras(python: str, data: Path, seed: int, out: Path) -> dict:
    """The seed's Keras code on the same split (its test part is its validation data)."""
    target = out / "keras.json"
    started = time.perf_counter()
    done = subprocess.run([python, str(PEER), str(data / "train"), "--val-dir", str(data / "test"),
                           "--seed", str(seed), "--out", str(target)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"keras on {data} failed:\n{done.stderr[-2000:]}")
    result = json.loads(target.read_text())
    return {"accuracy": result["final_val_acc"], "best_epoch_accuracy": max(result["val_accuracy_per_epoch"]),
            "n": result["final_val_total"], "seconds": round(seconds, 1), "peak_mib": round(result["peak_rss_mb"])}


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (set, way, seed): a way run `--again` replaces its earlier rows."""
    return list({(r["set"], r["way"], r["seed"]): r for r in rows}.values())


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def table(rows: list[dict]) -> str:
    from transferkit.predict.metrics import wilson_interval

    rows = latest(rows)

    lines = ["| set | way | runs | test accuracy, mean ± spread (min) | one run's 95 % interval | balanced accuracy | "
             "time (s) | accuracy per minute | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in SETS:
        for way in WAYS:
            found = [r for r in rows if r["set"] == name and r["way"] == way]
            if not found:
                continue
            acc = np.array([r["accuracy"] for r in found])
            n = found[0].get("n")
            low, high = wilson_interval(int(round(acc[0] * n)), n) if n else (float("nan"),) * 2
            balanced = np.mean([r.get("balanced_accuracy", np.nan) for r in found])
            seconds = np.mean([r["seconds"] for r in found])
            best = [r["best_epoch_accuracy"] for r in found if "best_epoch_accuracy" in r]
            shown = f"{acc.mean():.1%} ± {acc.std():.1%} (min {acc.min():.1%})" + (
                f"; best epoch {np.mean(best):.1%}" if best else "")
            lines.append(f"| {name} | {way} | {len(found)} | {shown} | {low:.1%}–{high:.1%} | "
                         f"{'' if np.isnan(balanced) else f'{balanced:.1%}'} | {seconds:.0f} | "
                         f"{acc.mean() / (seconds / 60):.1%} | {max((r['peak_mib'] or 0) for r in found)} |")
    means = {way: [np.mean([r["accuracy"] for r in rows if r["set"] == name and r["way"] == way]) for name in SETS
                   if any(r["set"] == name and r["way"] == way for r in rows)] for way in WAYS}
    lines.append("")
    lines += [f"{way}: mean over {len(m)} set(s) {np.mean(m):.1%}, worst {min(m):.1%}" for way, m in means.items() if m]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    """One record per set and way: the seeds' mean and range, never one seed alone; the training
    time against the defaults' on the same set (both means); whether every run was quiet."""
    rows = latest(rows)
    out = []
    for name in SETS:
        base = [r["training_seconds"] for r in rows if r["set"] == name and r["way"] == "defaults"
                and r.get("training_seconds")]
        for way in WAYS:
            found = [r for r in rows if r["set"] == name and r["way"] == way]
            if not found:
                continue
            acc = np.array([r["accuracy"] for r in found])
            training = [r["training_seconds"] for r in found if r.get("training_seconds")]
            quiet = [r.get("quiet") for r in found]
            out.append({
                "set": name, "way": way, "runs": len(found), "seeds": sorted(r["seed"] for r in found),
                "accuracy_mean": float(acc.mean()), "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
                "accuracy": f"{acc.mean():.1%} ({acc.min():.1%}–{acc.max():.1%})" if len(found) > 1
                            else f"{acc.mean():.1%} (one seed)",
                "balanced_accuracy": float(np.mean([r.get("balanced_accuracy", np.nan) for r in found])),
                "best_epoch_accuracy": float(np.mean([r["best_epoch_accuracy"] for r in found]))
                                       if all("best_epoch_accuracy" in r for r in found) else None,
                "seconds": float(np.mean([r["seconds"] for r in found])),
                "training_seconds": float(np.mean(training)) if training else None,
                "cost_vs_defaults": float(np.mean(training) / np.mean(base)) if training and base else None,
                "peak_mib": max((r.get("peak_mib") or 0) for r in found),
                "quiet": "yes" if all(quiet) else "no" if None not in quiet else "not measured",
                "commits": sorted({r.get("commit", "?") for r in found})})
    return out


def short_rows(records: list[dict]) -> list[dict]:
    """One row per set: each way's mean accuracy (range) and time, over 2 seeds or more."""
    out = {}
    for r in records:
        if r["way"] in ("defaults", "fast", "keras") and r["runs"] > 1:
            row = out.setdefault(r["set"], {"set": r["set"], "quiet": []})
            row[r["way"]] = f"{r['accuracy']}, {r['seconds']:.0f} s"
            row["quiet"].append(r["quiet"])
    for row in out.values():
        row["quiet"] = "yes" if all(q == "yes" for q in row["quiet"]) else "no"
    return list(out.values())


def write_results(rows: list[dict]) -> Path:
    """bench/results/suite.json: the summary as a table, and every run."""
    right = {"align": "right"}
    records = summary(rows)
    runs = latest(rows)
    shares = [r["others_cpu_share"] for r in runs if r.get("others_cpu_share") is not None]
    machine = {"quiet": all(r.get("quiet") for r in runs) if all("quiet" in r for r in runs) else None,
               "others_cpu_share": max(shares) if shares else None}  # the busiest run's
    command = ["bench/suite.py", "--sets", *dict.fromkeys(r["set"] for r in runs),
               "--ways", *dict.fromkeys(r["way"] for r in runs),
               "--seeds", *map(str, sorted({r["seed"] for r in runs}))]
    return write("suite", {
        "runs": latest(rows),
        "tables": {"short": {  # the README's: one row per set, the ways a user picks between
            "columns": [{"title": "set", "key": "set"},
                        *({"title": title, "key": way} for way, title in (
                            ("defaults", "defaults"), ("fast", "`--preset fast`"), ("keras", "the seed's Keras code"))),
                        {"title": "quiet", "key": "quiet"}],
            "rows": short_rows(records)},
                   "suite": {
            "columns": [{"title": "set", "key": "set"}, {"title": "way", "key": "way"},
                        {"title": "runs", "key": "runs", **right},
                        {"title": "test accuracy, mean (range)", "key": "accuracy"},
                        {"title": "balanced accuracy", "key": "balanced_accuracy", "format": "{:.1%}", **right},
                        {"title": "time (s)", "key": "seconds", "format": "{:.0f}", **right},
                        {"title": "training time vs defaults", "key": "cost_vs_defaults", "format": "{:.2f}x", **right},
                        {"title": "peak memory (MiB)", "key": "peak_mib", **right},
                        {"title": "quiet", "key": "quiet"}],
            "rows": records,
            "note": "Time: `transferkit train --test-dir` from start to exit, a fresh process, an empty view "
                    "store; comparable only between quiet runs. Training time vs defaults: model.json's "
                    "training_seconds, the mean over the seeds, over the defaults' on the same set."}}},
        quiet=machine, command=command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "suite")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "suite")
    parser.add_argument("--keras-python", help="the TensorFlow venv's python for the seed's Keras code")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table of the results so far and stop")
    parser.add_argument("--again", action="store_true",
                        help="run even where results.jsonl has the row (the table then shows the new one)")
    args = parser.parse_args()
    if args.list:
        for s in SETS.values():
            print(f"{s.name}: {s.kind}; source {s.source}; licence {s.licence}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if args.table:
        print(table(rows))
        print(f"wrote {write_results(rows)}")
        return
    for name in args.sets:
        data = args.data / name
        counts = SETS[name].write(data)
        print(f"{name}: {counts}", flush=True)
        if args.prepare_only:
            continue
        for way in args.ways:
            if way == "keras" and not args.keras_python:
                continue
            for seed in args.seeds:
                if not args.again and any(r["set"] == name and r["way"] == way and r["seed"] == seed for r in rows):
                    continue
                out = args.out / f"{name}-{way}-{seed}"
                result = (run_keras(args.keras_python, data, seed, out) if way == "keras" else
                          run_transferkit(data, out, way, seed))
                row = {"set": name, "way": way, "seed": seed, **result, "commit": commit()}
                rows.append(row)
                with open(results, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    if not args.prepare_only:
        print(table(rows))
        print(f"wrote {write_results(rows)}")


if __name__ == "__main__":
    main()
