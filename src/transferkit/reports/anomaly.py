"""`explain` on an anomaly run: the patch-score map over each image, as a PNG overlay. The colour
scale is fixed by the run, not by each image: blue is a typical good patch (the median of the
held-out good images' maps), red is the run's threshold or more, so a normal image stays blue and
an unusual region shows red wherever it is."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..data.decode import decoded_batches
from ..utils.files import write_bytes
from .explain import overlay_png


def heat(detector, maps: np.ndarray) -> np.ndarray:
    """Maps (N, S, S) of patch distances to [0, 1]: 0 at a typical good patch, 1 at the threshold."""
    low = float(detector.meta["anomaly"].get("map_reference", 0.0))
    high = max(detector.threshold, low + 1e-6)
    return np.clip((maps - low) / (high - low), 0.0, 1.0)


def explain_anomaly(detector, paths: Iterable[str | Path], out_dir: str | Path,
                    batch_size: int = 16) -> Iterator[dict]:
    """One overlay PNG per image in `out_dir` (NAME.png); yields {path, output, anomaly_score, label,
    threshold} or {path, error}, in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for batch in decoded_batches(paths, detector.image_size, batch_size):
        if isinstance(batch, tuple):
            yield {"path": batch[0], "error": batch[1]}
            continue
        images = np.stack([a for _, a in batch])
        scores, maps = detector.score(images, batch_size, maps=True)
        for (path, image), score, shown in zip(batch, scores, heat(detector, maps)):
            name = re.sub(r"[^\w.-]+", "_", Path(path).stem)
            while f"{name}.png" in used:
                name += "_"
            used.add(f"{name}.png")
            target = out_dir / f"{name}.png"
            write_bytes(target, overlay_png(image, shown))
            yield {**detector.record(path, score), "output": str(target)}
