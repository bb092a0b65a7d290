"""The seed's two-phase recipe: train the new head on a frozen backbone, then fine-tune the layers
from `fine_tune_at` on at a tenth of the learning rate; keep the best epoch of both phases.

`train()` reads in the order it runs: check the data, build the backbone, prepare the data, build
the model, fit the head, fine-tune, calibrate and save the run. The run folder says where it is
(model.json's status); after every epoch a checkpoint lets `resume=True` continue a killed or
interrupted run to exactly the result the uninterrupted run gives.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cfg.settings import TrainConfig
from ..data.balance import check_sampler, class_weights, epoch_order
from ..data.decode import decode
from ..data.dedupe import merge_duplicates, shared_images
from ..data.listing import LabelledImages, check_labels, load_labelled
from ..data.memory import memory_budget
from ..data.split import stratified_split
from ..models.backbones import Backbone, create_backbone
from ..models.inference import to_batch
from ..models.transfer import TransferModel
from ..predict import run
from ..predict.classifier import Classifier
from ..predict.metrics import (
    binary_calibration_error,
    epoch_metrics,
    evaluation_metrics,
    expected_calibration_error,
    predict_labels,
    predict_sets,
)
from ..utils.errors import ConfigError, DataError, Interrupted
from ..utils.files import atomic_path, write_text
from ..utils.progress import Reporter
from ..utils.runtime import resolve_device, seed_everything, set_threads, stop_on_signals
from . import distributed
from .cache import PhaseViews, Views, build_views, plain_views, plan
from .calibrate import choose_threshold, fit_temperature, fit_temperatures, nll
from .experiment import open_log
from .presets import filled, resolve, smallest_class

DIVERGED = 3.0  # a training loss this many times the first epoch's: the run diverged (warned)


def train(data: str | Path, out: str | Path, config: TrainConfig | None = None,
          val_data: str | Path | None = None, reporter: Reporter | None = None,
          resume: bool = False, overwrite: bool = False, **overrides) -> Classifier:
    """Train a classifier on `data` (class folders or a CSV) and write the run to `out`.

    `val_data`: a separate labelled set for validation; otherwise a stratified `val_split` of
    `data`. Keyword overrides change single settings: `train("data", "runs/x", epochs=3)`.
    `out` holding a complete run is refused unless `overwrite` (the old run stays until the new
    one completes); `resume` continues an interrupted run with its own settings. Under torchrun
    every rank calls this; rank 0 returns the classifier, the others None.
    """
    out = Path(out)
    ctx = distributed.start()  # under torchrun: this rank of the job; rank 0 alone decides and writes
    if not resume:
        config = TrainConfig.from_dict({**(config or TrainConfig()).to_dict(), **overrides})
    work = ctx.on_main(run.prepare, out, resume, overwrite)  # refuses before any work
    if resume:
        config = ctx.on_main(resumed_config, work, data, config, overrides, ctx.world_size)
    reporter = (reporter or Reporter()) if ctx.main else Reporter(live=False, quiet=True)
    device = ctx.device(config.device, config.batch_size) if ctx.distributed else resolve_device(config.device)
    if ctx.distributed:
        reporter.log(ctx.describe(device, config.batch_size))
    seed_everything(config.seed)
    listing = ctx.on_main(list_data, data, val_data, config)  # every check that needs no decoding, before anything loads

    record = {"config": config.to_dict(), "data": str(data), "val_data": None if val_data is None else str(val_data),
              "world_size": ctx.world_size}
    if ctx.main:
        run.start(work, record)
    with stop_on_signals(reporter.interrupt), ctx.failures():
        try:
            classifier = train_steps(listing, record, work, config, reporter, device)
        except Interrupted as exc:
            if not ctx.main:
                raise Interrupted(exc.signum) from None
            run.set_status(work, run.INTERRUPTED)
            raise Interrupted(exc.signum, f"interrupted; {out} is left interrupted, resumable: "
                                          f"{run.resume_command(record, out)}") from None
        except BaseException:
            if not ctx.main:
                raise
            if not (work / run.CHECKPOINT).is_file():  # nothing worth resuming: leave no half run behind
                shutil.rmtree(work, ignore_errors=True)
            else:
                run.set_status(work, run.INTERRUPTED)
            raise
    if ctx.main:
        run.finish(work, out)
    return classifier


def train_steps(listing: "Listing", record: dict, work: Path, config: TrainConfig, reporter: Reporter,
                device: torch.device) -> Classifier:
    """The recipe, step by step, writing into the run folder `work` (`record`: its data paths). Under
    torchrun every rank trains; rank 0 alone saves (the others return None)."""
    ctx = distributed.current()
    spill = ctx.scratch(work / "cache")
    backbone = build_backbone(config, reporter)
    config, fine_tune_at, notes = resolve(config, backbone, smallest_class(
        listing.train, config.val_split if record["val_data"] is None else None))
    record["decisions"] = notes
    for note in notes:
        reporter.log(note)
    reporter.log(f"fine_tune_at = {fine_tune_at} "
                 f"({backbone.layers[fine_tune_at][0] if fine_tune_at < len(backbone.layers) else 'none'})")
    train_set, val_set, skipped = prepare_data(listing, record["data"], record["val_data"],
                                               backbone.preprocess.image_size, config, spill, reporter)
    model = build_model(backbone, len(train_set.classes), config, device, train_set.multilabel)

    started = time.perf_counter()
    trainer = fit(model, train_set, val_set, config, fine_tune_at, reporter, device, spill,
                  backbone.weights_sha256, checkpoints=work)
    seconds = time.perf_counter() - started
    if not ctx.main:
        return None
    best = trainer.best
    reporter.log(f"Kept epoch {best['epoch']} (phase {best['phase']}, best {config.monitor}); "
                 f"val_accuracy {best['val_accuracy']:.4f}; training took {seconds:.0f}s")
    return save_run(work, model, backbone, fine_tune_at, config, trainer, seconds, train_set, val_set, skipped,
                    reporter, record)


def resumed_config(work: Path, data, config: TrainConfig | None, overrides: dict, world_size: int = 1) -> TrainConfig:
    """The interrupted run's own settings; other data, another world size or a different value
    asked for now is an error."""
    meta = run.read_json(work / run.META) or {}
    trained_on = meta.get("data")
    if trained_on is not None and Path(trained_on).resolve() != Path(data).resolve():
        raise ConfigError(f"{work} was started on {trained_on}, not {data}; resume it with the same data")
    if meta.get("world_size", 1) != world_size:
        raise ConfigError(f"{work} was trained by {meta.get('world_size', 1)} process(es), not {world_size}; resume it "
                          "with the same world size (the order and the batches depend on it)")
    saved = TrainConfig.from_file(work / run.META)
    asked = {**(config.changed() if config else {}), **overrides}
    different = {k: v for k, v in asked.items() if saved.to_dict().get(k, object()) != v}
    if different:
        name, value = next(iter(different.items()))
        raise ConfigError(f"resume continues with the run's own settings: {name} is {saved.to_dict().get(name)!r} "
                          f"there, not {value!r} (start a new run to change it)")
    return saved


def fit(model: TransferModel, train_set: LabelledImages, val_set: LabelledImages, config: TrainConfig,
        fine_tune_at: int, reporter: Reporter, device: torch.device, spill_dir: Path | None = None,
        weights_sha256: str | None = None, checkpoints: Path | None = None) -> "Trainer":
    """The two phases as the seed runs them; the model ends with the best epoch's weights. With
    `checkpoints` (a run folder), each epoch leaves a checkpoint there and a checkpoint found there
    is continued."""
    started = time.perf_counter()
    config = filled(config)  # already decided when `train` calls it; the preset's values otherwise
    set_threads(config.threads)  # extraction, and the inference after training, too
    trainer = Trainer(model, train_set, config, reporter, device, checkpoints)
    head_views, suffix_views = cached_views(model, train_set, val_set, config, fine_tune_at, spill_dir,
                                            weights_sha256, reporter, device)
    trainer.timings.setdefault("extract_seconds", time.perf_counter() - started)
    trainer.fit_head(*head_views)
    trainer.fine_tune(*suffix_views, fine_tune_at)
    trainer.keep_best()
    return trainer


# -- the steps ---------------------------------------------------------------------------------

@dataclass
class Listing:
    """The labelled files before decoding: training (and validation) sources."""

    train: LabelledImages
    val: LabelledImages | None


def list_data(data: str | Path, val_data: str | Path | None, config: TrainConfig) -> Listing:
    """List the files and check the labels: two classes or more, enough images per class for a
    split; a separate validation set with the same classes (and the same task: multi-label data
    is validated on multi-label data)."""
    listing = Listing(load_labelled(data, task=config.task, sep=config.label_sep), None)
    check_labels(listing.train, str(data), split=val_data is None, val_split=config.val_split, seed=config.seed)
    check_sampler(listing.train.labels, config.sampler)
    if val_data is not None:
        task = "multilabel" if listing.train.multilabel else "multiclass"
        listing.val = load_labelled(val_data, listing.train.classes, task, config.label_sep)
        check_labels(listing.val, str(val_data), split=False, every_class=False)
    return listing


def build_backbone(config: TrainConfig, reporter: Reporter) -> Backbone:
    """The pretrained backbone."""
    backbone = create_backbone(config.backbone, config.weights, config.image_size)
    reporter.log(f"Backbone {backbone.name}: weights {backbone.weights}")
    reporter.log(f"Number of layers in the base model: {len(backbone.layers)}")
    return backbone


def prepare_data(listing: Listing, data, val_data, size: int, config: TrainConfig, spill_dir: Path,
                 reporter: Reporter) -> tuple[LabelledImages, LabelledImages, list[tuple[str, str]]]:
    """Decode every image once; split off the validation set (stratified) unless one was given."""
    everything = merge_duplicates(_decode(listing.train, "data", size, config, spill_dir, reporter), str(data))
    check_labels(everything, str(data), split=listing.val is None, val_split=config.val_split, seed=config.seed)
    if listing.val is None:
        train_idx, val_idx = stratified_split(everything.labels, config.val_split, config.seed)
        train_set, val_set = everything.subset(train_idx), everything.subset(val_idx)
        skipped = everything.skipped
    else:
        train_set = everything
        val_set = merge_duplicates(_decode(listing.val, "validation data", size, config, spill_dir, reporter),
                                   str(val_data))
        check_labels(val_set, str(val_data), split=False, every_class=False)
        shared = shared_images(train_set, val_set)
        if shared:
            raise DataError(f"{val_data}: {len(shared)} validation image(s) are also in the training data "
                            f"(first: {shared[0][1]} = {shared[0][0]}); validation must be held out")
        skipped = everything.skipped + val_set.skipped
        everything.notes += val_set.notes
    for note in everything.notes:
        reporter.log(note)
    if skipped:
        reporter.log(f"Skipped {len(skipped)} file(s); listed in skipped.csv")
    if train_set.multilabel:
        cardinality = everything.labels.sum(1)
        reporter.log(f"Multi-label data: {len(everything.classes)} classes, {cardinality.mean():.2f} labels per "
                     f"image on average, {int((cardinality == 0).sum())} image(s) with none; one sigmoid per class")
    reporter.log(f"Training on {len(train_set)} images, validating on {len(val_set)}; "
                 f"{'images per class' if train_set.multilabel else 'classes'} {everything.counts()}")
    return train_set, val_set, skipped


def _decode(raw: LabelledImages, name: str, size: int, config: TrainConfig, spill_dir: Path,
            reporter: Reporter) -> LabelledImages:
    reporter.start(f"decoding {name}", len(raw))
    try:
        return distributed.current().decode(  # under torchrun each rank decodes its shard of the files
            decode, raw, size, spill_dir=spill_dir, budget=memory_budget(config.cache_memory_gb),
            keep=config.keep_cache, progress=lambda i, n: reporter.advance())
    finally:
        reporter.stop()


def build_model(backbone: Backbone, num_classes: int, config: TrainConfig, device: torch.device,
                multilabel: bool = False) -> TransferModel:
    """The seed's model: augmentation -> preprocessing -> frozen backbone -> GAP -> dropout -> linear
    (one logit for two classes, else one per class: softmax, or `multilabel` sigmoids)."""
    model = TransferModel(backbone.model, num_classes, backbone.preprocess, config.dropout, config.flip,
                          config.rotation, config.train_bn, multilabel)
    return model.to(device, memory_format=torch.channels_last)


def cached_views(model: TransferModel, train_set: LabelledImages, val_set: LabelledImages, config: TrainConfig,
                 fine_tune_at: int, spill_dir: Path | None, weights_sha256: str | None, reporter: Reporter,
                 device: torch.device) -> tuple[PhaseViews, PhaseViews]:
    """What each phase trains on: the frozen layers' outputs, computed once (the cache), or the
    decoded images through the whole model each epoch (`cache=False`, the seed's plain loop)."""
    if not config.cache:
        reporter.log("Cache off (--no-cache): every epoch runs the full model on every image")
        plain = plain_views(model, train_set, val_set)
        return plain, plain
    cache_plan = plan(model, train_set, len(val_set), config, fine_tune_at, device)
    for line in cache_plan.describe(fine_tune_at, spill_dir):
        reporter.log(line)
    return build_views(model, train_set, val_set, config, cache_plan, device, spill_dir, weights_sha256, reporter)


class Trainer:
    """Runs the epochs of both phases, keeps the history and the best epoch's weights, stops a
    phase early when asked (`patience`), and checkpoints every epoch."""

    def __init__(self, model: TransferModel, train_set: LabelledImages, config: TrainConfig,
                 reporter: Reporter, device: torch.device, checkpoints: Path | None = None):
        self.model, self.config, self.reporter, self.device = model, config, reporter, device
        self.checkpoints = checkpoints
        self.n_batches = -(-len(train_set) // config.batch_size)
        self.rng = np.random.default_rng(config.seed)
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.best_logits: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.stopped: dict[str, dict] = {}  # phase -> where and why it stopped early
        self.resumed_optimizer: dict | None = None
        self.experiment = open_log(config.log_to, checkpoints, config.to_dict()) \
            if checkpoints and distributed.current().main else None
        self.class_weight = class_weights(train_set.labels, model.num_classes, config.class_weight)
        if self.class_weight is not None or config.sampler != "none":
            weights = "off" if self.class_weight is None else [round(w, 3) for w in self.class_weight.tolist()]
            kind = "pos_weight per class" if model.multilabel else "class weights"
            reporter.log(f"Imbalance: {kind} {weights}, sampler {config.sampler}")
        if checkpoints is not None:
            self.restore()

    def fit_head(self, train_views: Views, val_views: Views) -> None:
        """Phase 1: the new head only, the whole backbone frozen, at the base learning rate."""
        self.phase(1, self.config.epochs, len(self.model.layers), self.config.lr, train_views, val_views)

    def fine_tune(self, train_views: Views, val_views: Views, fine_tune_at: int) -> None:
        """Phase 2: layers from `fine_tune_at` on, at lr x fine_tune_lr_factor."""
        self.phase(2, self.config.fine_tune_epochs, fine_tune_at,
                   self.config.lr * self.config.fine_tune_lr_factor, train_views, val_views)

    def phase(self, phase: int, epochs: int, trainable_from: int, lr: float, train_views: Views,
              val_views: Views) -> None:
        done = sum(r["phase"] == phase for r in self.history)
        if done >= epochs or str(phase) in self.stopped:
            return
        started = time.perf_counter()
        self.model.unfreeze_from(trainable_from)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr)
        if done and self.resumed_optimizer is not None:  # resuming inside this phase
            optimizer.load_state_dict(self.resumed_optimizer)
        threads = set_threads(self.config.threads)
        train_views = distributed.current().replicate(self.model, train_views)
        self.reporter.log(f"Phase {phase}: {'head only' if phase == 1 else f'fine-tuning layers {trainable_from}..'}"
                          f", {sum(p.numel() for p in params):,} trainable parameters, lr {lr:g}, {threads} thread(s)")
        for _ in range(epochs - done):
            self.epoch(phase, lr, optimizer, train_views, val_views)
            self.stop_early(phase)
            self.checkpoint(phase, optimizer)
            self.reporter.check()  # a Ctrl-C during the epoch takes effect here at the latest
            if str(phase) in self.stopped:
                break
        self.timings[f"phase{phase}_seconds"] = self.timings.get(f"phase{phase}_seconds", 0.0) + \
            time.perf_counter() - started

    def epoch(self, phase: int, lr: float, optimizer, train_views: Views, val_views: Views) -> None:
        epoch, start = len(self.history) + 1, time.perf_counter()
        self.reporter.start(f"phase {phase} epoch {epoch}", self.n_batches)
        try:
            train_loss, train_acc = train_epoch(self.model, train_views, optimizer, self.config.batch_size,
                                                self.rng, self.device, self.reporter, self.config.sampler,
                                                self.class_weight)
        finally:
            self.reporter.stop()
        if not np.isfinite(train_loss):
            raise ConfigError(f"training diverged in epoch {epoch} (loss {train_loss}); lower lr (now {lr:g})")
        first = self.history[0]["train_loss"] if self.history else train_loss
        if train_loss > DIVERGED * first and not self.warnings:
            self.warnings.append(f"the training loss grew from {first:.4g} (epoch 1) to {train_loss:.4g} (epoch "
                                 f"{epoch}): the learning rate ({lr:g}) is probably too high")
            self.reporter.log(f"warning: {self.warnings[-1]}")
        logits = distributed.current().predict_logits(self.model, val_views.inputs[0], val_views.forward,
                                                      self.config.batch_size, self.device)
        val = epoch_metrics(val_views.labels, self.model.probabilities(torch.from_numpy(logits)).numpy(), 0.5)
        row = {"epoch": epoch, "phase": phase, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_map": val["map"],
               "seconds": time.perf_counter() - start}
        self.history.append(row)
        if is_better(row, self.best, self.config.monitor):
            self.best, self.best_state = row, {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_logits = logits  # what calibration needs: the kept model's validation logits
        self.reporter.log(f"epoch {epoch:>3} phase {phase}  loss {train_loss:.4f}  acc {train_acc:.4f}"
                          f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
                          + (f"  val_map {row['val_map']:.4f}" if self.model.multilabel else "") +
                          f"  {row['seconds']:.1f}s" + ("  *" if self.best is row else ""))
        if self.experiment:
            self.experiment.epoch(row)

    def stop_early(self, phase: int) -> None:
        """Record an early stop when the phase's best monitored epoch is `patience` epochs old."""
        patience = self.config.patience
        rows = [r for r in self.history if r["phase"] == phase]
        if patience is None or not rows:
            return
        best = rows[0]
        for row in rows[1:]:
            best = row if is_better(row, best, self.config.monitor) else best
        if rows[-1]["epoch"] - best["epoch"] >= patience:
            reason = f"no better {self.config.monitor} than epoch {best['epoch']} for {patience} epoch(s)"
            self.stopped[str(phase)] = {"epoch": rows[-1]["epoch"], "reason": reason}
            self.reporter.log(f"Phase {phase} stops early after epoch {rows[-1]['epoch']}: {reason}")

    def keep_best(self) -> dict:
        """The model ends frozen, in inference mode, with the best epoch's weights."""
        self.model.load_state_dict(self.best_state)
        self.model.unfreeze_from(len(self.model.layers))
        self.model.eval()
        return self.best

    # -- checkpoints: what changes during training, and every random state -----------------------

    def changing_keys(self) -> list[str]:
        """State-dict keys of what training can change now: the head and the unfrozen layers
        (the frozen rest is the pretrained weights, rebuilt identically on resume)."""
        names = {id(t): k for k, t in self.model.state_dict(keep_vars=True).items()}
        keys = [k for k in names.values() if k.startswith("head.")]
        for _, module in self.model.layers[self.model.trainable_from:]:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                if id(tensor) in names:
                    keys.append(names[id(tensor)])
        return keys

    def checkpoint(self, phase: int, optimizer) -> None:
        if self.checkpoints is None or not distributed.current().main:
            return
        keys = self.changing_keys()
        current = self.model.state_dict()
        tensors = {**{f"model.{k}": current[k] for k in keys}, **{f"best.{k}": self.best_state[k] for k in keys},
                   "rng.torch": torch.get_rng_state(), "best_logits": torch.from_numpy(self.best_logits)}
        saved = optimizer.state_dict()
        for index, values in saved["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
        legacy = np.random.get_state()
        state = {"epoch": len(self.history), "phase": phase, "history": self.history, "best": self.best,
                 "stopped": self.stopped, "timings": self.timings, "warnings": self.warnings,
                 "optimizer": {"param_groups": saved["param_groups"],
                               "state": {str(i): sorted(v) for i, v in saved["state"].items()}},
                 "rng_numpy": self.rng.bit_generator.state, "rng_python": random.getstate(),
                 "rng_numpy_legacy": [legacy[0], legacy[1].tolist(), *legacy[2:]]}
        run.save_checkpoint(self.checkpoints, tensors, state)

    def restore(self) -> None:
        """Continue from the checkpoint in the run folder, if there is one."""
        found = distributed.current().on_main(run.load_checkpoint, self.checkpoints)
        if found is None:
            return
        tensors, state = found
        initial = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        self.best_state = {**initial, **{k[5:]: v for k, v in tensors.items() if k.startswith("best.")}}
        self.history, self.best, self.stopped = state["history"], state["best"], state["stopped"]
        self.best_logits = tensors["best_logits"].numpy()
        self.timings, self.warnings = state["timings"], state["warnings"]
        self.rng.bit_generator.state = state["rng_numpy"]
        torch.set_rng_state(tensors["rng.torch"])
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((state["rng_numpy_legacy"][0], np.asarray(state["rng_numpy_legacy"][1], np.uint32),
                             *state["rng_numpy_legacy"][2:]))
        optimizer = state["optimizer"]
        self.resumed_optimizer = {"param_groups": optimizer["param_groups"], "state": {
            int(i): {name: tensors[f"optimizer.{i}.{name}"] for name in names} for i, names in optimizer["state"].items()}}
        self.reporter.log(f"Resuming after epoch {state['epoch']} (phase {state['phase']}) from the checkpoint "
                          f"in {self.checkpoints}")


def train_epoch(model: TransferModel, views: Views, optimizer, batch_size: int,
                rng: np.random.Generator, device, reporter: Reporter, sampler: str = "none",
                class_weight: torch.Tensor | None = None) -> tuple[float, float]:
    """One pass in a seeded random order (class-balanced draws with `sampler="balanced"`), one
    stored view per image; returns (loss, accuracy: multi-label, every label right)."""
    model.train()
    ctx = distributed.current()  # under torchrun: each rank takes its part of every batch
    n = len(views.labels)
    order = epoch_order(views.labels, rng, sampler)
    pick = rng.integers(0, views.num_views, n) if views.num_views > 1 else np.zeros(n, dtype=np.int64)
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        batch = ctx.batch(order[start:start + batch_size], views.labels, class_weight)
        index = batch.index
        x = to_batch(views.inputs[pick[index], index], device)
        y = torch.from_numpy(views.labels[index]).to(device)  # class indices, or multi-label 0/1 (B, C)
        logits = views.forward(x)
        loss = batch.loss(model.loss(logits, y, class_weight), logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * batch.share
        correct += exact_matches(model.probabilities(logits.detach()).cpu().numpy(), views.labels[index])
        seen = start + len(index)
        reporter.advance(f"loss {total_loss / seen:.4f} acc {correct / seen:.3f}")
    total_loss, correct = ctx.sum(total_loss, correct)
    return total_loss / n, correct / n


def exact_matches(probabilities: np.ndarray, labels: np.ndarray) -> int:
    """Images whose decision at 0.5 is right (multi-label: every one of their labels)."""
    if labels.ndim == 2:
        return int((predict_sets(probabilities, 0.5) == labels).all(1).sum())
    return int((predict_labels(probabilities) == labels).sum())


def is_better(row: dict, best: dict | None, monitor: str) -> bool:
    """Higher accuracy or mean average precision (ties: lower loss), or lower loss."""
    if best is None:
        return True
    if monitor in ("val_accuracy", "val_map"):
        return (row[monitor], -row["val_loss"]) > (best[monitor], -best["val_loss"])
    return row["val_loss"] < best["val_loss"]


def calibrate(model: TransferModel, logits: np.ndarray, labels: np.ndarray,
              config: TrainConfig) -> tuple[np.ndarray, dict, dict | None]:
    """Fit the temperature (sets model.temperature) and, for two classes, the threshold on the
    validation logits; returns the calibrated probabilities and what was fitted."""
    if model.multilabel:
        return calibrate_labels(model, logits, labels, config)
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


def calibrate_labels(model: TransferModel, logits: np.ndarray, labels: np.ndarray,
                     config: TrainConfig) -> tuple[np.ndarray, dict, dict]:
    """Multi-label `calibrate`: a temperature per class (sets model.temperature) and a threshold
    per class, fixed (`threshold`) or chosen on validation (`threshold_metric`)."""
    model.temperature = 1.0
    before = model.probabilities(torch.from_numpy(logits)).numpy()
    temperatures = fit_temperatures(logits, labels)
    model.temperature = temperatures
    probs = model.probabilities(torch.from_numpy(logits)).numpy()
    scaled = logits / np.asarray(temperatures, dtype=np.float32)
    flat = labels.reshape(-1)
    calibration = {"temperature": temperatures, "method": "temperature scaling per class on the validation set",
                   "loss_before": nll(logits.reshape(-1, 1), flat), "loss_after": nll(scaled.reshape(-1, 1), flat),
                   "ece_before": binary_calibration_error(labels, before),
                   "ece_after": binary_calibration_error(labels, probs)}
    if config.threshold_metric == "none":
        return probs, calibration, {"metric": "fixed", "threshold": [config.threshold] * labels.shape[1]}
    chosen = [choose_threshold(labels[:, j], probs[:, j], config.threshold_metric) for j in range(labels.shape[1])]
    return probs, calibration, {"metric": config.threshold_metric, "threshold": [c["threshold"] for c in chosen],
                                "per_class": chosen}


def save_run(out: Path, model: TransferModel, backbone: Backbone, fine_tune_at: int, config: TrainConfig,
             trainer: Trainer, seconds: float, train_set: LabelledImages, val_set: LabelledImages,
             skipped: list[tuple[str, str]], reporter: Reporter, record: dict) -> Classifier:
    """Calibrate on validation, then write the run folder: weights, metrics, history, curves, the
    skipped files, the validation predictions, the report, and last model.json ("complete")."""
    from ..reports.report import write_report

    val_logits = trainer.best_logits  # the kept epoch's, from its validation (the same model, the cached inputs)
    val_probs, calibration, selection = calibrate(model, val_logits, val_set.labels, config)
    reporter.log(f"Calibration on validation: temperature {shown(calibration['temperature'])}, ECE "
                 f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}"
                 + (f"; threshold {shown(selection['threshold'], 4)} ({selection['metric']})" if selection else ""))
    layers = backbone.layers
    classifier = Classifier(model, train_set.classes, {
        "task": "multilabel" if model.multilabel else "multiclass",
        "label_sep": config.label_sep,
        "temperature": calibration["temperature"],
        "threshold": selection["threshold"] if selection else 0.5,
        "threshold_selection": selection,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "timm_kwargs": backbone.timm_kwargs,
        "preprocess": {"image_size": backbone.preprocess.image_size, "mean": list(backbone.preprocess.mean),
                       "std": list(backbone.preprocess.std)},
        "fine_tune_at": {"index": fine_tune_at, "name": layers[fine_tune_at][0] if fine_tune_at < len(layers) else None,
                         "num_layers": len(layers)},
        "config": config.to_dict(),
        "auto_settings": [k for k, v in record["config"].items() if v is None and getattr(config, k) is not None],
        "decisions": record.get("decisions", []),
        "best_epoch": trainer.best["epoch"],
        "training_seconds": round(seconds, 1),
        "timings": {k: round(v, 2) for k, v in trainer.timings.items()},
        "warnings": trainer.warnings,
        "early_stopping": trainer.stopped,
        "data": record["data"],
        "val_data": record["val_data"],
        "world_size": record["world_size"],
    })
    run.save_weights(classifier, out)
    metrics = evaluation_metrics(val_set.labels, val_probs, val_set.classes, classifier.threshold)
    metrics.update(split="validation", best_epoch=trainer.best["epoch"], calibration=calibration,
                   threshold_selection=selection, early_stopping=trainer.stopped, counts={
        "train": train_set.counts(), "validation": val_set.counts(), "skipped": len(skipped)})
    write_outputs(out, trainer.history, metrics, skipped, config.epochs)
    run.write_predictions(out / "val_predictions.csv", val_set.paths, val_set.labels, val_probs, val_set.classes,
                          config.label_sep)
    write_report(out, classifier, "validation", val_set.paths, val_set.labels, val_probs, val_set.images)
    if trainer.experiment:
        trainer.experiment.finish(metrics)
    if not config.keep_cache:
        shutil.rmtree(out / "cache", ignore_errors=True)
    run.mark_complete(classifier, out)
    return classifier


def shown(value, digits: int = 3) -> str:
    """A number, or a list of them (one per class), for the log."""
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.{digits}f}" for v in value) + "]"
    return f"{value:.{digits}f}"


def write_outputs(out: Path, history: list[dict], metrics: dict, skipped: list, epochs: int) -> None:
    """history.csv, metrics.json, skipped.csv and learning_curves.png."""
    from ..reports.plots import learning_curves

    with atomic_path(out / "history.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    run.write_skipped(out / "skipped.csv", skipped)
    with atomic_path(out / "learning_curves.png") as tmp:
        learning_curves(history, tmp, fine_tune_start=epochs + 0.5 if any(r["phase"] == 2 for r in history) else None)
