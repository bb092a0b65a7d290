"""The side concerns of the training loop, one small callback each (fastai's and Ultralytics'
pattern): the kept-epoch rule, the divergence warning, early stopping, experiment logging, and
checkpoints with every random state. The loop (trainer.py) calls the hooks in the order the
callbacks are listed; the state they keep lives on the trainer, where the run and the checkpoint
read it (`best`, `best_state`, `best_logits`, `stopped`, `warnings`).
"""

from __future__ import annotations

import copy
import random
import numpy as np
import torch

from ..predict import run
from .experiment import open_log

DIVERGED = 3.0  # a training loss this many times the first epoch's: the run diverged (warned)


def is_better(row: dict, best: dict | None, monitor: str) -> bool:
    """Higher accuracy or mean average precision (ties: lower loss), or lower loss."""
    if best is None:
        return True
    if monitor in ("val_accuracy", "val_map"):
        return (row[monitor], -row["val_loss"]) > (best[monitor], -best["val_loss"])
    return row["val_loss"] < best["val_loss"]


class Callback:
    """Every hook is optional; each gets the trainer (trainer.Trainer: the loop and its state)."""

    def on_start(self, trainer) -> None:
        """The trainer is made, before the views are built (a checkpoint to continue from is read here)."""

    def on_train_epoch_end(self, trainer, epoch: int, train_loss: float, lr: float) -> None:
        """After the epoch's training pass, before its validation."""

    def on_validation_end(self, trainer, row: dict, logits: np.ndarray) -> None:
        """The epoch's history row is complete (not yet logged)."""

    def on_epoch_end(self, trainer, row: dict, optimizer, scheduler) -> None:
        """The epoch is logged; last chance to stop the phase (`trainer.stopped`)."""

    def on_fit_end(self, trainer) -> None:
        """After the last phase."""

    def on_run_end(self, trainer, metrics: dict) -> None:
        """The run's final metrics are known."""


class KeepBest(Callback):
    """The kept-epoch rule: the epoch best on the monitored validation number, of either phase, is
    the model the run keeps (fine-tuning can make things worse), with the validation logits that
    calibration needs."""

    def on_validation_end(self, trainer, row, logits):
        if is_better(row, trainer.best, trainer.config.monitor):
            trainer.best = row
            trainer.best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            trainer.best_logits = logits

    def on_fit_end(self, trainer):
        """The model ends frozen, in inference mode, with the best epoch's weights."""
        trainer.model.load_state_dict(trainer.best_state)
        trainer.model.unfreeze_from(len(trainer.model.layers))
        trainer.model.eval()


class DivergenceWarning(Callback):
    """A training loss that grew to DIVERGED times the first epoch's: warned once (the learning rate
    is probably too high); a non-finite loss stops the run in the loop itself."""

    def on_train_epoch_end(self, trainer, epoch, train_loss, lr):
        first = trainer.history[0]["train_loss"] if trainer.history else train_loss
        if train_loss > DIVERGED * first and not trainer.warnings:
            trainer.warnings.append(f"the training loss grew from {first:.4g} (epoch 1) to {train_loss:.4g} (epoch "
                                    f"{epoch}): the learning rate ({lr:g}) is probably too high")
            trainer.reporter.log(f"warning: {trainer.warnings[-1]}")


class EarlyStopping(Callback):
    """Stops a phase when its best monitored epoch is `patience` epochs old (no-op without patience)."""

    def __init__(self, patience: int | None, monitor: str):
        self.patience, self.monitor = patience, monitor

    def on_epoch_end(self, trainer, row, optimizer, scheduler):
        phase = row["phase"]
        rows = [r for r in trainer.history if r["phase"] == phase]
        if self.patience is None or not rows:
            return
        best = rows[0]
        for other in rows[1:]:
            best = other if is_better(other, best, self.monitor) else best
        if rows[-1]["epoch"] - best["epoch"] >= self.patience:
            reason = f"no better {self.monitor} than epoch {best['epoch']} for {self.patience} epoch(s)"
            trainer.stopped[str(phase)] = {"epoch": rows[-1]["epoch"], "reason": reason}
            trainer.reporter.log(f"Phase {phase} stops early after epoch {rows[-1]['epoch']}: {reason}")


