"""Where trained runs go wrong on the ELPV test split, by the defect probability the dataset's
experts gave each cell (0, 1/3, 2/3, 1; functional vs defective at 0.5), and what averaging the
runs' probabilities (an ensemble) would score.

    python bench/elpv_errors.py RUN [RUN...] [--data data/suite/elpv]

The runs' own size decides how each decodes the test images; the labels come from the installed
`elpv-dataset` package (bench/prepare_elpv.py writes the folders from it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from prepare_elpv import elpv_probabilities

import transferkit
from transferkit.predict.metrics import classification_metrics, predict_labels

LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/suite/elpv"))
    args = parser.parse_args()
    expert = elpv_probabilities()
    decoded, probabilities, first = {}, [], None
    for run in args.runs:
        try:
            clf = transferkit.load(run)
        except transferkit.TransferkitError as exc:
            raise SystemExit(f"error: {exc}") from None
        first = first or clf
        if (clf.classes, clf.threshold) != (first.classes, first.threshold):  # else the mean mixes classes
            raise SystemExit(f"error: {run}: classes {clf.classes} at threshold {clf.threshold}, but "
                             f"{args.runs[0]} has {first.classes} at {first.threshold}")
        if clf.image_size not in decoded:
            decoded[clf.image_size] = clf.read_labelled(args.data / "test")
        test = decoded[clf.image_size]
        level = np.array([expert[Path(p).name] for p in test.paths])
        p = clf.predict_proba(test.images)
        wrong = predict_labels(p, clf.threshold) != np.asarray(test.labels)
        probabilities.append(p)
        certain = (level == 0) | (level == 1)
        by_level = ", ".join(f"{lv:.2f}: {int(wrong[np.isclose(level, lv)].sum())} of {int(np.isclose(level, lv).sum())}"
                             for lv in LEVELS)
        print(f"{run}: accuracy {1 - wrong.mean():.1%}; errors by defect probability {by_level}; "
              f"accuracy on certain cells (0 or 1) {1 - wrong[certain].mean():.1%}, on uncertain ones "
              f"{1 - wrong[~certain].mean():.1%}", flush=True)
    if len(probabilities) > 1:
        m = classification_metrics(test.labels, np.mean(probabilities, axis=0), first.classes, first.threshold)
        print(f"ensemble of {len(probabilities)} (mean probability): accuracy {m['accuracy']:.1%}, "
              f"balanced accuracy {m['balanced_accuracy']:.1%}")

if __name__ == "__main__":
    main()
