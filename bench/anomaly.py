"""Anomaly detection from good images alone (`train --task anomaly`), measured through the command a
user runs: ELPV solar cells (train on the functional cells of the paper split's training part,
evaluate on its 656 test cells, defective = anomalous), and a semantic set (LFW faces normal, LFW
backgrounds and texture photographs anomalous). Writes bench/results/anomaly.json.

    python bench/anomaly.py --sets elpv --seeds 0            # about 5 min on 2 quiet cores
    python bench/anomaly.py --sets faces --seeds 0 1 2
    python bench/anomaly.py --sets elpv --seeds 0 --caps 2 8 32
    python bench/anomaly.py --sets elpv faces --methods patches gaussian --seeds 0 1 2

The first seed of a set starts from an empty view store (a fresh cache folder); later seeds reuse
the patch features stored by the first (their "reused" column), as a user's second run would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Quiet, read, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def elpv(root: Path) -> tuple[Path, Path, str]:
    subprocess.run([sys.executable, str(ROOT / "bench" / "prepare_elpv.py"), str(root), "--split"], check=True,
                   capture_output=True)
    return root / "train", root / "test", "functional"


def faces(root: Path) -> tuple[Path, Path, str]:
    """LFW (scikit-image): 70 faces train; test: 30 held-out faces vs 30 backgrounds and 30 crops of
    texture photographs (brick, grass, gravel)."""
    from PIL import Image
    from skimage import data
    from skimage.data import lfw_subset

    images = (lfw_subset() * 255).round().astype(np.uint8)
    rng = np.random.default_rng(5)
    textures = []
    for i in range(30):
        src = [data.brick(), data.grass(), data.gravel()][i % 3]
        y, x = rng.integers(0, src.shape[0] - 100, 2)
        textures.append(np.asarray(Image.fromarray(src[y:y + 100, x:x + 100]).resize((25, 25))))
    groups = {("train", "face"): images[:70], ("test", "face"): images[70:100],
              ("test", "background"): images[100:130], ("test", "texture"): textures}
    for (split, name), arrays in groups.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a).save(root / split / name / f"{i:03d}.png")
    return root / "train", root / "test", "face"


SETS = {"elpv": (elpv, []), "faces": (faces, ["--image-size", "96"])}


def one(name: str, seed: int, cap: float | None, cache: Path, work: Path, threads: int | None,
        method: str = "patches") -> dict:
    maker, options = SETS[name]
    train_dir, test_dir, normal = maker(work / "data" / name)
    out = work / "runs" / f"{name}-{method}-{seed}-{cap or 'default'}"
    cap_opt = [] if cap is None else ["--anomaly-bank-mib", str(cap)]
    started = time.perf_counter()
    threads_opt = ["--threads", str(threads)] if threads else []
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", "train", str(train_dir), "--out", str(out),
                           "--overwrite", "--task", "anomaly", "--normal-class", normal, "--seed", str(seed),
                           "--anomaly-method", method, *cap_opt, "--cache-dir", str(cache), *threads_opt, *options,
                           "--quiet"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    trained = time.perf_counter() - started
    metrics_file = out / "test_metrics.json"
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", "evaluate", str(out), str(test_dir),
                           "--normal-class", normal, "--output", str(metrics_file)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    total = time.perf_counter() - started
    m = json.loads(metrics_file.read_text())
    meta = json.loads((out / "model.json").read_text())
    row = {"set": name, "method": method, "seed": seed, "cap_mib": meta["anomaly"]["cap_mib"], "auroc": round(m["auroc"], 4), "auroc_ci95": m["auroc_ci95"],
           "average_precision": round(m["average_precision"], 4), "f1": round(m["f1"], 4),
           "f1_best_threshold": round(m["f1_best_threshold"], 4), "false_alarm_rate": round(m["false_alarm_rate"], 4),
           "miss_rate": round(m["miss_rate"], 4), "n_test": m["n"], "bank_rows": meta["anomaly"]["bank_rows"],
           "bank_mib": meta["anomaly"]["bank_mib"], "bank_images": meta["anomaly"]["bank_images"],
           "holdout_images": meta["anomaly"]["holdout_images"], "timings": meta["timings"],
           "train_command_seconds": round(trained, 1), "train_and_test_seconds": round(total, 1)}
    print(json.dumps(row), flush=True)
    return row


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """The mean, with the range when there are several values: 0.905 (0.899-0.911)."""
    mean = fmt.format(float(np.mean(values)))
    return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def tables(rows: list[dict]) -> dict:
    """docs/anomaly.md's table: each set and method, over its seeds."""
    out = []
    for key in sorted({(r["set"], r.get("method", "patches"), r["cap_mib"]) for r in rows}):
        mine = [r for r in rows if (r["set"], r.get("method", "patches"), r["cap_mib"]) == key]
        out.append({"set": key[0], "method": key[1], "cap": key[2], "seeds": len(mine),
                    "auroc": spread([r["auroc"] for r in mine]),
                    "ap": spread([r["average_precision"] for r in mine]),
                    "f1": spread([r["f1"] for r in mine]), "best_f1": spread([r["f1_best_threshold"] for r in mine]),
                    "false_alarm": spread([r["false_alarm_rate"] for r in mine]),
                    "miss": spread([r["miss_rate"] for r in mine]),
                    "train_s": spread([r["timings"]["total_seconds"] for r in mine], "{:.0f}"),
                    "total_s": spread([r["train_and_test_seconds"] for r in mine], "{:.0f}")})
    columns = [("set", "set"), ("method", "--anomaly-method"), ("cap", "cap (MiB)"), ("seeds", "seeds"),
               ("auroc", "AUROC, mean (range)"), ("ap", "AP"), ("f1", "F1 at the threshold"),
               ("best_f1", "best F1"), ("false_alarm", "false-alarm rate"), ("miss", "miss rate"),
               ("train_s", "training, in-process (s)"), ("total_s", "train + evaluate commands, wall (s)")]
    return {"anomaly": {"columns": [{"key": k, "title": t} for k, t in columns], "rows": out}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["elpv", "faces"], choices=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--caps", nargs="+", type=float, default=[None], help="default: each method's own")
    parser.add_argument("--methods", nargs="+", default=["patches"], choices=["patches", "gaussian"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-anomaly")
    args = parser.parse_args()
    quiet = Quiet()
    try:
        rows = read("anomaly").get("rows", [])
    except (OSError, ValueError):
        rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.sets:
            for method in args.methods:
                for cap in args.caps:
                    for seed in args.seeds:
                        row = one(name, seed, cap, Path(cache), args.work, args.threads, method)
                        key = (row["set"], row["method"], row["seed"], row["cap_mib"])
                        rows = [r for r in rows if (r["set"], r.get("method", "patches"), r["seed"], r["cap_mib"])
                                != key] + [row]
                        write("anomaly", {"rows": rows, "tables": tables(rows)}, quiet=quiet,
                              command=sys.argv)  # after each run


if __name__ == "__main__":
    main()
