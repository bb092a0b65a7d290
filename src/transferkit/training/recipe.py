"""The entry point of training and the seed's two-phase recipe: train the new head on a frozen
backbone, then fine-tune the layers from `fine_tune_at` on at a tenth of the learning rate; keep
the best epoch of both phases.

`train()` is the one entry point of every preset: it settles the settings once and runs the recipe
(`train_run`), or for `--preset best` the search, a loop over `train_run` (search.py). `train_run`
reads in the order it runs: check the data, build the backbone, decide what the preset and the
data leave open, prepare the data, build the model, fit the head, fine-tune (the loop: trainer.py),
calibrate and save the run. The run folder says where it is (model.json's status); after every
epoch a checkpoint lets `resume=True` continue a killed or interrupted run to exactly the result
the uninterrupted run gives.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cfg.settings import TrainConfig
from ..data.balance import check_sampler
from ..data.decode import decode, fill, settle
from ..data.dedupe import merge_duplicates, shared_images
from ..data.leaks import cross_pairs, leak_document, leak_findings
from ..data.phash import DEFAULT_MAX_DISTANCE
from ..data.listing import LabelledImages, check_labels, load_labelled
from ..data.memory import memory_budget
from ..data.split import group_split, near_shared, split_groups
from ..data.window import Rules
from ..models.backbones import Backbone, create_backbone
from ..models.inference import predict_logits
from ..models.transfer import TransferModel, to_unit
from ..openworld import conformal, ood
from ..predict import run
from ..predict.classifier import Classifier
from ..predict.metrics import evaluation_metrics, predict_labels
from ..utils.errors import ConfigError, DataError, Interrupted
from ..utils.files import atomic_path, write_text
from ..utils.progress import Reporter
from ..utils.runtime import resolve_device, seed_everything, set_threads, stop_on_signals
from . import distributed, search
from .cache import HeadForward, PhaseViews, SuffixForward, Views, build_views, plain_views, plan, run_chain
from .calibrate import calibrate
from .presets import filled, resolve, smallest_class
from .trainer import Trainer

CHECK_FILE = "check.json"  # the run's own leak check (leak_check)


def train(data: str | Path, out: str | Path, config: TrainConfig | None = None,
          val_data: str | Path | None = None, reporter: Reporter | None = None,
          resume: bool = False, overwrite: bool = False, test_data: str | Path | None = None,
          **overrides) -> Classifier:
    """Train a classifier on `data` (class folders or a CSV) and write the run to `out`.

    `val_data`: a separate labelled set for validation; otherwise a stratified `val_split` of
    `data`. `test_data`: held-out images checked for near-duplicates of the training images (a
warning, and the run's check.json). Keyword overrides change single settings: `train("data", "runs/x", epochs=3)`.
    `out` holding a complete run is refused unless `overwrite` (the old run stays until the new
    one completes); `resume` continues an interrupted run with its own settings. `--preset best`
    trains its candidates one after another and keeps the best on validation. Under torchrun
    every rank calls this; rank 0 returns the classifier, the others None.
    """
    if resume:
        if overrides.get("task") == "anomaly" or (config is not None and config.task == "anomaly"):
            from .anomaly import refuse_resume

            refuse_resume()
        if overrides.get("preset") == "best" or (config is not None and config.preset == "best"):
            raise ConfigError("--resume does not apply to --preset best: Ctrl-C already ends the search with the "
                              "best completed candidate; start it again to search again")
        return train_run(data, out, config, val_data, reporter, resume=True, overwrite=overwrite, overrides=overrides,
                         test_data=test_data)
    if config is None or overrides:  # the settings, settled once
        config = TrainConfig.from_dict({**(config or TrainConfig()).to_dict(), **overrides})
    if config.task == "anomaly":  # a patch memory bank from good images, no epochs (training/anomaly.py)
        from . import anomaly

        return anomaly.train(data, out, config, val_data, reporter, overwrite)
    if config.preset == "best":
        if "RANK" in os.environ:
            raise ConfigError("--preset best runs its candidates one after another in one process; leave out --nproc "
                              "and torchrun")
        return search.search(train_run, data, Path(out), config, val_data, reporter or Reporter(), overwrite)
    return train_run(data, out, config, val_data, reporter, overwrite=overwrite, test_data=test_data)


def train_run(data: str | Path, out: str | Path, config: TrainConfig | None, val_data: str | Path | None = None,
              reporter: Reporter | None = None, resume: bool = False, overwrite: bool = False,
              overrides: dict | None = None, test_data: str | Path | None = None) -> Classifier:
    """One run of the recipe with settled settings (`resume`: the run folder's own, checked against
    `config` and `overrides`, what was asked for now)."""
    out = Path(out)
    ctx = distributed.start()  # under torchrun: this rank of the job; rank 0 alone decides and writes
    work = ctx.on_main(run.prepare, out, resume, overwrite)  # refuses before any work
    if resume:
        config = ctx.on_main(resumed_config, work, data, config, overrides or {}, ctx.world_size)
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
            classifier = train_steps(listing, record, work, config, reporter, device, ctx, test_data)
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
                device: torch.device, ctx: distributed.Context, test_data: str | Path | None = None) -> Classifier:
    """The recipe, step by step, writing into the run folder `work` (`record`: its data paths). Under
    torchrun every rank trains; rank 0 alone saves (the others return None)."""
    spill = ctx.scratch(work / "cache")
    backbone = build_backbone(config, reporter)
    config, fine_tune_at, notes = resolve(config, backbone, smallest_class(
        listing.train, config.val_split if record["val_data"] is None else None))
    record["decisions"] = notes
    for note in notes:
        reporter.log(note)
    reporter.log(f"fine_tune_at = {fine_tune_at} "
                 f"({backbone.layers[fine_tune_at][0] if fine_tune_at < len(backbone.layers) else 'none'})")
    train_set, val_set, skipped, rules = prepare_data(listing, record["data"], record["val_data"],
                                                      backbone.preprocess.image_size, config, spill, reporter, ctx)
    record["rules"] = rules
    checked = leak_check(work, listing, train_set, val_set, record["val_data"], test_data,
                         backbone.preprocess.image_size, config, spill, reporter, rules, ctx)
    record["check"] = {"file": CHECK_FILE, "counts": {k: v for k, v in checked["counts"].items() if v}}
    model = build_model(backbone, len(train_set.classes), config, device, train_set.multilabel)

    started = time.perf_counter()
    trainer = fit(model, train_set, val_set, config, fine_tune_at, reporter, device, spill,
                  backbone.weights_sha256, checkpoints=work, ctx=ctx)
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
        weights_sha256: str | None = None, checkpoints: Path | None = None,
        ctx: distributed.Context | None = None) -> Trainer:
    """The two phases as the seed runs them; the model ends with the best epoch's weights. With
    `checkpoints` (a run folder), each epoch leaves a checkpoint there and a checkpoint found there
    is continued."""
    started = time.perf_counter()
    config = filled(config)  # already decided when `train` calls it; the preset's values otherwise
    set_threads(config.threads)  # extraction, and the inference after training, too
    trainer = Trainer(model, train_set, config, reporter, device, checkpoints, ctx)
    head_views, suffix_views = cached_views(model, train_set, val_set, config, fine_tune_at, spill_dir,
                                            weights_sha256, reporter, device)
    trainer.timings.setdefault("extract_seconds", time.perf_counter() - started)
    trainer.views = (head_views, suffix_views)  # the OOD score's features come from them (save_run)
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
                 reporter: Reporter, ctx: distributed.Context | None = None
                 ) -> tuple[LabelledImages, LabelledImages, list[tuple[str, str]], Rules]:
    """Decode every image once; split off the validation set (stratified) unless one was given.
    High-bit-depth images wait for the data set's intensity window, measured on the training
    images alone (after the split), then go through it; returns the rules with that window."""
    rules = Rules.from_config(config)
    everything = merge_duplicates(_decode(listing.train, "data", size, config, spill_dir, reporter, rules, True, ctx),
                                  str(data))
    check_labels(everything, str(data), split=listing.val is None, val_split=config.val_split, seed=config.seed)
    if listing.val is None:
        # high-bit-depth images wait for the window (measured on the training side of this split): their
        # pixels are not there yet for the perceptual hashes, so only named groups keep them together
        waiting = everything.highbit is not None and bool(everything.highbit.samples)
        groups, notes = split_groups(everything, config.group_by, config.group_duplicates and not waiting)
        if waiting and config.group_duplicates:
            notes.append("Validation split: near-duplicate grouping left out for high-bit-depth images (their "
                         "pixels wait for the intensity window); named groups are kept together")
        for note in notes:
            reporter.log(note)
        train_idx, val_idx = group_split(everything.labels, groups, config.val_split, config.seed,
                                         everything.classes)
    else:
        train_idx = np.arange(len(everything))
    started = time.perf_counter()
    rules, window_notes = settle(everything, train_idx, rules, config.window_low, config.window_high)
    fill(everything, rules, size)
    if everything.highbit is not None:
        window_notes.append(f"Intensity window measured and applied in {time.perf_counter() - started:.2f}s")
    for note in window_notes:
        reporter.log(note)
    if listing.val is None:
        train_set, val_set = everything.subset(train_idx), everything.subset(val_idx)
        skipped = everything.skipped
    else:
        train_set = everything
        val_set = merge_duplicates(_decode(listing.val, "validation data", size, config, spill_dir, reporter,
                                           rules, ctx=ctx), str(val_data))
        check_labels(val_set, str(val_data), split=False, every_class=False)
        shared = shared_images(train_set, val_set)
        if shared:
            raise DataError(f"{val_data}: {len(shared)} validation image(s) are also in the training data "
                            f"(first: {shared[0][1]} = {shared[0][0]}); validation must be held out")
        near = near_shared(train_set, val_set) if config.group_duplicates else []
        if near:
            named = "; ".join(f"{v} ~ {t} ({bits} bits)" for v, t, bits in near[:5])
            reporter.log(f"Warning: {len(near)} validation image(s) are near-duplicates of training images "
                         f"(perceptual hashes within 6 bits of 64): {named}"
                         + (f"; and {len(near) - 5} more (transferkit check lists all)" if len(near) > 5 else ""))
        if config.group_by or listing.train.groups is not None:
            reporter.log("Groups (--group-by, a group column) apply to a validation split; --val-dir is used as given")
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
    return train_set, val_set, skipped, rules


def leak_check(work: Path, listing: Listing, train_set: LabelledImages, val_set: LabelledImages, val_data,
               test_data, size: int, config: TrainConfig, spill_dir: Path, reporter: Reporter, rules: Rules,
               ctx: distributed.Context) -> dict:
    """The cheap part of `transferkit check` on the sets this run uses (data.leaks): exact and
    near-duplicate leaks between training and validation (its own split or --val-dir) and the
    test set (--test-dir, decoded here as `evaluate` will decode it); test images that are
    near-duplicates of training images are named in a warning (--val-dir's are, in prepare_data).
    Written to the run's check.json, in the schema of `check --format json`."""
    parts = {"train": train_set, "val": val_set}
    if test_data is not None:
        task = "multilabel" if listing.train.multilabel else "multiclass"
        raw = load_labelled(test_data, listing.train.classes, task, config.label_sep)
        parts["test"] = _decode(raw, "test data", size, config, spill_dir, reporter, rules, ctx=ctx) if len(raw) else raw
    findings = leak_findings(parts)
    if test_data is not None:
        near = cross_pairs(findings, "test")
        if near:
            named = "; ".join(f"{t} ~ {tr} ({bits} bits)" for t, tr, bits in near[:5])
            reporter.log(f"Warning: {len(near)} test image(s) are the same as or near-duplicates of training images "
                         f"(perceptual hashes within {DEFAULT_MAX_DISTANCE} bits of 64, thumbnails matched): {named}"
                         + (f"; and {len(near) - 5} more (check.json in the run)" if len(near) > 5 else ""))
    if val_data is None:
        split_leaks = cross_pairs(findings, "val")
        if split_leaks:
            reporter.log(f"Warning: the validation split shares {len(split_leaks)} near-duplicate pair(s) with the "
                         f"training split (first: {split_leaks[0][0]} ~ {split_leaks[0][1]}); check.json in the run")
    document = leak_document(findings, {name: len(data) for name, data in parts.items()})
    if ctx.main:
        write_text(work / CHECK_FILE, json.dumps(document, indent=1) + "\n")
    return document


def _decode(raw: LabelledImages, name: str, size: int, config: TrainConfig, spill_dir: Path,
            reporter: Reporter, rules: Rules, defer: bool = False,
            ctx: distributed.Context | None = None) -> LabelledImages:
    reporter.start(f"decoding {name}", len(raw))
    try:
        return (ctx or distributed.current()).decode(  # under torchrun each rank decodes its shard of the files
            decode, raw, size, spill_dir=spill_dir, budget=memory_budget(config.cache_memory_gb),
            keep=config.keep_cache, progress=lambda i, n: reporter.advance(), rules=rules, defer=defer)
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
                       "std": list(backbone.preprocess.std), **record["rules"].to_meta()},
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
        "check": record.get("check"),
    })
    entries, scorer = open_world(out, model, trainer, train_set, val_set, val_probs, config, reporter,
                                 selection["threshold"] if selection else 0.5)
    classifier.meta.update(entries)
    classifier.set_scorer(scorer)
    run.save_weights(classifier, out)
    metrics = evaluation_metrics(val_set.labels, val_probs, val_set.classes, classifier.threshold)
    metrics.update(split="validation", best_epoch=trainer.best["epoch"], calibration=calibration,
                   threshold_selection=selection, early_stopping=trainer.stopped, counts={
        "train": train_set.counts(), "validation": val_set.counts(), "skipped": len(skipped)})
    write_outputs(out, trainer.history, metrics, skipped, config.epochs)
    run.write_predictions(out / "val_predictions.csv", val_set.paths, val_set.labels, val_probs, val_set.classes,
                          config.label_sep)
    write_report(out, classifier, "validation", val_set.paths, val_set.labels, val_probs, val_set.images)
    trainer.finish(metrics)
    if not config.keep_cache:
        shutil.rmtree(out / "cache", ignore_errors=True)
    run.mark_complete(classifier, out)
    return classifier


