"""`train --task anomaly`: a patch memory bank from good images alone (openworld/anomaly.py), and a
threshold fitted on held-out good images at a stated false-alarm rate.

The steps, in the order they run: list the good images (a folder of them, or class folders / a CSV
with `--normal-class`: the other classes are left out and counted), build the frozen backbone,
decode, hold out `val_split` of the good images (or take `--val-dir`), extract the patch features
of the rest (through the content-keyed view store, so a second run on the same images computes
nothing), subsample them to the bank's cap by a coreset, score the held-out images and fit the
threshold at `anomaly_keep`, and write the run folder (model.json last).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..cfg.settings import TrainConfig
from ..data.decode import decode
from ..data.dedupe import merge_duplicates
from ..data.listing import IMAGE_SUFFIXES, LabelledImages, from_csv, from_folder, walk_files
from ..data.memory import allocate, memory_budget
from ..models.backbones import Backbone, create_backbone
from ..models.fold import fold_batchnorm
from ..openworld.anomaly import (
    AGGREGATION,
    POOL_FACTOR,
    AnomalyModel,
    BankModel,
    GaussianModel,
    PatchFeatures,
    bank_rows,
    cap_mib,
    conformal_threshold,
    coreset,
    coreset_chunks,
    default_layers,
    f1_threshold,
    fit_gaussians,
    score_batches,
)
from ..predict import run
from ..predict.anomaly_engine import AnomalyDetector, BANK, holdout_metrics
from ..utils.errors import ConfigError, DataError
from ..utils.files import atomic_path, sha256_of, write_text
from ..utils.progress import Reporter
from ..utils.runtime import resolve_device, seed_everything, set_threads
from .cache import FeatureStore, default_cache_dir

NORMAL = "normal"  # the class name of a folder of good images without class folders
ANOMALY = "anomaly"  # the class of the labelled anomalies (--anomaly-threshold f1)


def train(data: str | Path, out: str | Path, config: TrainConfig, val_data: str | Path | None = None,
          reporter: Reporter | None = None, overwrite: bool = False) -> AnomalyDetector:
    """Fit an anomaly detector on the good images in `data` and write the run folder `out`."""
    out, reporter = Path(out), reporter or Reporter()
    started = time.perf_counter()
    good, left_out, anomalies = list_good(data, config.normal_class, "data")
    val, val_anomalies = (None, None) if val_data is None else list_good(val_data, config.normal_class, "--val-dir")[::2]
    if config.anomaly_threshold == "f1":
        anomalies = [a for a in (anomalies, val_anomalies) if a is not None]
        if not anomalies:
            raise DataError(f"{data}: --anomaly-threshold f1 fits the threshold on labelled anomalies: class folders "
                            "(or CSV labels) other than --normal-class, and it has none; add a few defects as their "
                            "own class, or use --anomaly-threshold keep")
        anomalies = LabelledImages([p for a in anomalies for p in a.paths], np.zeros(sum(len(a) for a in anomalies),
                                   np.int64), [ANOMALY])
    else:
        anomalies = None
    if val is None and len(good) < 2:
        raise DataError(f"{data}: {len(good)} good image(s); anomaly detection needs at least 2 (one for the "
                        "patch bank, one to fit the threshold), and tens for a threshold worth its name")
    work = run.prepare(out, False, overwrite)
    record = {"config": config.to_dict(), "data": str(data), "val_data": None if val_data is None else str(val_data),
              "task": "anomaly", "world_size": 1}
    run.start(work, record)
    try:
        detector = fit(good, left_out, val, work, record, config, reporter, started, anomalies)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    run.finish(work, out)
    return detector


def list_good(source: str | Path, normal_class: str | None, what: str
              ) -> tuple[LabelledImages, dict[str, int], LabelledImages | None]:
    """The good images of `source`, the images of other classes left out (class -> count), and
    those images (one class, `anomaly`; None when there are none): `--anomaly-threshold f1`'s
    labelled anomalies. A folder without class folders is all good; class folders (or a CSV of
    path,label) need `normal_class`, unless a CSV has one label only."""
    source = Path(source)
    option = f"--normal-class {normal_class!r}"
    if source.is_file() and source.suffix.lower() == ".csv":
        listed = from_csv(source)
    elif source.is_dir():
        folders = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            if normal_class is not None:
                raise DataError(f"{source}: no class folders, so {option} names no class in it (a folder of good "
                                "images needs no --normal-class)")
            skipped: list[tuple[str, str]] = []
            paths = [str(p) for p in walk_files(source, skipped)]
            if not paths:
                raise DataError(f"{source}: no image files ({what})")
            return LabelledImages(paths, np.zeros(len(paths), np.int64), [NORMAL], skipped), {}, None
        loose = [p.name for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if normal_class is None:
            raise DataError(f"{source}: class folders {folders}{' and loose images' if loose else ''}; name the "
                            "normal one with --normal-class (only its images train the model), or give a folder "
                            "of good images only")
        listed = from_folder(source)
    elif not source.exists():
        raise DataError(f"{source}: not found ({what})")
    else:
        raise DataError(f"{source}: not a folder or a CSV file ({what})")
    classes = listed.classes
    if normal_class is None:
        if len(classes) != 1:
            raise DataError(f"{source}: labels {classes}; name the normal one with --normal-class")
        normal_class = classes[0]
    if normal_class not in classes:
        raise DataError(f"{source}: {option} names no class in it (its classes: {', '.join(classes)})")
    index = classes.index(normal_class)
    keep = np.flatnonzero(listed.labels == index)
    left_out = {c: int((listed.labels == i).sum()) for i, c in enumerate(classes) if i != index}
    if len(keep) == 0:
        raise DataError(f"{source}: no images of the normal class {normal_class!r}")
    others = np.flatnonzero(listed.labels != index)
    return (LabelledImages([listed.paths[i] for i in keep], np.zeros(len(keep), np.int64), [normal_class],
                           listed.skipped, notes=listed.notes), left_out,
            LabelledImages([listed.paths[i] for i in others], np.zeros(len(others), np.int64), [ANOMALY])
            if len(others) else None)


def decoded(listing: LabelledImages, origin: str, size: int, config: TrainConfig, reporter: Reporter) -> LabelledImages:
    reporter.start(f"decoding {origin}", len(listing))
    try:
        images = decode(listing, size, budget=memory_budget(config.cache_memory_gb),
                        progress=lambda i, n: reporter.advance())
    finally:
        reporter.stop()
    images = merge_duplicates(images, origin)
    if len(images) == 0:
        raise DataError(f"{origin}: no usable images" + (f" ({len(images.skipped)} skipped, first: "
                        f"{images.skipped[0][0]}: {images.skipped[0][1]})" if images.skipped else ""))
    return images


def fit(good: LabelledImages, left_out: dict[str, int], val: LabelledImages | None, work: Path, record: dict,
        config: TrainConfig, reporter: Reporter, started: float, anomalies: LabelledImages | None = None
        ) -> AnomalyDetector:
    seed_everything(config.seed)
    set_threads(config.threads)
    device = resolve_device(config.device)
    normal = good.classes[0]
    if left_out:
        reporter.log(f"Normal class {normal!r}: {len(good)} image(s) train the model; left out of training: "
                     + ", ".join(f"{c} {n}" for c, n in left_out.items()))
    backbone = create_backbone(config.backbone, config.weights, config.image_size)
    reporter.log(f"Backbone {backbone.name}: weights {backbone.weights}")
    size = backbone.preprocess.image_size
    everything = decoded(good, str(record["data"]), size, config, reporter)
    if val is None:
        if len(everything) < 2:
            raise DataError(f"{record['data']}: {len(everything)} usable good image(s); anomaly detection needs at "
                            "least 2 (one for the patch bank, one to fit the threshold)")
        order = np.random.default_rng(config.seed).permutation(len(everything))
        n_hold = min(len(everything) - 1, max(1, round(config.val_split * len(everything))))
        bank_set, hold_set = everything.subset(np.sort(order[n_hold:])), everything.subset(np.sort(order[:n_hold]))
        skipped = everything.skipped
    else:
        bank_set, hold_set = everything, decoded(val, str(record["val_data"]), size, config, reporter)
        shared = set(bank_set.keys()) & set(hold_set.keys())
        if shared:
            raise DataError(f"{record['val_data']}: {len(shared)} image(s) are also in the training data; the "
                            "threshold must be fitted on held-out images")
        skipped = everything.skipped + hold_set.skipped
    for note in everything.notes:
        reporter.log(note)
    if skipped:
        reporter.log(f"Skipped {len(skipped)} file(s); listed in skipped.csv")
    reporter.log(f"Patch bank from {len(bank_set)} good image(s); threshold fitted on {len(hold_set)} held-out "
                 "good image(s) " + (f"at keep {config.anomaly_keep:g}" if anomalies is None else
                                     f"and {len(anomalies)} labelled anomalies (best F1)"))

    folded = fold_batchnorm(backbone.model.eval())
    layers = default_layers(backbone.model)
    features = PatchFeatures(folded, layers, backbone.preprocess.mean, backbone.preprocess.std).to(device).eval()
    t0 = time.perf_counter()
    patches, hits = extract_patches(features, bank_set, backbone, layers, size, config, device, work, reporter)
    extract_seconds = time.perf_counter() - t0
    n, cells, dims = patches.shape
    reporter.log(f"Patch features of {n} image(s): {cells} cells x {dims} dims ({layers[0]} + {layers[1]}, "
                 f"{AGGREGATION}x{AGGREGATION} averaged) in {extract_seconds:.1f}s"
                 + (f"; {hits} reused from the view store" if hits else ""))

    t0 = time.perf_counter()
    cap = cap_mib(config.anomaly_method, config.anomaly_bank_mib)
    if config.anomaly_method == "gaussian":
        mean, precision, channels = fit_gaussians(patches, cap, config.seed, device)
        model = GaussianModel(features, mean, precision, channels, size).to(device).eval()
        coreset_note = (f"Gaussians: one per cell of the {cells}, over {len(channels)} of {dims} channels "
                        f"({sum(t.numel() for t in model.statistics().values()) * 4 / 2**20:.1f} MiB, cap "
                        f"{cap:g} MiB), from {n} image(s)")
    else:
        bank, coreset_note = build_bank(patches, cap, config.seed, device)
        model = BankModel(features, bank, size).to(device).eval()
    bank_seconds = time.perf_counter() - t0
    reporter.log(coreset_note + f" in {bank_seconds:.1f}s")
    del patches

    t0 = time.perf_counter()
    hold_scores, hold_maps = score_batches(model, hold_set.images, device)
    threshold, reached = conformal_threshold(hold_scores, config.anomaly_keep)
    labelled = None
    if anomalies is not None:
        seen = decoded(anomalies, "the labelled anomalies", size, config, reporter)
        labelled = score_batches(model, seen.images, device, maps=False)[0]
        threshold = f1_threshold(hold_scores, labelled)
        flagged = float((hold_scores > threshold).mean())
        reporter.log(f"Threshold {threshold:.4f}: the best F1 on {len(hold_set)} held-out good images and "
                     f"{len(labelled)} labelled anomalies ({(labelled > threshold).mean():.1%} of them flagged, "
                     f"{flagged:.1%} of the good ones)" + (f"; with {len(labelled)} anomalies the F1 it fits is a "
                     "rough guide" if len(labelled) < 30 else ""))
    else:
        reporter.log(f"Threshold {threshold:.4f}: {config.anomaly_keep:g} of {len(hold_set)} held-out good images "
                     f"pass (split-conformal rank)" if reached else
                     f"Threshold {threshold:.4f}, the largest of {len(hold_set)} held-out good scores: too few "
                     f"held-out images for keep {config.anomaly_keep:g} (it needs at least "
                     f"{int(np.ceil(config.anomaly_keep / (1 - config.anomaly_keep)))}); its false-alarm rate is "
                     f"only known to be at most 1/{len(hold_set) + 1}")
    threshold_seconds = time.perf_counter() - t0
    return save(work, model, backbone, layers, config, record, bank_set, hold_set, hold_scores, hold_maps, threshold,
                reached, coreset_note, patches_shape=(n, cells, dims), left_out=left_out, normal=normal,
                skipped=skipped, labelled=labelled, timings={"extract_seconds": extract_seconds, "bank_seconds": bank_seconds,
                                          "threshold_seconds": threshold_seconds,
                                          "total_seconds": time.perf_counter() - started})


def extract_patches(features: PatchFeatures, images: LabelledImages, backbone: Backbone, layers: list[str], size: int,
                    config: TrainConfig, device, work: Path, reporter: Reporter, batch_size: int = 16
                    ) -> tuple[np.ndarray, int]:
    """(N, H*W, C) float16 patch features of the images, read from the view store where it has them
    (keyed by the images' content and everything that determines the features)."""
    import timm

    with torch.inference_mode():
        probe = features(torch.from_numpy(images.images[:1]).permute(0, 3, 1, 2).to(device))
    _, dims, h, w = probe.shape
    store = None
    if config.cache_dir != "" and backbone.weights_sha256 is not None:
        settings = {"kind": "anomaly patch features", "backbone": backbone.name,
                    "weights_sha256": backbone.weights_sha256, "image_size": size, "layers": layers,
                    "aggregation": AGGREGATION, "dtype": "float16", "folded": True,
                    "torch": torch.__version__.split("+")[0], "timm": timm.__version__}
        store = FeatureStore(Path(config.cache_dir or default_cache_dir()), settings,
                             int(config.cache_cap_gb * 2**30), shapes=((h * w, dims), None))
    n = len(images)
    need = n * h * w * dims * 2
    out = allocate((n, h * w, dims), np.float16, need <= memory_budget(config.cache_memory_gb), work / "cache")
    keys = images.keys()
    todo = []
    for i in range(n):
        found = store.load(keys[i], 0) if store else None
        if found is None:
            todo.append(i)
        else:
            out[i] = found[0]
    reporter.start("patch features", -(-len(todo) // batch_size))
    try:
        with torch.inference_mode():
            for start in range(0, len(todo), batch_size):
                index = todo[start:start + batch_size]
                x = torch.from_numpy(np.ascontiguousarray(images.images[index])).permute(0, 3, 1, 2).to(device)
                f = features(x).permute(0, 2, 3, 1).reshape(len(index), h * w, dims).cpu().numpy().astype(np.float16)
                out[index] = f
                if store:
                    for j, i in enumerate(index):
                        store.save(keys[i], 0, f[j], None)
                reporter.advance()
    finally:
        reporter.stop()
    if store:
        store.trim()
    return out, (store.hits if store else 0)


def build_bank(patches: np.ndarray, cap_mib: float, seed: int, device) -> tuple[torch.Tensor, str]:
    """The bank: every patch when they fit `cap_mib` MiB as float32, else a coreset of as many as fit."""
    n, cells, dims = patches.shape
    total = n * cells
    rows = bank_rows(cap_mib, dims)
    full_mib = total * dims * 4 / 2**20
    if total <= rows:
        bank = torch.from_numpy(patches.reshape(total, dims).astype(np.float32))
        return bank, f"Patch bank: all {total} patches ({full_mib:.1f} MiB, within the cap of {cap_mib:g} MiB)"
    pool = min(total, POOL_FACTOR * rows)
    chosen = np.sort(np.random.default_rng(seed).choice(total, pool, replace=False))
    candidates = torch.from_numpy(patches.reshape(total, dims)[chosen].astype(np.float32)).to(device)
    parts = coreset_chunks(pool, rows)
    picked = coreset(candidates, rows, seed, chunks=parts).to(candidates.device)
    bank = candidates[picked].cpu()
    split = f", in {parts} random parts" if parts > 1 else ""
    return bank, (f"Patch bank: coreset of {rows} of {total} patches ({rows * dims * 4 / 2**20:.1f} MiB of "
                  f"{full_mib:.1f}, cap {cap_mib:g} MiB; greedy k-centre among a random pool of {pool}{split})")


def save(work: Path, model: AnomalyModel, backbone: Backbone, layers: list[str], config: TrainConfig, record: dict,
         bank_set: LabelledImages, hold_set: LabelledImages, hold_scores: np.ndarray, hold_maps: np.ndarray,
         threshold: float, reached: bool, coreset_note: str, patches_shape, left_out: dict, normal: str,
         skipped: list, timings: dict, labelled: np.ndarray | None = None) -> AnomalyDetector:
    """model.safetensors (the backbone), bank.safetensors, val_scores.csv, metrics.json, skipped.csv,
    and last model.json ("complete")."""
    from safetensors.torch import save_file

    with atomic_path(work / run.WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}, str(tmp))
        model_sha = sha256_of(tmp)
    with atomic_path(work / BANK) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.statistics().items()}, str(tmp))
        bank_sha = sha256_of(tmp)
    with atomic_path(work / "val_scores.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "anomaly_score", "label"])
        for path, score in zip(hold_set.paths, hold_scores):
            writer.writerow([path, f"{score:.6g}", "anomaly" if score > threshold else "normal"])
    run.write_skipped(work / "skipped.csv", skipped)
    metrics = holdout_metrics(hold_scores, threshold, config.anomaly_keep)
    if labelled is not None:  # --anomaly-threshold f1: how the threshold does on the anomalies it was fitted on
        metrics["labelled_anomalies"] = {"n": len(labelled), "flagged": int((labelled > threshold).sum()),
                                         "note": "fitted on these images: an optimistic estimate"}
    write_text(work / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    n, cells, dims = patches_shape
    meta = {
        "format_version": run.FORMAT_VERSION,
        "task": "anomaly",
        "normal_class": normal,
        "left_out": left_out,
        "threshold": threshold,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "timm_kwargs": backbone.timm_kwargs,
        "preprocess": {"image_size": backbone.preprocess.image_size, "mean": list(backbone.preprocess.mean),
                       "std": list(backbone.preprocess.std)},
        "anomaly": {
            "scorer": model.method,
            "method": "patch memory bank (PatchCore-style): nearest-neighbour distance of each patch feature "
                      "to the good images' bank; image score = the largest patch distance" if model.method == "patches"
            else "one Gaussian per grid cell (PaDiM-style): Mahalanobis distance of each patch feature to its cell's "
                 "Gaussian; image score = the largest patch distance",
            "layers": layers, "aggregation": AGGREGATION, "grid": int(round(cells ** 0.5)), "dims": dims,
            "bank": BANK, "bank_sha256": bank_sha,
            "bank_rows": int(model.bank.shape[0]) if model.method == "patches" else 0,
            "channels": model.floats_per_cell() if model.method == "gaussian" else dims,
            "bank_mib": round(sum(t.numel() for t in model.statistics().values()) * 4 / 2**20, 3),
            "cap_mib": cap_mib(config.anomaly_method, config.anomaly_bank_mib),
            "patches": n * cells, "bank_images": n, "coreset": coreset_note,
            "keep": config.anomaly_keep, "threshold": threshold, "threshold_reached": reached,
            "threshold_method": "split-conformal: the ceil((n + 1) * keep)-th smallest held-out good score"
            if labelled is None else f"the best F1 on the {len(hold_set)} held-out good images and {len(labelled)} "
            "labelled anomalies (the other classes' images, never in the bank)",
            "threshold_rule": config.anomaly_threshold,
            "threshold_anomalies": 0 if labelled is None else len(labelled),
            "holdout_images": len(hold_set),
            "map_reference": float(np.median(hold_maps)),  # a typical good patch: the overlay's zero
        },
        "model_sha256": model_sha,
        "model_version": sha256_of_text(model_sha + bank_sha)[:16],
        "config": config.to_dict(),
        "data": record["data"],
        "val_data": record["val_data"],
        "training_seconds": round(timings["total_seconds"], 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": run.versions(),
        "status": run.COMPLETE,
    }
    if not config.keep_cache:
        shutil.rmtree(work / "cache", ignore_errors=True)
    write_text(work / run.META, json.dumps(meta, indent=2) + "\n")
    return AnomalyDetector(model, meta)


def sha256_of_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def refuse_resume() -> None:
    raise ConfigError("--resume does not apply to --task anomaly: it has no epochs (the bank is built in one "
                      "pass); train again with --overwrite")
