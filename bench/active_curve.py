"""Active labelling measured: test accuracy against the number of labels for random, uncertainty
and diversity (k-center) sampling, with an oracle (the true labels) answering; the label-error
review on flipped labels; the time from opening the labelling page to the first retrained ranking.

Data: ELPV (2,624 real solar-cell images, PyPI `elpv-dataset`, CC BY-NC-SA 4.0; the split of
bench/prepare_elpv.py: 1,968 pool / 656 test) and scikit-learn's `load_digits` (1,797 real 8x8
handwritten digits, 10 classes, UCI, BSD; a stratified 1,197 pool / 600 test). Features: the
pooled features of `transferkit label` (tf_efficientnet_lite0, 224 px), extracted once into the
view store (`--cache-dir`), so reruns only refit heads. Each seed draws a random 90 % of the pool
(and, for random sampling, its picks); every session starts cold (no labels) and adds 10 labels a
round below 100 labels, 25 below 400, then 50, the head refitted each round.

    python bench/active_curve.py [--elpv data/elpv-split] [--seeds 5] [--cache-dir DIR]
                                 [--plot docs/active_curve.png] [--part all|curves|timing]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).parent))
from prepare_elpv import write  # noqa: E402

from transferkit.apps.label import Featurizer, extract_pool
from transferkit.curate.active import UNLABELLED, find_label_issues, head, suggest

BUDGETS = (50, 100, 200, 400, 800)
STRATEGIES = ("random", "uncertainty", "diversity")


def step(n: int) -> int:
    """Labels added per round (the app retrains every 10 by default): finer where curves move."""
    return 10 if n < 100 else 25 if n < 400 else 50


def features_of(featurizer: Featurizer, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(features of the usable files, their indices in `files`)."""
    kept, features, skipped = extract_pool(featurizer, files)
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return features.astype(np.float64), np.asarray(kept)


def elpv(featurizer: Featurizer, root: Path):
    write(root, split=True)
    out = []
    for part in ("train", "test"):
        files = sorted((root / part).glob("*/*.png"))
        x, kept = features_of(featurizer, files)
        out += [x, np.array([f.parent.name == "defective" for f in files], dtype=np.int64)[kept]]
    return tuple(out)


def digits(featurizer: Featurizer):
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    folder = Path(tempfile.mkdtemp(prefix="digits-"))
    files = []
    for i, image in enumerate(data.images):
        files.append(folder / f"{i:04d}.png")
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(files[-1])
    x, kept = features_of(featurizer, files)
    shutil.rmtree(folder)
    y = data.target[kept].astype(np.int64)
    pool, test = train_test_split(np.arange(len(y)), test_size=600, stratify=y, random_state=0)
    return x[pool], y[pool], x[test], y[test]


def curve(x, y, x_test, y_test, strategy: str, seed: int) -> list[tuple[int, float]]:
    """(labels, test accuracy) after each round of an oracle session from a cold start."""
    labels, points = np.full(len(y), UNLABELLED), []
    probabilities = None
    while (labels != UNLABELLED).sum() < BUDGETS[-1]:
        n = int((labels != UNLABELLED).sum())
        picks = suggest(x, labels, step(n), strategy, seed=seed + 1000 * n, probabilities=probabilities)
        labels[picks] = y[picks]
        known = labels != UNLABELLED
        if len(np.unique(labels[known])) < 2:
            points.append((int(known.sum()), float(np.mean(y_test == np.bincount(labels[known]).argmax()))))
            continue
        model = head().fit(x[known], labels[known])
        points.append((int(known.sum()), float(model.score(x_test, y_test))))
        probabilities = model.predict_proba(x) if strategy == "uncertainty" else None
    return points


def needed(points: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, accuracy in points if accuracy >= target), None)