def kept_features(model: TransferModel, views: PhaseViews, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """The kept model's pooled features (penultimate layer) of the clean view of every training and
    validation image, from the stored inputs the phase trained on: the pooled features themselves
    (phase 1's cache), the trainable suffix on the cached boundary activations (phase 2's), or the
    whole model on the decoded images (--no-cache)."""
    def forward_of(view: Views):
        if isinstance(view.forward, SuffixForward):
            suffix = view.forward.suffix
            return lambda x: model.backbone.forward_head(run_chain(suffix, x), pre_logits=True)
        if isinstance(view.forward, HeadForward):
            return lambda x: x
        return lambda x: model.features(model.normalize(to_unit(x)))

    return tuple(predict_logits(model, view.inputs[0], forward_of(view), batch_size, device) for view in views)


def open_world(out: Path, model: TransferModel, trainer: Trainer, train_set: LabelledImages,
               val_set: LabelledImages, val_probs: np.ndarray, config: TrainConfig,
               reporter: Reporter, threshold: float = 0.5) -> tuple[dict, ood.OodScorer]:
    """Fit what "I don't know" needs on what the run knows, write it to out/ood.safetensors and
    return model.json's entries: the OOD score on the kept model's features (bank: the training
    images; threshold: the validation images, a fraction ood_keep of them pass) and the
    conformal scores of the validation images (single-label runs)."""
    started = time.perf_counter()
    head_views, suffix_views = trainer.views
    views = head_views if trainer.best["phase"] == 1 else suffix_views  # the kept epoch's inputs
    device = next(model.parameters()).device
    train_features, val_features = kept_features(model, views, config.batch_size, device)
    scorer = ood.fit(ood.DEFAULT_METHOD, train_features, train_set.labels, val_features, trainer.best_logits,
                     seed=config.seed)
    for note in scorer.notes:
        reporter.log(note)
    extra = scorer.extra
    if not model.multilabel:
        extra["conformal_scores"] = np.sort(conformal.scores(  # of the sets that always hold the answer
            val_probs, val_set.labels, conformal.tie_breaks(val_set.images), predict_labels(val_probs, threshold)))
    digest = ood.save(scorer, out / ood.FILE)
    entries = {"ood": {**ood.describe(scorer, config.ood_keep, digest), "seconds": round(time.perf_counter() - started, 2)}}
    if extra:
        q = conformal.threshold(extra["conformal_scores"], conformal.DEFAULT_COVERAGE)
        entries["conformal"] = {"method": conformal.METHOD, "file": ood.FILE, "coverage": conformal.DEFAULT_COVERAGE,
                                "threshold": q if np.isfinite(q) else None,  # None: too few images, every class
                                "calibration_images": len(val_set)}
    reporter.log(f"OOD score: {scorer.method}" + (f" (k = {scorer.k})" if scorer.method == "knn" else "") +
                 f" on the kept model's features, threshold {entries['ood']['threshold']:.4f} (keeps "
                 f"{config.ood_keep:.0%} of the validation images)"
                 + (f"; conformal sets ({conformal.METHOD}) calibrated on {len(val_set)} validation images"
                    if extra else "; no conformal sets for a multi-label run")
                 + f"; {time.perf_counter() - started:.1f}s")
    return entries, scorer


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
