"""Prediction speed and accuracy: PyTorch vs ONNX Runtime float32 vs int8 (static and dynamic),
same run, same images, same number of threads. Prints the table and writes it to
bench/results/predict_speed.json (tools/docs_tables.py renders it into docs/benchmarks.md).

    python bench/predict_speed.py --run runs/demo --data data/elpv/test --train data/elpv/train

The int8 models are calibrated and checked on the run's own validation split (rebuilt from
--train with the run's val_split and seed), as `transferkit export --quantize` does with --val-dir.
The validation drop is in percentage points (float accuracy minus quantized, x 100), the unit of
`export --tolerance`: a drop above the tolerance (1 point by default) is refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import Quiet, write  # noqa: E402

from transferkit.data.decode import decode
from transferkit.data.listing import from_folder, load_labelled
from transferkit.data.split import stratified_split
from transferkit.deploy.export import export
from transferkit.predict.onnx_engine import OnnxClassifier
from transferkit.predict.run import load


def validation_csv(run: Path, train: Path, out: Path) -> Path:
    """The run's validation split as a CSV (train.py's split: stratified, val_split, seed)."""
    config = json.loads((run / "model.json").read_text())["config"]
    data = from_folder(train)
    _, val = stratified_split(data.labels, config["val_split"], config["seed"])
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([str(Path(data.paths[i]).resolve()), data.classes[data.labels[i]]] for i in val)
    return out


def timed(engine, images: np.ndarray, batch_size: int, repeats: int) -> tuple[np.ndarray, float]:
    engine.predict_proba(images[:batch_size], batch_size)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        probs = engine.predict_proba(images, batch_size)
        best = min(best, time.perf_counter() - start)
    return probs, len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/elpv/test"), help="Labelled test folder.")
    parser.add_argument("--train", type=Path, default=Path("data/elpv/train"), help="The run's training folder.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    quiet = Quiet()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("*.onnx", "*.pt2"))
        val = validation_csv(run, args.train, Path(tmp) / "val.csv")
        reports = {"onnxruntime fp32": export(run, out=run / "fp32.onnx")}
        for mode in ("int8", "int8-dynamic"):
            start = time.perf_counter()
            reports[f"onnxruntime {mode}"] = export(run, out=run / f"{mode}.onnx", quantize_mode=mode,
                                                    val_data=val, force=True)
            reports[f"onnxruntime {mode}"]["seconds"] = time.perf_counter() - start
        torch_model = load(run)
        test = decode(load_labelled(args.data, torch_model.classes), torch_model.image_size)
        engines = {"torch": torch_model,
                   **{name: OnnxClassifier(report["path"], args.threads) for name, report in reports.items()}}
        rows = []
        for name, engine in engines.items():
            probs, speed = timed(engine, test.images, args.batch_size, args.repeats)
            predicted = np.array([engine.classes.index(c) for c in engine.labels(probs)])
            rows.append((name, (predicted == test.labels).mean() * 100, speed,
                         reports.get(name, {}).get("drop"), Path(reports[name]["path"]).stat().st_size
                         if name in reports else (run / "model.safetensors").stat().st_size))
    base = rows[0][2]
    print(f"\n{len(test)} test images ({args.data}), {torch_model.image_size} px, {args.threads} threads, "
          f"batch {args.batch_size}, torch {torch.__version__}\n")
    print("| engine | test accuracy | validation drop (points) | images/s | speed-up vs torch | file size |")
    print("|---|---:|---:|---:|---:|---:|")
    records = []
    for name, acc, speed, drop, size in rows:
        points = None if drop is None else drop * 100  # the report's drop is a fraction of the images
        print(f"| {name} | {acc:.2f} % | {'' if points is None else f'{points:+.2f}'} | {speed:.1f} | "
              f"{speed / base:.2f}x | {size / 2**20:.1f} MiB |")
        records.append({"engine": name, "test_accuracy": acc, "validation_drop_points": points,
                        "within_default_tolerance": None if points is None else points <= 1.0,
                        "images_per_s": speed, "speedup": speed / base, "file_mib": size / 2**20})
    by_engine = {r["engine"]: r for r in records}
    path = write("predict_speed", {
        "settings": {"run": str(args.run), "test_images": len(test), "image_size": torch_model.image_size,
                     "threads": args.threads, "batch_size": args.batch_size, "torch": torch.__version__},
        "tables": {"predict_speed": {
            "columns": [{"title": "engine", "key": "engine"},
                        {"title": "test accuracy", "key": "test_accuracy", "format": "{:.2f} %", "align": "right"},
                        {"title": "validation drop (points)", "key": "validation_drop_points", "format": "{:+.2f}",
                         "align": "right"},
                        {"title": "within the default tolerance (1 point)", "key": "within_default_tolerance",
                         "format": "{}", "align": "right"},
                        {"title": "images/s", "key": "images_per_s", "format": "{:.1f}", "align": "right"},
                        {"title": "speed-up vs torch", "key": "speedup", "format": "{:.2f}x", "align": "right"},
                        {"title": "file size", "key": "file_mib", "format": "{:.1f} MiB", "align": "right"}],
            "rows": records,
            "note": f"{len(test)} test images of `{args.data}`, {torch_model.image_size} px, {args.threads} "
                    f"threads, batch {args.batch_size}, torch {torch.__version__}; the run: `{args.run}`."}},
        "figures": {
            "onnx_speedup": {"value": by_engine["onnxruntime fp32"]["speedup"], "format": "{:.1f}x"},
            "int8_speedup": {"value": by_engine["onnxruntime int8"]["speedup"], "format": "{:.1f}x"},
            "int8_drop_points": {"value": by_engine["onnxruntime int8"]["validation_drop_points"],
                                 "format": "{:.2f} points"},
        }}, quiet=quiet)
    print(f"\nwrote {path}")

if __name__ == "__main__":
    main()
