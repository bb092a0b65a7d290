"""Write the ELPV solar-cell images (PyPI elpv-dataset, CC BY-NC-SA: never commit them) into
class folders: functional/ (defect probability < 0.5) and defective/ (>= 0.5).

    python bench/prepare_elpv.py data/elpv                  # all 2,624 cells (the demo)
    python bench/prepare_elpv.py data/elpv-split --split    # train/ (1,968) and test/ (656), seed 0
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np


def elpv_rows() -> list[tuple[Path, float]]:
    """Each image's path and the defect probability the experts gave it (0, 1/3, 2/3 or 1), from
    the installed package."""
    try:
        import elpv_dataset
    except ImportError:
        raise SystemExit("error: elpv-dataset is not installed (pip install elpv-dataset)") from None
    root = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    return [(root / r[0], float(r[1])) for r in rows]


def elpv_probabilities() -> dict[str, float]:
    """The defect probability of each image, by its file name (cell0001.png)."""
    return {path.name: p for path, p in elpv_rows()}


def elpv_labels() -> tuple[list[Path], np.ndarray]:
    """Image paths and binary labels (1 = defective: probability at least 0.5)."""
    rows = elpv_rows()
    return [path for path, _ in rows], np.array([p >= 0.5 for _, p in rows], dtype=int)


def write(out: Path, split: bool) -> dict[str, int]:
    paths, labels = elpv_labels()
    names = np.array(["functional", "defective"])[labels]
    groups = {"": np.arange(len(paths))}
    if split:
        from sklearn.model_selection import train_test_split

        train, test = train_test_split(np.arange(len(paths)), test_size=656, stratify=labels,
                                       random_state=0)
        groups = {"train": train, "test": test}
    counts = {}
    for group, index in groups.items():
        for i in index:
            target = out / group / names[i] / paths[i].name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(paths[i], target)
            key = f"{group}/{names[i]}".lstrip("/")
            counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", action="store_true", help="the fixed 1,968/656 split of Deitsch et al.")
    args = parser.parse_args()
    print(f"{args.out}: {write(args.out, args.split)}")
