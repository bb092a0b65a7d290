"""Same numbers before and after a change that must not change behaviour (a move, a refactor):
trains the suite's lfw and textures sets with the defaults and `--preset fast`, seeds 0-2, with
the code of two source trees, each run a fresh process with one thread (so that the numbers do
not depend on how busy the machine is), and compares the runs: test accuracy, the history (every
column but the epoch's seconds), the kept epoch and every weight tensor, bit for bit.

    git worktree add /tmp/before <commit>
    python bench/suite.py --prepare-only --sets lfw textures --data DATA
    python bench/same_numbers.py --data DATA --before /tmp/before/src --after src --out runs/same

Writes bench/results/same_numbers.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Quiet, write  # noqa: E402

WAYS = {"defaults": [], "fast": ["--preset", "fast"]}


def train(src: Path, data: Path, out: Path, way: str, seed: int) -> None:
    if (out / "test_metrics.json").is_file():
        return  # already trained (a stopped comparison continues)
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "XDG_CACHE_HOME": str(out) + ".cache"}
    done = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data / "train"), "--out", str(out),
                           "--overwrite", "--test-dir", str(data / "test"), *WAYS[way], "--seed", str(seed),
                           "--threads", "1", "--quiet"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{out}: training failed:\n{done.stderr[-2000:]}")


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def compare(before: Path, after: Path) -> dict:
    a, b = (json.loads((r / "test_metrics.json").read_text())["accuracy"] for r in (before, after))
    wa, wb = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    same_weights = wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    kept = [json.loads((r / "model.json").read_text())["best_epoch"] for r in (before, after)]
    return {"accuracy_before": a, "accuracy_after": b, "same_history": history(before) == history(after),
            "same_kept_epoch": kept[0] == kept[1], "same_weights": bool(same_weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="bench/suite.py --prepare-only's folder")
    parser.add_argument("--before", type=Path, required=True, help="the src/ folder of the code before")
    parser.add_argument("--after", type=Path, required=True, help="the src/ folder of the code after")
    parser.add_argument("--out", type=Path, default=Path("runs/same"))
    parser.add_argument("--sets", nargs="+", default=["lfw", "textures"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    quiet, rows = Quiet(), []
    for name in args.sets:
        for way in WAYS:
            for seed in args.seeds:
                runs = [args.out / side / f"{name}-{way}-{seed}" for side in ("before", "after")]
                for src, run in zip((args.before, args.after), runs):
                    train(src, args.data / name, run, way, seed)
                rows.append({"set": name, "way": way, "seed": seed, **compare(*runs)})
                print(json.dumps(rows[-1]), flush=True)
    identical = all(r["same_history"] and r["same_weights"] and r["same_kept_epoch"]
                    and r["accuracy_before"] == r["accuracy_after"] for r in rows)
    path = write("same_numbers", {"identical": identical, "rows": rows}, quiet=quiet)
    print(f"identical: {identical}; wrote {path}")


if __name__ == "__main__":
    main()
