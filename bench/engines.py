"""Engines side by side on one run: images/s (model only, uint8 images already decoded, batch 32,
the same threads) and test accuracy for PyTorch, ONNX Runtime float32 and static int8, OpenVINO
float32 and int8 (NNCF); then end to end, `predict` on the test folder (decoding included, the
engine `--engine` would load, best of 2). It measures the rule `--engine auto` follows
(predict/run.py AUTO_ORDER).

    python bench/engines.py --run RUN [--run RUN2 ...] --data TEST --calib CALIB [--threads 2]

The int8 models are calibrated and checked on --calib (a labelled folder that is not the test
set), with --force so that every engine is timed; each run is copied first, never changed.
Writes bench/results/engines.json.
"""

from __future__ import annotations

import argparse
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

from transferkit.deploy.export import export  # noqa: E402
from transferkit.predict.metrics import evaluation_metrics  # noqa: E402
from transferkit.predict.onnx_engine import OnnxClassifier  # noqa: E402
from transferkit.predict.openvino_engine import OpenVinoClassifier  # noqa: E402
from transferkit.data.listing import from_folder  # noqa: E402
from transferkit.predict.run import load  # noqa: E402


def speed(engine, images: np.ndarray, batch: int, repeats: int) -> float:
    engine.predict_proba(images[:batch], batch)  # warm-up: the shapes' kernels
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        engine.predict_proba(images, batch)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, action="append", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet = Quiet()
    torch.set_num_threads(args.threads)
    rows, e2e = [], []
    for source in args.run:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            shutil.copytree(source, run)
            classifier = load(run)
            data = classifier.read_labelled(args.data)
            paths = {"onnx fp32": export(run)["path"],
                     "onnx int8": export(run, out=run / "int8.onnx", quantize_mode="int8", val_data=args.calib,
                                         force=True)["path"],
                     "openvino fp32": export(run, format="openvino")["path"],
                     "openvino int8": export(run, format="openvino", out=run / "int8.xml", quantize_mode="int8",
                                             val_data=args.calib, force=True)["path"]}
            engines = {"torch": classifier, **{name: (OpenVinoClassifier if "openvino" in name else OnnxClassifier)(
                path, args.threads) for name, path in paths.items()}}
            for name, engine in engines.items():
                probs = engine.predict_proba(data.images, args.batch)
                accuracy = evaluation_metrics(data.labels, probs, engine.classes, engine.threshold)["accuracy"]
                rows.append({"run": str(source), "engine": name, "images_per_s": round(speed(
                    engine, data.images, args.batch, args.repeats), 1), "test_accuracy": accuracy,
                    "n_test": len(data.labels), "image_size": classifier.image_size,
                    "backbone": classifier.meta["backbone"]})
                print(rows[-1], flush=True)
                # after every row: a run cut short (a busy machine) still leaves what it measured
                write("engines", {"threads": args.threads, "batch": args.batch, "rows": rows, "end_to_end": e2e,
                                  "tables": tables(rows, e2e)}, quiet=quiet, command=sys.argv)
            files = [str(f) for f in from_folder(args.data).paths]
            for name, engine in engines.items():
                e2e.append({"run": str(source), "engine": name, "images_per_s": round(end_to_end(engine, files), 1),
                            "n": len(files)})
                print(e2e[-1], flush=True)
                write("engines", {"threads": args.threads, "batch": args.batch, "rows": rows, "end_to_end": e2e,
                                  "tables": tables(rows, e2e)}, quiet=quiet, command=sys.argv)


def end_to_end(engine, files: list[str], repeats: int = 2) -> float:
    """Images/s of `predict_files` over the folder's files: decoding, the model, the records."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        records = list(engine.predict_files(files))
        best = max(best, len(records) / (time.perf_counter() - start))
        assert not any("error" in r for r in records)
    return best


def tables(rows: list[dict], e2e: list[dict]) -> dict:
    """docs/deploy.md's table: each engine's model-only and end-to-end speed as a ratio to ONNX
    Runtime's in the same run, and its test accuracy."""
    out = []
    for r in rows:
        ref = next((x for x in rows if x["run"] == r["run"] and x["engine"] == "onnx fp32"), None)
        ref8 = next((x for x in rows if x["run"] == r["run"] and x["engine"] == "onnx int8"), None)
        fp32 = next((x for x in rows if x["run"] == r["run"] and x["engine"] == "torch"), None)
        mine = next((x for x in e2e if x["run"] == r["run"] and x["engine"] == r["engine"]), None)
        ref_e2e = next((x for x in e2e if x["run"] == r["run"] and x["engine"] == "onnx fp32"), None)
        out.append({"engine": r["engine"], "speed": r["images_per_s"],
                    "vs_onnx": r["images_per_s"] / ref["images_per_s"] if ref else None,
                    "vs_int8": r["images_per_s"] / ref8["images_per_s"] if ref8 else None,
                    "accuracy": 100 * r["test_accuracy"],
                    "drop": 100 * (fp32["test_accuracy"] - r["test_accuracy"]) if fp32 else None,
                    "e2e": mine["images_per_s"] if mine else None,
                    "e2e_vs_onnx": mine["images_per_s"] / ref_e2e["images_per_s"] if mine and ref_e2e else None})
    columns = [("engine", "engine", None), ("speed", "model only (images/s)", "{:.1f}"),
               ("vs_onnx", "vs ONNX fp32", "{:.2f}x"), ("vs_int8", "vs ONNX int8", "{:.2f}x"),
               ("accuracy", "test accuracy (%)", "{:.2f}"), ("drop", "below PyTorch (points)", "{:+.2f}"),
               ("e2e", "predict on the folder (images/s)", "{:.1f}"), ("e2e_vs_onnx", "vs ONNX fp32, end to end", "{:.2f}x")]
    return {"engines": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})} for k, t, f in columns],
                        "rows": out}}


if __name__ == "__main__":
    main()
