"""The same image twice: merged before the split, refused across a held-out split."""

from __future__ import annotations

import numpy as np

from ..utils.errors import DataError
from .listing import LabelledImages


def merge_duplicates(data: LabelledImages, origin: str) -> LabelledImages:
    """One copy of each image: copies with the same label are merged (the extra copies are listed
    as skipped, naming the kept one); copies with different labels are refused, or for multi-label
    data merged with their labels combined. Done before the split, so that no image can be on both
    sides of it."""
    first: dict[str, int] = {}
    keep, merged, combined = [], [], 0
    labels = data.labels.copy()
    for i, key in enumerate(data.keys()):
        j = first.setdefault(key, i)
        if j == i:
            keep.append(i)
            continue
        reason = f"same image as {data.paths[j]} (merged)"
        if (labels[j] != labels[i]).any():
            if not data.multilabel:
                raise DataError(f"{origin}: the same image is labelled {data.classes[labels[j]]!r} "
                                f"({data.paths[j]}) and {data.classes[labels[i]]!r} ({data.paths[i]}); "
                                "one image, one label")
            labels[j] |= labels[i]
            combined += 1
            reason = f"same image as {data.paths[j]} (merged; their labels combined)"
        merged.append((data.paths[i], reason))
    if not merged:
        return data
    result = LabelledImages(data.paths, labels, data.classes, images=data.images, highbit=data.highbit,
                            _keys=data._keys, groups=data.groups).subset(
        np.asarray(keep))
    result.skipped = data.skipped + merged
    result.notes = data.notes + [f"{origin}: {len(merged)} duplicate image(s) " + (
        f"merged, {combined} of them with their labels combined" if combined else "with the same label merged")
        + " (listed in skipped.csv)"]
    return result


def shared_images(a: LabelledImages, b: LabelledImages) -> list[tuple[str, str]]:
    """Pairs of paths (in a, in b) that hold the same image."""
    paths = dict(zip(a.keys(), a.paths))
    return [(paths[key], path) for key, path in zip(b.keys(), b.paths) if key in paths]

