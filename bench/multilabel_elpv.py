"""Multi-label on real data: ELPV's solar cells labelled with any of two classes, `defective`
(defect probability >= 0.5) and `poly` (a polycrystalline cell; else monocrystalline), so that
a cell carries none, one or both. Train on the 1,968 cells of the fixed split (the one of
bench/prepare_elpv.py, seed 0) and evaluate on the other 656.

    python bench/multilabel_elpv.py runs/bench-multilabel --cache-dir ''        # defaults, every view extracted
    python bench/multilabel_elpv.py runs/bench-multilabel                       # again: the views of the first
    python bench/multilabel_elpv.py runs/bench-multilabel-plain --no-cache      # the plain loop

Any setting can follow, as the CLI names it (`--epochs 3`). Prints one JSON line: the test set's
mean average precision, micro/macro F1, subset accuracy, Hamming loss, training time; and keeps it
as a row of bench/results/multilabel.json (a row per run directory and settings, the latest kept). Source:
PyPI elpv-dataset (Buerhop-Lutz et al. 2018, Deitsch et al. 2019), CC BY-NC-SA 4.0: the script
reads the installed package's images in place and writes only two CSVs of paths.
"""

from __future__ import annotations

import csv
import shlex
import json
import sys
import time
from pathlib import Path

import numpy as np

import transferkit
from transferkit.cfg.settings import from_arguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Quiet, read, write  # noqa: E402


def elpv_rows() -> tuple[list[str], np.ndarray, list[str]]:
    """Absolute image paths, the binary defect label (the split's strata) and each cell's labels."""
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit("error: elpv-dataset is not installed (pip install elpv-dataset)") from None
    root = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    defective = np.array([float(r[1]) >= 0.5 for r in rows], dtype=int)
    labels = ["|".join(name for name, on in (("defective", d), ("poly", r[2] == "poly")) if on)
              for r, d in zip(rows, defective)]
    return [str(root / r[0]) for r in rows], defective, labels


def write_csvs(out: Path) -> tuple[Path, Path]:
    from sklearn.model_selection import train_test_split

    paths, defective, labels = elpv_rows()
    train, test = train_test_split(np.arange(len(paths)), test_size=656, stratify=defective, random_state=0)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, index in (("train", train), ("test", test)):
        with open(out / f"{name}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "labels"])
            writer.writerows([paths[i], labels[i]] for i in sorted(index))
        files.append(out / f"{name}.csv")
    return files[0], files[1]


def main(argv: list[str]) -> dict:
    quiet = Quiet()
    out = Path(argv[0])
    config = from_arguments(argv[1:])
    train_csv, test_csv = write_csvs(out.parent / (out.name + "-data"))
    start = time.perf_counter()
    classifier = transferkit.train(train_csv, out, config, overwrite=True)
    seconds = time.perf_counter() - start
    test = classifier.evaluate(test_csv)
    result = {"settings": config.changed(), "train_images": sum(1 for _ in open(train_csv)) - 1, "test_images": test["n"],
              "test_map": round(test["map"], 4), "test_f1_micro": round(test["f1_micro"], 4),
              "test_f1_macro": round(test["f1_macro"], 4), "test_subset_accuracy": round(test["accuracy"], 4),
              "test_hamming_loss": round(test["hamming_loss"], 4),
              "per_class_ap": {c: round(v["average_precision"], 4) for c, v in test["per_class"].items()},
              "train_seconds": round(seconds, 1), "best_epoch": classifier.meta["best_epoch"],
              "timings": classifier.meta["timings"], "run": str(out), "options": argv[1:],
              "views": "plain loop" if not config.cache else "every view extracted" if config.cache_dir == "" else
              "the view store (its extraction time says what it reused)"}
    print(json.dumps(result))
    try:
        rows = read("multilabel").get("rows", [])
    except (OSError, ValueError):
        rows = []
    rows = [r for r in rows if (r["run"], r["options"], r["views"]) != (result["run"], result["options"],
                                                                          result["views"])] + [result]
    write("multilabel", {"rows": rows, "tables": tables(rows)}, quiet=quiet, command=sys.argv)
    return result


def tables(rows: list[dict]) -> dict:
    columns = [("options", "options", None), ("views", "views", None), ("test_map", "test mAP", "{:.3f}"),
               ("test_f1_micro", "micro-F1", "{:.3f}"), ("test_f1_macro", "macro-F1", "{:.3f}"),
               ("test_subset_accuracy", "subset accuracy", "{:.3f}"), ("test_hamming_loss", "Hamming loss", "{:.3f}"),
               ("ap_defective", "AP defective", "{:.3f}"), ("ap_poly", "AP poly", "{:.3f}"),
               ("extract", "view extraction (s)", "{:.0f}"), ("train_seconds", "training (s)", "{:.0f}")]
    out = [{**{k: r[k] for k, _, _ in columns if k in r}, "options": shlex.join(r["options"]) or "(defaults)",
            "ap_defective": r["per_class_ap"].get("defective"), "ap_poly": r["per_class_ap"].get("poly"),
            "extract": r["timings"].get("extract_seconds")}
           for r in rows]
    return {"multilabel": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})} for k, t, f in columns],
                           "rows": out}}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
