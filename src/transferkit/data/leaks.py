"""The cheap part of `transferkit check` that `train` runs on the sets it uses: exact and
near-duplicate leaks between its training and validation images (its own split, or --val-dir)
and its test images (--test-dir), from the decoded images alone (content keys, perceptual hashes
confirmed by aligned thumbnails; no backbone), as findings in the schema of `check --format json`
(`leak_document`: the run's check.json)."""

from __future__ import annotations

import numpy as np

from .listing import LabelledImages
from .phash import (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_MATCH, HASH_BITS, cluster_members, clusters, match, nearest,
                    phash, signs, thumbnails)

CHUNK = 512


def _labels(data: LabelledImages, i: int):
    if data.multilabel:
        return [data.classes[c] for c in np.flatnonzero(data.labels[i])]
    return data.classes[int(data.labels[i])]


def leak_findings(parts: dict[str, LabelledImages], max_distance: int = DEFAULT_MAX_DISTANCE,
                  min_match: float = DEFAULT_MIN_MATCH, neighbours: int = 10) -> list[dict]:
    """Findings (dicts: kind, paths, score, sets, labels, pairs) for each cluster of the same or
    near-duplicate images with members in more than one of `parts` (name -> decoded images):
    a `leak`, and a `label_conflict` too when its members carry different labels. Edges: the same
    pixels (`image_key`), or a hash among each image's `neighbours` nearest within `max_distance`
    bits whose aligned thumbnails correlate at least `min_match` (`phash.match`). Score: 1 for
    the same pixels, else 1 - bits/64 of the weakest hash link (as `check --no-features`)."""
    parts = {name: data for name, data in parts.items() if data is not None and len(data)}
    if len(parts) < 2:
        return []
    paths, sets, labels, keys, bits, thumbs = [], [], [], [], [], []
    for name, data in parts.items():
        paths += list(data.paths)
        sets += [name] * len(data)
        labels += [_labels(data, i) for i in range(len(data))]
        keys += list(data.keys())
        for start in range(0, len(data), CHUNK):
            batch = np.asarray(data.images[start:start + CHUNK])
            bits.append(phash(batch))
            thumbs.append(thumbnails(batch))
    bits, thumbs, n = np.concatenate(bits), np.concatenate(thumbs), len(paths)
    evidence: dict[tuple[int, int], dict] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            evidence[(j, i)] = {"same_pixels": True}
    k = min(neighbours, n - 1)
    if k >= 1 and max_distance >= 0:
        index, score = nearest(signs(bits), k)
        distance = np.rint((HASH_BITS - score) / 2).astype(int)
        proposed = {}
        for i, j in zip(*np.nonzero(distance <= max_distance)):
            a, b = sorted((int(i), int(index[i, j])))
            if (a, b) not in evidence and sets[a] != sets[b]:  # only links across sets can leak
                proposed[(a, b)] = int(distance[i, j])
        if proposed:
            scores = match(thumbs, list(proposed))
            for (pair, bits_apart), value in zip(proposed.items(), scores):
                if value >= min_match:
                    evidence[pair] = {"hamming": bits_apart, "match": round(float(value), 4)}
    if not evidence:
        return []
    members, links = cluster_members(clusters(n, list(evidence)), evidence)
    findings = []
    for c, rows in members.items():
        if len(rows) < 2 or len({sets[i] for i in rows}) < 2:
            continue
        pairs = links[c]
        worst = max((e.get("hamming", int((bits[a] != bits[b]).sum())) for a, b, e in pairs
                     if not e.get("same_pixels")), default=0)
        score = 1.0 if all(e.get("same_pixels") for _, _, e in pairs) else round(1.0 - worst / HASH_BITS, 4)
        detail = {"sets": [sets[i] for i in rows], "labels": [labels[i] for i in rows],
                  "pairs": [{"a": paths[a], "b": paths[b], **e,
                             "hamming": e.get("hamming", int((bits[a] != bits[b]).sum()))} for a, b, e in pairs]}
        findings.append({"kind": "leak", "paths": [paths[i] for i in rows], "score": score, **detail})
        if len({str(labels[i]) for i in rows}) > 1:
            findings.append({"kind": "label_conflict", "paths": [paths[i] for i in rows], "score": score, **detail})
    findings.sort(key=lambda f: (f["kind"] != "leak", -f["score"]))
    return findings


def cross_pairs(findings: list[dict], side: str, other: str = "train") -> list[tuple[str, str, int]]:
    """(path in `side`, path in `other`, hash bits) of each linked pair across the two sets in
    the leak findings, in order: what a warning names."""
    where = {p: s for f in findings if f["kind"] == "leak" for p, s in zip(f["paths"], f["sets"])}
    found = []
    for f in findings:
        if f["kind"] != "leak":
            continue
        for pair in f["pairs"]:
            a, b = pair["a"], pair["b"]
            if (where[a], where[b]) == (other, side):
                a, b = b, a
            if (where[a], where[b]) == (side, other):
                found.append((a, b, int(pair["hamming"])))
    return found


def leak_document(findings: list[dict], sets: dict[str, int], max_distance: int = DEFAULT_MAX_DISTANCE,
                  min_match: float = DEFAULT_MIN_MATCH) -> dict:
    """check.json's document for these findings (the schema of `check --format json`: counts of
    every kind, the thresholds, notes; only what the cheap pass looks for is counted)."""
    kinds = ("leak", "label_conflict", "exact_duplicate", "near_duplicate", "label_issue", "outlier", "unreadable")
    return {"format_version": 1, "exit_code": 1 if findings else 0,
            "counts": {k: sum(f["kind"] == k for f in findings) for k in kinds},
            "summary": {name: {"usable": n} for name, n in sets.items()},
            "thresholds": {"phash_distance": max_distance, "cosine": None, "min_match": min_match},
            "notes": ["train's own check: exact and near-duplicate leaks between its sets (content keys, "
                      "perceptual hashes confirmed by aligned thumbnails; no backbone); duplicates inside one "
                      "set, outliers and label errors: transferkit check"],
            "timings": {}, "findings": findings}
