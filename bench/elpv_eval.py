"""Evaluate trained runs on the ELPV test split: with and without test-time augmentation (the
mirror), at the run's own threshold, and with a temperature and threshold refitted on the run's
validation split (rebuilt from its seed and val_split) by the current code.

    python bench/elpv_eval.py RUN [RUN...] [--data data/elpv-split]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import transferkit
from transferkit.data.decode import decode
from transferkit.data.listing import load_labelled
from transferkit.data.split import stratified_split
from transferkit.models.inference import predict_logits
from transferkit.predict.metrics import classification_metrics
from transferkit.training.calibrate import choose_threshold, fit_temperature

KEYS = ("accuracy", "balanced_accuracy", "roc_auc", "average_precision", "loss", "ece")


def summary(labels, probs, classes, threshold) -> dict:
    m = classification_metrics(labels, probs, classes, threshold)
    return {k: round(m[k], 4) for k in KEYS} | {"accuracy_ci95": [round(v, 4) for v in m["accuracy_ci95"]],
                                                "threshold": round(threshold, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/elpv-split"))
    args = parser.parse_args()
    for run in args.runs:
        clf = transferkit.load(run)
        model, config = clf.model, clf.meta["config"]
        test = decode(load_labelled(args.data / "test", clf.classes), clf.image_size)
        raw = load_labelled(args.data / "train", clf.classes)
        _, val_idx = stratified_split(raw.labels, config["val_split"], config["seed"])
        val = decode(raw.subset(val_idx), clf.image_size)
        logits = {name: predict_logits(model, images, batch_size=64) for name, images in (
            ("val", val.images), ("test", test.images), ("test_mirror", np.ascontiguousarray(test.images[:, :, ::-1])))}
        result = {"run": str(run), "stored_threshold": clf.threshold, "stored_temperature": clf.meta["temperature"]}
        for temperature, name in ((clf.meta["temperature"], "stored"),
                                  (fit_temperature(logits["val"], val.labels), "refit")):
            model.temperature = temperature
            p = {k: model.probabilities(torch.from_numpy(v)).numpy() for k, v in logits.items()}
            tta = (p["test"] + p["test_mirror"]) / 2
            threshold = clf.threshold if name == "stored" else choose_threshold(
                val.labels, p["val"][:, 1], config.get("threshold_metric", "balanced_accuracy"))["threshold"]
            result[name] = {"temperature": round(temperature, 4),
                            "test": summary(test.labels, p["test"], clf.classes, threshold),
                            "test_tta": summary(test.labels, tta, clf.classes, threshold)}
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
