"""What the preset and the data decide for the settings left unset (None).

First the preset's values (`config.PRESETS`); then one rule that depends on the data, measured on
the benchmark suite (docs/benchmarks.md, "Benchmark suite"): when the smallest class has fewer
than `SMALL_CLASS` training images, phase 2 runs `SMALL_FINE_TUNE_EPOCHS` epochs (the seed's)
instead of the preset's: on a few dozen images per class the longer phase 2 gains nothing and
overfits. A setting given explicitly always wins. Every decision is returned as a sentence for
the log and the report.
"""

from __future__ import annotations

from ..cfg.settings import PRESETS, TrainConfig
from ..data.listing import LabelledImages
from ..models.backbones import Backbone, resolve_fine_tune_at

SMALL_CLASS = 100  # training images in the smallest class (multi-label: the rarest label's positives)
SMALL_FINE_TUNE_EPOCHS = 5  # the seed's phase 2


def smallest_class(train: LabelledImages, val_split: float | None) -> int:
    """Training images of the smallest class: all of them with a separate validation set, else the
    part the stratified split leaves for training."""
    smallest = min(train.counts().values())
    return smallest if val_split is None else int(smallest * (1 - val_split))


def preset_values(config: TrainConfig) -> tuple[dict, dict]:
    """The settings with the preset's values where they were left unset, and those values."""
    preset = PRESETS[config.preset]
    values = config.to_dict()
    decided = {name: preset[name] for name in ("epochs", "fine_tune_epochs", "views") if values[name] is None}
    return {**values, **decided}, decided


def filled(config: TrainConfig) -> TrainConfig:
    """The preset's values where the settings were left unset (no data rule); `config` itself when
    nothing is unset."""
    values, decided = preset_values(config)
    return TrainConfig.from_dict(values) if decided else config


def resolve(config: TrainConfig, backbone: Backbone, smallest: int) -> tuple[TrainConfig, int, list[str]]:
    """The settings with every unset one decided, the index of the first layer phase 2 trains (the
    backbone's default unless given), and what was decided (one sentence each)."""
    values, decided = preset_values(config)
    notes = [f"Preset {config.preset}: " + ", ".join(f"{k} {v}" for k, v in decided.items())] if decided else []
    if smallest < SMALL_CLASS and "fine_tune_epochs" in decided and values["fine_tune_epochs"] > SMALL_FINE_TUNE_EPOCHS:
        values["fine_tune_epochs"] = SMALL_FINE_TUNE_EPOCHS
        notes.append(f"Small data ({smallest} training images in the smallest class, under {SMALL_CLASS}): "
                     f"{SMALL_FINE_TUNE_EPOCHS} phase-2 epochs instead of {decided['fine_tune_epochs']}")
    fine_tune_at = resolve_fine_tune_at(backbone.layers, config.fine_tune_at if config.fine_tune_at is not None
                                        else backbone.default_fine_tune_at)
    return TrainConfig.from_dict(values), fine_tune_at, notes
