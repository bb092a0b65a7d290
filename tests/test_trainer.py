"""The training loop's pieces: the optimizer and schedule factories, and callbacks as the loop's
side concerns (their hooks run in order, and a callback can stop a phase)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import transferkit
from transferkit.training.callbacks import Callback, EarlyStopping, KeepBest
from transferkit.training.optim import create_optimizer, create_scheduler, current_lr

from conftest import SIZE


def small_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen tensor
    return model


def test_the_default_optimizer_is_the_seeds_adam_over_the_trainable_tensors_alone():
    model = small_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer(model, params, "adam", 1e-3, 0.0)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.state_dict()["param_groups"] == torch.optim.Adam(params, lr=1e-3).state_dict()["param_groups"]
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(params)]


def test_weight_decay_spares_biases_and_norms_and_never_reaches_frozen_tensors():
    model = small_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer(model, params, "adamw", 1e-3, 0.05)
    assert type(optimizer) is torch.optim.AdamW
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    spared = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {id(model[2].weight)}  # the one trainable matrix
    assert spared == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert id(model[0].weight) not in decayed | spared


def test_cosine_decays_over_the_phase_and_none_keeps_the_rate():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert create_scheduler(optimizer, "none", 5) is None
    scheduler = create_scheduler(optimizer, "cosine", 4)
    rates = []
    for epoch in range(4):
        scheduler.step(epoch)
        rates.append(current_lr(optimizer))
    expected = [0.05 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert rates == pytest.approx(expected, rel=1e-6) and rates[0] == pytest.approx(0.1)


class Recorder(Callback):
    """Records the hooks as they run; stops phase 1 after its second epoch."""

    def __init__(self):
        self.calls = []

    def on_start(self, trainer):
        self.calls.append("start")

    def on_train_epoch_end(self, trainer, epoch, train_loss, lr):
        self.calls.append(f"train {epoch}")

    def on_validation_end(self, trainer, row, logits):
        self.calls.append(f"validate {row['epoch']}")

    def on_epoch_end(self, trainer, row, optimizer, scheduler):
        self.calls.append(f"end {row['epoch']}")
        if row["phase"] == 1 and row["epoch"] == 2:
            trainer.stopped["1"] = {"epoch": 2, "reason": "told to"}

    def on_fit_end(self, trainer):
        self.calls.append("fit end")


@pytest.mark.slow
def test_callbacks_run_in_order_and_can_stop_a_phase(lfw_data, monkeypatch):
    from transferkit.models.backbones import create_backbone
    from transferkit.training import recipe
    from transferkit.training.trainer import Trainer
    from transferkit.utils.progress import Reporter

    import numpy as np

    train, val = lfw_data.subset(np.arange(0, 48, 2)), lfw_data.subset(np.arange(1, 48, 2))
    recorder = Recorder()
    made = {}
    real = Trainer.__init__

    def with_recorder(self, *args, **kwargs):
        kwargs["callbacks"] = [KeepBest(), EarlyStopping(None, "val_loss"), recorder]
        real(self, *args, **kwargs)
        made["trainer"] = self

    monkeypatch.setattr(Trainer, "__init__", with_recorder)
    config = transferkit.TrainConfig(image_size=SIZE, epochs=4, fine_tune_epochs=1, batch_size=16, views=0)
    backbone = create_backbone(config.backbone, None, SIZE)
    model = recipe.build_model(backbone, 2, config, torch.device("cpu"))
    trainer = recipe.fit(model, train, val, config, 78, Reporter(live=False, quiet=True), torch.device("cpu"))
    assert recorder.calls == ["start", "train 1", "validate 1", "end 1", "train 2", "validate 2", "end 2",
                              "train 3", "validate 3", "end 3", "fit end"]  # phase 1 stopped after 2 of 4 epochs
    assert [r["phase"] for r in trainer.history] == [1, 1, 2]
    assert trainer.best in trainer.history and not model.training  # KeepBest's last word


@pytest.mark.slow
def test_a_cosine_schedule_is_a_setting_and_the_history_records_each_epochs_rate(lfw_split, tmp_path):
    out = tmp_path / "cosine"
    transferkit.train(lfw_split[0], out, image_size=SIZE, epochs=3, fine_tune_epochs=2, batch_size=16,
                      scheduler="cosine", optimizer="adamw", weight_decay=0.01)
    with open(out / "history.csv", newline="") as fh:
        rates = [float(r["lr"]) for r in csv.DictReader(fh)]
    phase1 = [0.5e-3 * (1 + math.cos(math.pi * t / 3)) for t in range(3)]
    phase2 = [0.5e-4 * (1 + math.cos(math.pi * t / 2)) for t in range(2)]
    assert rates == pytest.approx(phase1 + phase2, rel=1e-6)
