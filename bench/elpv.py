"""ELPV benchmark: train on the fixed stratified 1,968-cell split (seed 0), test on the other 656
(the split size of Deitsch et al. 2019: VGG-19 88.42 %, SVM 82.44 %), print test accuracy with its
95 % interval, balanced accuracy, ROC-AUC, average precision, and the wall time of each phase.

    python bench/elpv.py [--backbone NAME] [--image-size N] [any other train option as --key value]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare_elpv import write  # noqa: E402

import transferkit  # noqa: E402
from transferkit.cfg.settings import from_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/elpv-split"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-elpv"))
    args, rest = parser.parse_known_args()
    config = from_arguments(rest)  # any train option, named and checked as on the command line
    if not (args.data / "train").is_dir():  # a prepared copy (another machine's) is used as it is
        write(args.data, split=True)
    start = time.perf_counter()
    classifier = transferkit.train(args.data / "train", args.out, config)
    train_seconds = time.perf_counter() - start
    test = classifier.evaluate(args.data / "test")
    history = [line.split(",") for line in (args.out / "history.csv").read_text().splitlines()]
    rows = [dict(zip(history[0], r)) for r in history[1:]]
    phase = {p: sum(float(r["seconds"]) for r in rows if r["phase"] == p) for p in ("1", "2")}
    result = {
        "config": config.to_dict(),
        "test_accuracy": test["accuracy"],
        "test_accuracy_ci95": test["accuracy_ci95"],
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_roc_auc": test["roc_auc"],
        "test_average_precision": test["average_precision"],
        "test_ece": test["ece"],
        "threshold": classifier.threshold,
        "temperature": classifier.meta["temperature"],
        "test_n": test["n"],
        "kept_epoch": classifier.meta["best_epoch"],
        "phase1_seconds": round(phase["1"], 1),
        "phase2_seconds": round(phase["2"], 1),
        "train_total_seconds": round(train_seconds, 1),
    }
    print(json.dumps(result, indent=2))
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
