"""A few labelled defects as well as the good parts: what helps? On ELPV's paper split (bench/
prepare_elpv.py --split, seed 0), every functional training cell and K defective ones drawn at
random (seeded) train three ways, each tested on the split's 656 test cells (defective = the
positive class):

- `anomaly-keep`: `train --task anomaly` on the good cells alone (`--anomaly-method`, default
  gaussian here), the threshold at --anomaly-keep 0.99 (the K defects unused);
- `anomaly-f1`: the same bank, the threshold fitted at the best F1 on the held-out good cells and
  the K defects (`--anomaly-threshold f1`);
- `classifier`: the supervised two-phase classifier (`train` with its defaults) on the good cells
  and the K defects.

Writes bench/results/anomaly_few.json: AUROC, average precision, F1 of the defective class, the
false-alarm and miss rates, and the wall time of each way.

    python bench/anomaly_few.py --defects 10 50 --seeds 0
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly import elpv  # noqa: E402
from results import Quiet, read, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "transferkit.cli"]


def run(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:3])}: {proc.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 1)


def folder(train_dir: Path, out: Path, k: int, seed: int) -> Path:
    """Links to every functional training cell and K defective ones."""
    if out.exists():
        shutil.rmtree(out)
    (out / "functional").mkdir(parents=True)
    (out / "defective").mkdir()
    for p in sorted((train_dir / "functional").iterdir()):
        os.symlink(p.resolve(), out / "functional" / p.name)
    defective = sorted((train_dir / "defective").iterdir())
    for i in np.sort(np.random.default_rng(seed).choice(len(defective), k, replace=False)):
        os.symlink(defective[i].resolve(), out / "defective" / defective[i].name)
    return out


def anomaly_row(way: str, k: int, seed: int, run_dir: Path, test_dir: Path, train_s: float) -> dict:
    test_s = run("evaluate", str(run_dir), str(test_dir), "--output", str(run_dir / "test.json"))
    m = json.loads((run_dir / "test.json").read_text())
    return {"way": way, "defects": k, "seed": seed, "auroc": round(m["auroc"], 4),
            "average_precision": round(m["average_precision"], 4), "f1": round(m["f1"], 4),
            "false_alarm_rate": round(m["false_alarm_rate"], 4), "miss_rate": round(m["miss_rate"], 4),
            "threshold": m["threshold"], "train_seconds": train_s, "test_seconds": test_s}


def classifier_row(k: int, seed: int, data: Path, run_dir: Path, test_dir: Path, cache: Path) -> dict:
    train_s = run("train", str(data), "--out", str(run_dir), "--overwrite", "--seed", str(seed), "--cache-dir",
                  str(cache), "--quiet")
    test_s = run("evaluate", str(run_dir), str(test_dir), "--output", str(run_dir / "test.json"))
    m = json.loads((run_dir / "test.json").read_text())
    per = m["per_class"]["defective"]
    confusion = m["confusion_matrix"]
    labels, matrix = confusion["labels"], np.array(confusion["rows_true_cols_predicted"])
    d, f = labels.index("defective"), labels.index("functional")
    return {"way": "classifier", "defects": k, "seed": seed, "auroc": round(m["roc_auc"], 4),
            "average_precision_functional": round(m["average_precision"], 4), "f1": round(per["f1"], 4),
            "false_alarm_rate": round(matrix[f, d] / matrix[f].sum(), 4),
            "miss_rate": round(matrix[d, f] / matrix[d].sum(), 4), "accuracy": round(m["accuracy"], 4),
            "train_seconds": train_s, "test_seconds": test_s}


def tables(rows: list[dict]) -> dict:
    """docs/anomaly.md's table: each way and number of defects, over its seeds (mean and range)."""
    from anomaly import spread

    out = []
    order = {"anomaly-keep": 0, "anomaly-f1": 1, "classifier": 2}
    for way, k in sorted({(r["way"], r["defects"]) for r in rows}, key=lambda t: (t[1], order[t[0]])):
        mine = [r for r in rows if (r["way"], r["defects"]) == (way, k)]
        out.append({"way": way, "defects": k, "seeds": len(mine), "auroc": spread([r["auroc"] for r in mine]),
                    "f1": spread([r["f1"] for r in mine]),
                    "false_alarm": spread([r["false_alarm_rate"] for r in mine]),
                    "miss": spread([r["miss_rate"] for r in mine]),
                    "train_s": spread([r["train_seconds"] for r in mine], "{:.0f}")})
    columns = [("way", "way"), ("defects", "labelled defects"), ("seeds", "seeds"), ("auroc", "AUROC"),
               ("f1", "F1 (defective)"), ("false_alarm", "false-alarm rate"), ("miss", "miss rate"),
               ("train_s", "train command, wall (s)")]
    return {"anomaly_few": {"columns": [{"key": a, "title": b} for a, b in columns], "rows": out}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defects", nargs="+", type=int, default=[10, 30, 100])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--ways", nargs="+", default=["anomaly-keep", "anomaly-f1", "classifier"])
    parser.add_argument("--anomaly-method", default="gaussian", choices=["patches", "gaussian"],
                        help="the anomaly ways' method (gaussian: ELPV's cells are framed the same way)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-anomaly")
    args = parser.parse_args()
    quiet = Quiet()
    train_dir, test_dir, _ = elpv(args.work / "data" / "elpv")
    try:
        rows = read("anomaly_few").get("rows", [])
    except (OSError, ValueError):
        rows = []

    def keep(row: dict) -> None:
        nonlocal rows
        rows = [r for r in rows if (r["way"], r["defects"], r["seed"]) != (row["way"], row["defects"], row["seed"])]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write("anomaly_few", {"rows": rows, "tables": tables(rows)}, quiet=quiet, command=sys.argv)

    with tempfile.TemporaryDirectory() as cache:
        for seed in args.seeds:
            for k in args.defects:
                data = folder(train_dir, args.work / "few" / f"train-{k}-{seed}", k, seed)
                common = ["--task", "anomaly", "--normal-class", "functional", "--seed", str(seed), "--cache-dir",
                          cache, "--overwrite", "--quiet", "--anomaly-method", args.anomaly_method]
                if "anomaly-keep" in args.ways and k == args.defects[0]:  # the defects are unused: once per seed
                    out = args.work / "few" / f"keep-{seed}"
                    keep({**anomaly_row("anomaly-keep", 0, seed, out, test_dir,
                                        run("train", str(data), "--out", str(out), *common)), "defects": 0})
                if "anomaly-f1" in args.ways:
                    out = args.work / "few" / f"f1-{k}-{seed}"
                    keep(anomaly_row("anomaly-f1", k, seed, out, test_dir,
                                     run("train", str(data), "--out", str(out), *common, "--anomaly-threshold", "f1")))
                if "classifier" in args.ways:
                    keep(classifier_row(k, seed, data, args.work / "few" / f"clf-{k}-{seed}", test_dir, Path(cache)))


if __name__ == "__main__":
    main()