def curves(name: str, x, y, x_test, y_test, seeds: int) -> dict:
    full = float(head().fit(x, y).score(x_test, y_test))
    result = {"all_labels": len(y), "all_labels_accuracy": full, "strategies": {}}
    for strategy in STRATEGIES:
        runs = []
        for seed in range(seeds):
            started = time.perf_counter()
            # each seed: a random 90 % of the pool, so that the deterministic strategies vary too
            sub = np.sort(np.random.default_rng(seed).choice(len(y), int(0.9 * len(y)), replace=False))
            runs.append(curve(x[sub], y[sub], x_test, y_test, strategy, seed))
            print(f"  {name} {strategy} seed {seed}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
        ns = [n for n, _ in runs[0]]
        accuracy = np.array([[a for _, a in run] for run in runs])
        result["strategies"][strategy] = {
            "labels": ns, "mean": accuracy.mean(0).tolist(), "std": accuracy.std(0).tolist(),
            "needed_95": [needed(run, 0.95 * full) for run in runs]}
    return result


def review(x, y, seeds: int, fraction: float = 0.05, top: int = 100) -> list[int]:
    """Flip `fraction` of the labels (to another class at random); how many flipped images are
    among the first `top` that the review lists, per seed."""
    classes = int(y.max()) + 1
    found = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        flips = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
        noisy = y.copy()
        noisy[flips] = (y[flips] + rng.integers(1, classes, len(flips))) % classes
        issues = find_label_issues(x, noisy, seed=seed)[:top]
        found.append(int(len({i.index for i in issues} & set(flips.tolist()))))
    return found


def timing(root: Path, n: int = 2000, retrain_every: int = 10) -> dict:
    """The real app on n ELPV images (a fresh feature store: a cold start): seconds from the first
    page load to features ready, then an oracle labels the first `retrain_every` images shown (by
    the API) and we wait for the retrained ranking; then the same with the store warm."""
    import httpx

    files = sorted((root / "train").glob("*/*.png")) + sorted((root / "test").glob("*/*.png"))
    work = Path(tempfile.mkdtemp(prefix="label-timing-"))
    pool = work / "pool"
    for f in files[:n]:
        target = pool / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    truth = {f"{f.parent.name}/{f.name}": "defective" if f.parent.name == "defective" else "functional"
             for f in files[:n]}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = {}
    for phase in ("cold", "warm"):
        port = 8765
        process = subprocess.Popen([sys.executable, "-m", "transferkit.cli", "label", str(pool), "--labels",
                                    str(work / "labels.csv"), "--cache-dir", str(work / "cache"), "--port", str(port),
                                    "--classes", "defective,functional",
                                    "--retrain-every", str(retrain_every)], env=env, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(url + "/", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    assert process.poll() is None, process.stderr.read().decode()
                    time.sleep(0.05)
            opened = time.perf_counter()
            state = wait(url, lambda s: s["status"] == "ready")
            ready = time.perf_counter()
            if phase == "cold":
                for item in state["queue"][:retrain_every]:
                    httpx.post(url + "/api/label", json={"path": item["path"], "label": truth[item["path"]]},
                               timeout=30).raise_for_status()
            labelled = time.perf_counter()
            state = wait(url, lambda s: s["retrains"] >= 1 and not s["retraining"])
            ranked = time.perf_counter()
            result[phase] = {"page_to_features": round(ready - opened, 1), "labelling_by_api": round(labelled - ready, 2),
                             "to_retrained_ranking": round(ranked - labelled, 2), "total": round(ranked - opened, 1),
                             "pool": state["pool"], "accuracy": state["accuracy"]}
        finally:
            process.terminate()
            process.wait(30)
    shutil.rmtree(work)
    return result


def wait(url: str, condition, timeout: float = 1800) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(url + "/api/state", timeout=30).json()
        if state["status"] == "failed":
            raise RuntimeError(state["error"])
        if condition(state):
            return state
        time.sleep(0.05)
    raise TimeoutError(url)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items()):
        for strategy, s in result["strategies"].items():
            mean, std = np.array(s["mean"]), np.array(s["std"])
            ax.plot(s["labels"], mean, label=strategy, marker=".")
            ax.fill_between(s["labels"], mean - std, mean + std, alpha=0.2)
        full = result["all_labels_accuracy"]
        ax.axhline(full, color="k", lw=0.8, label=f"all {result['all_labels']} labels")
        ax.axhline(0.95 * full, color="k", lw=0.8, ls="--", label="95 % of that")
        ax.set_xscale("log")
        ax.set_xticks((10, 20, *BUDGETS), [str(b) for b in (10, 20, *BUDGETS)])
        ax.set_xlabel("labels")
        ax.set_ylabel("test accuracy")
        ax.set_title(name)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict, seeds: int) -> str:
    lines = []
    for name, result in results.items():
        lines += [f"\n**{name}** (all {result['all_labels']} labels: {100 * result['all_labels_accuracy']:.1f} %; "
                  f"mean ± sd over {seeds} seeds, each a random 90 % of the pool)\n",
                  "| strategy | " + " | ".join(str(b) for b in BUDGETS) + " | labels to 95 % of all |",
                  "|---|" + "---:|" * (len(BUDGETS) + 1)]
        for strategy, s in result["strategies"].items():
            cells = [f"{100 * s['mean'][s['labels'].index(b)]:.1f} ± {100 * s['std'][s['labels'].index(b)]:.1f}"
                     for b in BUDGETS]
            reached = [n for n in s["needed_95"] if n is not None]
            need = (f"{np.mean(reached):.0f}" if len(reached) == len(s["needed_95"])
                    else f"> {BUDGETS[-1]} in {len(s['needed_95']) - len(reached)} seed(s)")
            lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {need} ({', '.join(map(str, s['needed_95']))}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elpv", type=Path, default=Path("data/elpv-split"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache-dir", default=None, help="feature store (default: ~/.cache/transferkit)")
    parser.add_argument("--plot", type=Path, default=Path("docs/active_curve.png"))
    parser.add_argument("--json", type=Path, default=Path("runs/bench-active/active_curve.json"))
    parser.add_argument("--part", choices=("all", "curves", "timing"), default="all")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"load_average_at_start": os.getloadavg()}
    if args.part in ("all", "curves"):
        featurizer = Featurizer.build(cache_dir=args.cache_dir)
        started = time.perf_counter()
        sets = {"ELPV (1,968 pool / 656 test)": elpv(featurizer, args.elpv),
                "digits (load_digits, 1,197 pool / 600 test)": digits(featurizer)}
        print(f"features: {time.perf_counter() - started:.0f}s", file=sys.stderr)
        with threadpool_limits(1, user_api="blas"):
            report["curves"] = {name: curves(name, *data, seeds=args.seeds) for name, data in sets.items()}
            report["review_flips_in_top_100"] = {name: review(data[0], data[1], args.seeds)
                                                 for name, data in sets.items()}
        plot(report["curves"], args.plot)
        print(table(report["curves"], args.seeds))
        for name, found in report["review_flips_in_top_100"].items():
            n = len(sets[name][1])
            print(f"\nreview, {name}: {int(round(0.05 * n))} of {n} labels flipped; among the first 100 listed: "
                  f"{found} (mean {np.mean(found):.1f})")
    if args.part in ("all", "timing"):
        report["timing"] = timing(args.elpv)
        print("\ntiming:", json.dumps(report["timing"]))
    report["load_average_at_end"] = os.getloadavg()
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"load average (1, 5, 15 min): {report['load_average_at_start']} at the start, "
          f"{report['load_average_at_end']} at the end")


if __name__ == "__main__":
    main()
