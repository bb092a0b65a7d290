"""The training loop, in the order it runs (torchvision's references/classification/train.py is the
model): for each phase, unfreeze, build the optimizer and schedule, then for each epoch train one
pass, validate, and hand the epoch to the callbacks (the kept-epoch rule, early stopping, logging,
checkpoints: callbacks.py). Phase 1 trains the new head on a frozen backbone at the base learning
rate; phase 2 the layers from `fine_tune_at` on at lr x fine_tune_lr_factor.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..cfg.settings import TrainConfig
from ..data.balance import class_weights, epoch_order
from ..data.listing import LabelledImages
from ..models.inference import to_batch
from ..models.transfer import TransferModel
from ..predict.metrics import epoch_metrics, predict_labels, predict_sets
from ..utils.errors import ConfigError
from ..utils.progress import Reporter
from ..utils.runtime import set_threads
from . import distributed
from .cache import Views
from .callbacks import (Callback, Checkpoint, DivergenceWarning, EarlyStopping, ExperimentLog, KeepBest,
                        changing_keys)
from .optim import create_optimizer, create_scheduler, current_lr


class Trainer:
    """Runs the epochs of both phases and keeps the history; `callbacks` do the rest (by default:
    keep the best epoch, warn on divergence, stop early with `patience`, log to `log_to`, and
    checkpoint every epoch into `checkpoints`, a run folder, continuing a checkpoint found there)."""

    def __init__(self, model: TransferModel, train_set: LabelledImages, config: TrainConfig,
                 reporter: Reporter, device: torch.device, checkpoints: Path | None = None,
                 ctx: distributed.Context | None = None, callbacks: list[Callback] | None = None):
        self.model, self.config, self.reporter, self.device = model, config, reporter, device
        self.ctx = ctx or distributed.current()
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
        self.callbacks = callbacks if callbacks is not None else default_callbacks(config, checkpoints, self.ctx)
        self.class_weight = class_weights(train_set.labels, model.num_classes, config.class_weight)
        if self.class_weight is not None or config.sampler != "none":
            weights = "off" if self.class_weight is None else [round(w, 3) for w in self.class_weight.tolist()]
            kind = "pos_weight per class" if model.multilabel else "class weights"
            reporter.log(f"Imbalance: {kind} {weights}, sampler {config.sampler}")
        self.emit("on_start")

    def emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit_head(self, train_views: Views, val_views: Views) -> None:
        """Phase 1: the new head only, the whole backbone frozen, at the base learning rate."""
        self.phase(1, self.config.epochs, len(self.model.layers), self.config.lr, train_views, val_views)

    def fine_tune(self, train_views: Views, val_views: Views, fine_tune_at: int) -> None:
        """Phase 2: layers from `fine_tune_at` on, at lr x fine_tune_lr_factor."""
        self.phase(2, self.config.fine_tune_epochs, fine_tune_at,
                   self.config.lr * self.config.fine_tune_lr_factor, train_views, val_views)

    def keep_best(self) -> dict:
        """The end of training: the callbacks' last word (the model takes the kept epoch's weights)."""
        self.emit("on_fit_end")
        return self.best

    def finish(self, metrics: dict) -> None:
        """The run's final metrics, for the callbacks that report them."""
        self.emit("on_run_end", metrics)

    def phase(self, phase: int, epochs: int, trainable_from: int, lr: float, train_views: Views,
              val_views: Views) -> None:
        done = sum(r["phase"] == phase for r in self.history)
        if done >= epochs or str(phase) in self.stopped:
            return
        started = time.perf_counter()
        self.model.unfreeze_from(trainable_from)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = create_optimizer(self.model, params, self.config.optimizer, lr, self.config.weight_decay)
        scheduler = create_scheduler(optimizer, self.config.scheduler, epochs)
        if done and self.resumed_optimizer is not None:  # resuming inside this phase
            optimizer.load_state_dict(self.resumed_optimizer)
        if scheduler is not None:
            scheduler.step(done)  # the rate of the phase's next epoch
        threads = set_threads(self.config.threads)
        train_views = self.ctx.replicate(self.model, train_views)
        self.reporter.log(f"Phase {phase}: {'head only' if phase == 1 else f'fine-tuning layers {trainable_from}..'}"
                          f", {sum(p.numel() for p in params):,} trainable parameters, lr {lr:g}, {threads} thread(s)")
        for index in range(done, epochs):
            row = self.epoch(phase, current_lr(optimizer), optimizer, train_views, val_views)
            if scheduler is not None:
                scheduler.step(index + 1)
            self.emit("on_epoch_end", row, optimizer, scheduler)
            self.reporter.check()  # a Ctrl-C during the epoch takes effect here at the latest
            if str(phase) in self.stopped:
                break
        self.timings[f"phase{phase}_seconds"] = self.timings.get(f"phase{phase}_seconds", 0.0) + \
            time.perf_counter() - started

    def epoch(self, phase: int, lr: float, optimizer, train_views: Views, val_views: Views) -> dict:
        """One training pass, then validation: the epoch's history row."""
        epoch, start = len(self.history) + 1, time.perf_counter()
        self.reporter.start(f"phase {phase} epoch {epoch}", self.n_batches)
        try:
            train_loss, train_acc = train_epoch(self.model, train_views, optimizer, self.config.batch_size,
                                                self.rng, self.device, self.reporter, self.config.sampler,
                                                self.class_weight, self.ctx)
        finally:
            self.reporter.stop()
        if not np.isfinite(train_loss):
            raise ConfigError(f"training diverged in epoch {epoch} (loss {train_loss}); lower lr (now {lr:g})")
        self.emit("on_train_epoch_end", epoch, train_loss, lr)
        logits = self.ctx.predict_logits(self.model, val_views.inputs[0], val_views.forward,
                                         self.config.batch_size, self.device)
        val = epoch_metrics(val_views.labels, self.model.probabilities(torch.from_numpy(logits)).numpy(), 0.5)
        row = {"epoch": epoch, "phase": phase, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_map": val["map"],
               "seconds": time.perf_counter() - start}
        self.history.append(row)
        self.emit("on_validation_end", row, logits)
        self.reporter.log(f"epoch {epoch:>3} phase {phase}  loss {train_loss:.4f}  acc {train_acc:.4f}"
                          f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
                          + (f"  val_map {row['val_map']:.4f}" if self.model.multilabel else "") +
                          f"  {row['seconds']:.1f}s" + ("  *" if self.best is row else ""))
        return row

    def changing_keys(self) -> list[str]:
        return changing_keys(self.model)


def default_callbacks(config: TrainConfig, checkpoints: Path | None, ctx: distributed.Context) -> list[Callback]:
    """The loop's side concerns, in the order their hooks run."""
    callbacks: list[Callback] = [KeepBest(), DivergenceWarning()]
    if checkpoints and ctx.main:
        callbacks.append(ExperimentLog(config.log_to, checkpoints, config.to_dict()))
    callbacks.append(EarlyStopping(config.patience, config.monitor))
    if checkpoints is not None:
        callbacks.append(Checkpoint(checkpoints))
    return callbacks


def train_epoch(model: TransferModel, views: Views, optimizer, batch_size: int,
                rng: np.random.Generator, device, reporter: Reporter, sampler: str = "none",
                class_weight: torch.Tensor | None = None, ctx: distributed.Context | None = None
                ) -> tuple[float, float]:
    """One pass in a seeded random order (class-balanced draws with `sampler="balanced"`), one
    stored view per image; returns (loss, accuracy: multi-label, every label right)."""
    model.train()
    ctx = ctx or distributed.current()  # under torchrun: each rank takes its part of every batch
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
