"""The optimizer and the learning-rate schedule of a phase, built from the settings through timm's
factories (`create_optimizer_v2`, `create_scheduler_v2`), so that a schedule or another optimizer
is a setting, not a change to the loop.

The defaults are the seed's: Adam at a constant rate in each phase, in a fresh optimizer per phase.
With `weight_decay` > 0, timm groups the trainable parameters so that biases and norm layers (the
1-d tensors) are not decayed; with 0, the optimizer gets the trainable parameters as they are.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def create_optimizer(model: torch.nn.Module, params: list[torch.Tensor], name: str, lr: float,
                     weight_decay: float) -> torch.optim.Optimizer:
    """`name` (adam, adamw, sgd) over the trainable `params` of `model` at `lr`."""
    if weight_decay > 0:  # timm's parameter groups: decay on the weights, none on biases and norms
        return create_optimizer_v2(model, name, lr=lr, weight_decay=weight_decay)
    return create_optimizer_v2(params, name, lr=lr, weight_decay=0.0)


def create_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int):
    """The phase's per-epoch schedule over `epochs`, or None for a constant rate: cosine decays from
    the phase's rate towards 0 over the phase's epochs (timm's CosineLRScheduler, stepped per epoch)."""
    if name == "none" or epochs <= 0:
        return None
    scheduler, _ = create_scheduler_v2(optimizer, name, num_epochs=epochs, min_lr=0.0, warmup_epochs=0)
    return scheduler


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