class ExperimentLog(Callback):
    """Each epoch's row, and the final metrics, to TensorBoard or MLflow (`--log-to`)."""

    def __init__(self, kind: str, run_dir, settings: dict):
        self.log = open_log(kind, run_dir, settings)

    def on_epoch_end(self, trainer, row, optimizer, scheduler):
        if self.log:
            self.log.epoch(row)

    def on_run_end(self, trainer, metrics):
        if self.log:
            self.log.finish(metrics)


class Checkpoint(Callback):
    """After every epoch, what changes during training and every random state, in the run folder;
    at the start, a checkpoint found there is continued, to exactly the result the uninterrupted
    run gives."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def on_start(self, trainer):
        found = trainer.ctx.on_main(run.load_checkpoint, self.run_dir)
        if found is None:
            return
        tensors, state = found
        model = trainer.model
        initial = copy.deepcopy(model.state_dict())
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        trainer.best_state = {**initial, **{k[5:]: v for k, v in tensors.items() if k.startswith("best.")}}
        trainer.history, trainer.best, trainer.stopped = state["history"], state["best"], state["stopped"]
        trainer.best_logits = tensors["best_logits"].numpy()
        trainer.timings, trainer.warnings = state["timings"], state["warnings"]
        trainer.rng.bit_generator.state = state["rng_numpy"]
        torch.set_rng_state(tensors["rng.torch"])
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((state["rng_numpy_legacy"][0], np.asarray(state["rng_numpy_legacy"][1], np.uint32),
                             *state["rng_numpy_legacy"][2:]))
        optimizer = state["optimizer"]
        trainer.resumed_optimizer = {"param_groups": optimizer["param_groups"], "state": {
            int(i): {name: tensors[f"optimizer.{i}.{name}"] for name in names} for i, names in optimizer["state"].items()}}
        trainer.reporter.log(f"Resuming after epoch {state['epoch']} (phase {state['phase']}) from the checkpoint "
                             f"in {self.run_dir}")

    def on_epoch_end(self, trainer, row, optimizer, scheduler):
        if not trainer.ctx.main:
            return
        keys = changing_keys(trainer.model)
        current = trainer.model.state_dict()
        tensors = {**{f"model.{k}": current[k] for k in keys}, **{f"best.{k}": trainer.best_state[k] for k in keys},
                   "rng.torch": torch.get_rng_state(), "best_logits": torch.from_numpy(trainer.best_logits)}
        saved = optimizer.state_dict()
        for index, values in saved["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
        legacy = np.random.get_state()
        state = {"epoch": len(trainer.history), "phase": row["phase"], "history": trainer.history,
                 "best": trainer.best, "stopped": trainer.stopped, "timings": trainer.timings,
                 "warnings": trainer.warnings,
                 "optimizer": {"param_groups": saved["param_groups"],
                               "state": {str(i): sorted(v) for i, v in saved["state"].items()}},
                 "rng_numpy": trainer.rng.bit_generator.state, "rng_python": random.getstate(),
                 "rng_numpy_legacy": [legacy[0], legacy[1].tolist(), *legacy[2:]]}
        run.save_checkpoint(self.run_dir, tensors, state)


def changing_keys(model) -> list[str]:
    """State-dict keys of what training can change now: the head and the unfrozen layers (the
    frozen rest is the pretrained weights, rebuilt identically on resume)."""
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    keys = [k for k in names.values() if k.startswith("head.")]
    for _, module in model.layers[model.trainable_from:]:
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) in names:
                keys.append(names[id(tensor)])
    return keys
