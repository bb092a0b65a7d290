"""The seed's two-phase recipe: train the new head on a frozen backbone, then fine-tune the layers
from `fine_tune_at` on at a tenth of the learning rate; keep the best epoch of both phases."""

from __future__ import annotations

import copy
import csv
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import timm
import torch

from .balance import MODES as BALANCE_MODES, class_weights, epoch_order
from .backbones import DEFAULT_BACKBONE, create_backbone, resolve_fine_tune_at
from .cache import (FeatureStore, Views, boundary_layer, cache_bytes, cut_index, default_cache_dir, extract,
                    feature_chain, head_forward, run_chain, suffix_forward)
from .calibrate import THRESHOLD_METRICS, choose_threshold, fit_temperature, nll
from .data import (DataError, LabelledImages, check_trainable, decode, load_labelled, memory_budget,
                   stratified_split)
from .evaluate import (classification_metrics, expected_calibration_error, predict_inputs, predict_logits,
                       to_batch, write_predictions)
from .model import TransferModel, predict_labels
from .predict import Classifier
from .progress import Reporter
from .report import write_report

MONITORS = ("val_loss", "val_accuracy")


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the seed's recipe on the default backbone."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # a file, "random", or None: the registered/timm weights
    image_size: int | None = None  # None: the weights' own input size
    epochs: int = 10  # phase 1: head only (cheap from the cache)
    fine_tune_epochs: int = 8  # phase 2: layers from fine_tune_at on
    fine_tune_at: int | str | None = None  # None: the backbone's default (about the last quarter)
    lr: float = 1e-3
    fine_tune_lr_factor: float = 0.1
    batch_size: int = 32
    val_split: float = 0.2
    seed: int = 42
    dropout: float = 0.2
    flip: bool = True
    rotation: float = 0.05  # fraction of a full turn, as Keras's RandomRotation (the seed: 0.2)
    train_bn: bool = False
    monitor: str = "val_loss"  # which validation number picks the kept epoch
    threshold_metric: str = "none"  # two classes: what a threshold chosen on validation maximises
    threshold: float = 0.5  # two classes: the fixed threshold on p(class 1) when threshold_metric is "none"
    class_weight: str = "balanced"  # loss weights n / (C * n_c); "none": plain mean (measured on ELPV)
    sampler: str = "none"  # "balanced": each class drawn equally often in an epoch
    device: str = "auto"
    cache: bool = True  # train from cached frozen-layer outputs (False: the seed's plain loop)
    views: int = 2  # augmented views cached per image, besides the clean one
    cache_dtype: str = "float16"  # storage of boundary activations
    cache_memory_gb: float | None = None  # RAM budget for the cache; None: a quarter of free RAM
    bf16: bool | None = None  # bfloat16 autocast while extracting; None: where supported
    cache_dir: str | None = None  # views kept for later runs; None: ~/.cache/transferkit; "": off
    cache_cap_gb: float = 20.0  # size cap of cache_dir, oldest files evicted first
    keep_cache: bool = False  # keep arrays spilled to the run's cache/ folder after training

    def memory_budget_bytes(self) -> int:
        """RAM that decoded images and cached arrays may take before they spill to disk."""
        return int(self.cache_memory_gb * 2**30) if self.cache_memory_gb else memory_budget()

    def __post_init__(self):
        checks = [
            (self.epochs >= 0 and self.fine_tune_epochs >= 0, "epochs must be >= 0"),
            (self.epochs + self.fine_tune_epochs > 0, "at least one epoch is needed"),
            (self.lr > 0 and self.fine_tune_lr_factor > 0, "learning rates must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (0.0 <= self.rotation <= 0.5, "rotation is a fraction of a full turn in [0, 0.5]"),
            (self.image_size is None or 16 <= self.image_size <= 2048, "image_size must be 16..2048"),
            (self.monitor in MONITORS, f"monitor must be one of {MONITORS}"),
            (self.threshold_metric in ("none", *THRESHOLD_METRICS),
             f"threshold_metric must be one of {('none', *THRESHOLD_METRICS)}"),
            (0.0 <= self.threshold <= 1.0, "threshold must be in [0, 1]"),
            (self.class_weight in BALANCE_MODES, f"class_weight must be one of {BALANCE_MODES}"),
            (self.sampler in BALANCE_MODES, f"sampler must be one of {BALANCE_MODES}"),
            (self.views >= 0, "views must be >= 0"),
            (self.cache_dtype in ("float16", "float32"), "cache_dtype must be float16 or float32"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_epoch(model: TransferModel, views: Views, optimizer, batch_size: int,
                rng: np.random.Generator, device, reporter: Reporter, sampler: str = "none",
                class_weight: torch.Tensor | None = None) -> tuple[float, float]:
    """One pass in a seeded random order (class-balanced draws with `sampler="balanced"`), one
    stored view per image; returns (loss, accuracy)."""
    model.train()
    n = len(views.labels)
    order = epoch_order(views.labels, rng, sampler)
    pick = rng.integers(0, views.num_views, n) if views.num_views > 1 else np.zeros(n, dtype=np.int64)
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        x = to_batch(views.inputs[pick[index], index], device)
        y = torch.from_numpy(views.labels[index]).to(device)
        logits = views.forward(x)
        loss = model.loss(logits, y, class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += int((predict_labels(model.probabilities(logits.detach())) == y).sum())
        seen = start + len(index)
        reporter.advance(f"loss {total_loss / seen:.4f} acc {correct / seen:.3f}")
    return total_loss / n, correct / n


def predict_views(model: TransferModel, views: Views, batch_size: int, device) -> np.ndarray:
    """Probabilities of the clean view (view 0) in inference mode."""
    return predict_inputs(model, views.inputs[0], views.forward, batch_size, device)


def _is_better(row: dict, best: dict | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "val_accuracy":
        return (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])
    return row["val_loss"] < best["val_loss"]


def plain_views(model: TransferModel, data: LabelledImages) -> Views:
    """The seed's loop: the whole model on decoded images, augmentation drawn afresh each time."""
    return Views(data.images[None], data.labels, model)


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bfloat16 extraction: as asked, else where the hardware runs it natively."""
    if config.bf16 is not None:
        return config.bf16
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def feature_store(config: TrainConfig, model: TransferModel, weights_sha256: str | None,
                  cut_name: str | None, image_size: int, bf16: bool) -> FeatureStore | None:
    """The cross-run store for these extraction settings; None when off or weights unknown."""
    if config.cache_dir == "" or weights_sha256 is None:
        return None
    settings = {"backbone": config.backbone, "weights_sha256": weights_sha256,
                "image_size": image_size, "flip": model.augment.flip,
                "rotation": model.augment.rotation, "boundary": cut_name, "dtype": config.cache_dtype,
                "bf16": bf16, "torch": torch.__version__.split("+")[0], "timm": timm.__version__}
    return FeatureStore(config.cache_dir or default_cache_dir(), settings, int(config.cache_cap_gb * 2**30))


def phase_views(model: TransferModel, train_data: LabelledImages, val_data: LabelledImages,
                config: TrainConfig, fine_tune_at: int, reporter: Reporter, device, spill_dir,
                weights_sha256: str | None = None):
    """(train, val) Views for each phase: cached activations when possible, else the plain loop."""
    plain = (plain_views(model, train_data), plain_views(model, val_data))
    if not config.cache:
        reporter.log("Cache off (--no-cache): every epoch runs the full model on every image")
        return plain, plain
    chain = feature_chain(model.backbone)
    layer = boundary_layer(model.backbone, model.layers, fine_tune_at)
    cut = cut_index(chain, layer) if chain and config.fine_tune_epochs > 0 and layer else None
    augmenting = model.augment.flip or model.augment.rotation > 0
    views = 1 + (config.views if augmenting else 0)
    boundary_shape = None
    if cut is not None:
        with torch.inference_mode():
            probe = run_chain(chain[:cut], model.normalize(to_batch(train_data.images[:1], device)))
        boundary_shape = tuple(probe.shape[1:])
    itemsize = np.dtype(config.cache_dtype).itemsize
    need = cache_bytes(len(train_data), len(val_data), views, model.head.in_features, boundary_shape, itemsize)
    budget = config.memory_budget_bytes()
    in_ram = need <= budget
    bf16 = use_bf16(config, device)
    reporter.log(f"Cache: {views} view(s) per training image (clean + {views - 1} augmented), "
                 f"{need / 2**20:.0f} MiB ({need / max(1, views * len(train_data) + len(val_data)) / 1024:.1f} KiB per view); "
                 + ("in RAM" if in_ram else f"over the {budget / 2**30:.1f} GiB budget: memmap in {spill_dir}")
                 + f"; extraction in {'bfloat16' if bf16 else 'float32'}")
    if cut is not None:
        reporter.log(f"Phase 2 trains from the activations entering {chain[cut][0]} "
                     f"(shape {boundary_shape}), the block that holds layer {fine_tune_at}")
    elif config.fine_tune_epochs > 0 and layer is not None:
        reporter.log(f"Phase 2 runs the full model each epoch: {type(model.backbone).__name__} "
                     "cannot be split into a chain of blocks")
    stores = [feature_store(config, model, weights_sha256, chain[cut][0] if cut is not None else None,
                            int(train_data.images.shape[1]), precision) for precision in (bf16, False)]
    started = time.perf_counter()
    total = -(-len(train_data) // config.batch_size) * views + -(-len(val_data) // config.batch_size)
    reporter.start("extracting features", total)
    try:
        common = dict(cut=cut, chain=chain, batch_size=config.batch_size, device=device,
                      dtype=np.dtype(config.cache_dtype), in_ram=in_ram, spill_dir=spill_dir,
                      keep=config.keep_cache, progress=reporter.advance)
        pooled, boundary = extract(model, train_data.images, views, autocast=bf16, store=stores[0], **common)
        # validation in float32: the numbers that pick the kept epoch are the deployed model's
        val_pooled, val_boundary = extract(model, val_data.images, 1, autocast=False, store=stores[1], **common)
    finally:
        reporter.stop()
    seconds = time.perf_counter() - started
    store = stores[0]
    hits = sum(s.hits for s in stores if s)
    computed = views * len(train_data) + len(val_data) - hits
    reporter.log(f"Extracted {computed} views in {seconds:.1f}s"
                 + (f"; reused {hits} from {store.root}" if store else "; cross-run reuse off"))
    if store:
        store.trim()
    phase1 = (Views(pooled, train_data.labels, head_forward(model)),
              Views(val_pooled, val_data.labels, head_forward(model)))
    if cut is None:
        return phase1, plain
    suffix = suffix_forward(model, chain, cut)
    return phase1, (Views(boundary, train_data.labels, suffix), Views(val_boundary, val_data.labels, suffix))


def fit(model: TransferModel, train_data: LabelledImages, val_data: LabelledImages,
        config: TrainConfig, fine_tune_at: int, reporter: Reporter, device,
        spill_dir=None, weights_sha256: str | None = None) -> tuple[list[dict], dict, dict]:
    """Both phases; returns the per-epoch history, the kept (best) row and phase timings. The model
    ends with the best epoch's weights."""
    timings = {}
    started = time.perf_counter()
    views = phase_views(model, train_data, val_data, config, fine_tune_at, reporter, device, spill_dir,
                        weights_sha256)
    timings["extract_seconds"] = time.perf_counter() - started
    rng = np.random.default_rng(config.seed)
    history: list[dict] = []
    best, best_state = None, None
    phases = [(1, config.epochs, len(model.layers), config.lr),
              (2, config.fine_tune_epochs, fine_tune_at, config.lr * config.fine_tune_lr_factor)]
    n_batches = -(-len(train_data) // config.batch_size)
    weights = class_weights(train_data.labels, model.num_classes, config.class_weight)
    if weights is not None or config.sampler != "none":
        reporter.log(f"Imbalance: class weights {'off' if weights is None else [round(w, 3) for w in weights.tolist()]}"
                     f", sampler {config.sampler}")
    for (phase, epochs, trainable_from, lr), (train_views, val_views) in zip(phases, views):
        if epochs == 0:
            continue
        phase_start = time.perf_counter()
        model.unfreeze_from(trainable_from)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr)
        reporter.log(f"Phase {phase}: {'head only' if phase == 1 else f'fine-tuning layers {trainable_from}..'}"
                     f", {sum(p.numel() for p in params):,} trainable parameters, lr {lr:g}")
        for _ in range(epochs):
            epoch = len(history) + 1
            start = time.perf_counter()
            reporter.start(f"phase {phase} epoch {epoch}", n_batches)
            try:
                train_loss, train_acc = train_epoch(model, train_views, optimizer, config.batch_size,
                                                    rng, device, reporter, config.sampler, weights)
            finally:
                reporter.stop()
            val = classification_metrics(val_views.labels, predict_views(
                model, val_views, config.batch_size, device), val_data.classes)
            row = {"epoch": epoch, "phase": phase, "lr": lr, "train_loss": train_loss,
                   "train_accuracy": train_acc, "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "seconds": time.perf_counter() - start}
            history.append(row)
            if _is_better(row, best, config.monitor):
                best, best_state = row, copy.deepcopy(model.state_dict())
            reporter.log(f"epoch {epoch:>3} phase {phase}  loss {train_loss:.4f}  acc {train_acc:.4f}"
                         f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
                         f"  {row['seconds']:.1f}s" + ("  *" if best is row else ""))
        timings[f"phase{phase}_seconds"] = time.perf_counter() - phase_start
    model.load_state_dict(best_state)
    model.unfreeze_from(len(model.layers))
    model.eval()
    return history, best, timings


def calibrate(model: TransferModel, logits: np.ndarray, labels: np.ndarray,
              config: TrainConfig) -> tuple[np.ndarray, dict, dict | None]:
    """Fit the temperature (sets model.temperature) and, for two classes, the threshold on the
    validation logits; returns the calibrated probabilities and what was fitted."""
    model.temperature = 1.0
    before = model.probabilities(torch.from_numpy(logits)).numpy()
    model.temperature = fit_temperature(logits, labels)
    probs = model.probabilities(torch.from_numpy(logits)).numpy()
    calibration = {"temperature": model.temperature, "method": "temperature scaling on the validation set",
                   "loss_before": nll(logits, labels), "loss_after": nll(logits, labels, model.temperature),
                   "ece_before": expected_calibration_error(labels, before),
                   "ece_after": expected_calibration_error(labels, probs)}
    if not model.binary:
        return probs, calibration, None
    if config.threshold_metric == "none":
        return probs, calibration, {"metric": "fixed", "threshold": config.threshold}
    return probs, calibration, choose_threshold(labels, probs[:, 1], config.threshold_metric)


def _decode(raw: LabelledImages, name: str, size: int, reporter: Reporter, spill_dir,
            config: TrainConfig) -> LabelledImages:
    reporter.start(f"decoding {name}", len(raw))
    try:
        data = decode(raw, size, spill_dir=spill_dir, budget=config.memory_budget_bytes(),
                      keep=config.keep_cache, progress=lambda i, n: reporter.advance())
    finally:
        reporter.stop()
    return data


def train(data: str | Path, out: str | Path, config: TrainConfig | None = None,
          val_data: str | Path | None = None, reporter: Reporter | None = None,
          **overrides) -> Classifier:
    """Train a classifier on `data` (class folders or a CSV) and write the run to `out`.

    `val_data`: a separate labelled set for validation; otherwise a stratified `val_split` of
    `data`. Keyword overrides change single settings: `train("data", "runs/x", epochs=3)`.
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    reporter = reporter or Reporter()
    out = Path(out)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    raw = load_labelled(data)  # cheap checks of the data first: fail before loading anything
    raw_val = None if val_data is None else load_labelled(val_data, raw.classes)

    backbone = create_backbone(config.backbone, config.weights, config.image_size)
    layers = backbone.layers
    fine_tune_at = resolve_fine_tune_at(
        layers, config.fine_tune_at if config.fine_tune_at is not None else backbone.default_fine_tune_at)
    size = backbone.preprocess.image_size
    reporter.log(f"Backbone {backbone.name}: weights {backbone.weights}")
    reporter.log(f"Number of layers in the base model: {len(layers)}")
    reporter.log(f"fine_tune_at = {fine_tune_at} ({layers[fine_tune_at][0] if fine_tune_at < len(layers) else 'none'})")

    out.mkdir(parents=True, exist_ok=True)
    spill = out / "cache"
    everything = _decode(raw, "data", size, reporter, spill, config)
    check_trainable(everything, str(data))
    if val_data is None:
        train_idx, val_idx = stratified_split(everything.labels, config.val_split, config.seed,
                                              everything.classes)
        train_set, val_set = everything.subset(train_idx), everything.subset(val_idx)
        skipped = everything.skipped
    else:
        train_set = everything
        val_set = _decode(raw_val, "validation data", size, reporter, spill, config)
        if len(val_set) == 0:
            raise DataError(f"{val_data}: no usable images")
        skipped = everything.skipped + val_set.skipped
    if skipped:
        reporter.log(f"Skipped {len(skipped)} unusable file(s); listed in {out / 'skipped.txt'}")
    reporter.log(f"Training on {len(train_set)} images, validating on {len(val_set)}; "
                 f"classes {everything.counts()}")

    model = TransferModel(backbone.model, len(everything.classes), backbone.preprocess,
                          config.dropout, config.flip, config.rotation, config.train_bn)
    model.to(device, memory_format=torch.channels_last)
    started = time.perf_counter()
    history, best, timings = fit(model, train_set, val_set, config, fine_tune_at, reporter, device, spill,
                                 backbone.weights_sha256)
    seconds = time.perf_counter() - started
    reporter.log(f"Kept epoch {best['epoch']} (phase {best['phase']}, best {config.monitor}); "
                 f"val_accuracy {best['val_accuracy']:.4f}; training took {seconds:.0f}s")

    val_logits = predict_logits(model, val_set.images, model, config.batch_size, device)
    val_probs, calibration, selection = calibrate(model, val_logits, val_set.labels, config)
    reporter.log(f"Calibration on validation: temperature {calibration['temperature']:.3f}, ECE "
                 f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}"
                 + (f"; threshold {selection['threshold']:.4f} ({selection['metric']})" if selection else ""))
    classifier = Classifier(model, everything.classes, {
        "temperature": calibration["temperature"],
        "threshold": selection["threshold"] if selection else 0.5,
        "threshold_selection": selection,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "timm_kwargs": backbone.timm_kwargs,
        "preprocess": asdict(backbone.preprocess),
        "fine_tune_at": {"index": fine_tune_at,
                         "name": layers[fine_tune_at][0] if fine_tune_at < len(layers) else None,
                         "num_layers": len(layers)},
        "config": asdict(config),
        "best_epoch": best["epoch"],
        "training_seconds": round(seconds, 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    })
    classifier.save(out)
    metrics = classification_metrics(val_set.labels, val_probs, val_set.classes, classifier.threshold)
    metrics.update(split="validation", best_epoch=best["epoch"], calibration=calibration,
                   threshold_selection=selection, counts={
        "train": train_set.counts(), "validation": val_set.counts(), "skipped": len(skipped)})
    write_outputs(out, history, metrics, skipped, config.epochs)
    write_predictions(out / "val_predictions.csv", val_set.paths, val_set.labels, val_probs, val_set.classes)
    write_report(out, classifier, "validation", val_set.paths, val_set.labels, val_probs, val_set.images)
    if not config.keep_cache:
        shutil.rmtree(spill, ignore_errors=True)
    return classifier


def write_outputs(out: Path, history: list[dict], metrics: dict, skipped: list, epochs: int) -> None:
    """history.csv, metrics.json, skipped.txt and learning_curves.png."""
    from .plots import learning_curves

    with open(out / "history.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "skipped.txt").write_text("".join(f"{path}\t{reason}\n" for path, reason in skipped))
    learning_curves(history, out / "learning_curves.png",
                    fine_tune_start=epochs + 0.5 if any(r["phase"] == 2 for r in history) else None)
