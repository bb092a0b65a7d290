"""Presets, the data rule for small sets, and `--preset best`'s budgeted search."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import SIZE

import transferkit
from transferkit.cfg.settings import PRESETS, TrainConfig, markdown_table
from transferkit.training import recipe, search
from transferkit.training.presets import SMALL_CLASS, SMALL_FINE_TUNE_EPOCHS, resolve, smallest_class
from transferkit.training.search import Candidate
from transferkit.utils.errors import ConfigError, Interrupted

LAYERS = [(f"blocks.{b}.{i}", None) for b in range(8) for i in range(4)]  # 32 layers in 8 blocks
BACKBONE = SimpleNamespace(layers=LAYERS, default_fine_tune_at="blocks.2.0")  # index 8


def test_unset_settings_take_the_presets_values_and_given_ones_win():
    config, at, notes = resolve(TrainConfig(), BACKBONE, smallest=SMALL_CLASS)
    assert (config.epochs, config.fine_tune_epochs, config.views, at) == (10, 8, 2, 8)
    assert notes == ["Preset default: epochs 10, fine_tune_epochs 8, views 2"]
    config, at, _ = resolve(TrainConfig(preset="fast"), BACKBONE, smallest=5)
    assert (config.epochs, config.fine_tune_epochs, config.views) == tuple(PRESETS["fast"][k] for k in
                                                                           ("epochs", "fine_tune_epochs", "views"))
    config, at, notes = resolve(TrainConfig(preset="fast", epochs=3, views=1), BACKBONE, smallest=SMALL_CLASS)
    assert (config.epochs, config.fine_tune_epochs, config.views) == (3, 0, 1)
    assert notes == ["Preset fast: fine_tune_epochs 0"]


def test_small_data_fine_tunes_for_fewer_epochs_unless_told_otherwise():
    config, at, notes = resolve(TrainConfig(), BACKBONE, smallest=SMALL_CLASS - 1)
    assert config.fine_tune_epochs == SMALL_FINE_TUNE_EPOCHS < PRESETS["default"]["fine_tune_epochs"]
    assert at == 8  # the backbone's own depth
    assert notes[1] == (f"Small data (99 training images in the smallest class, under {SMALL_CLASS}): "
                        f"{SMALL_FINE_TUNE_EPOCHS} phase-2 epochs instead of 8")
    config, at, notes = resolve(TrainConfig(fine_tune_at=4, fine_tune_epochs=8), BACKBONE, smallest=10)
    assert (at, config.fine_tune_epochs) == (4, 8) and not any("Small" in n for n in notes)
    config, _, notes = resolve(TrainConfig(preset="fast"), BACKBONE, smallest=10)
    assert config.fine_tune_epochs == 0 and len(notes) == 1  # no phase 2 to shorten


def test_the_smallest_class_counts_the_training_part_only():
    data = SimpleNamespace(counts=lambda: {"a": 50, "b": 200})
    assert smallest_class(data, 0.2) == 40 and smallest_class(data, None) == 50


def test_a_time_budget_belongs_to_best_and_unset_shows_auto():
    with pytest.raises(ConfigError, match="time_budget is the budget of --preset best, not of default"):
        TrainConfig(time_budget=5)
    with pytest.raises(ConfigError, match="preset must be one of fast, default, best, got 'quick'"):
        TrainConfig(preset="quick")
    with pytest.raises(ConfigError, match="epochs \\+ fine_tune_epochs must be at least 1, got 0 \\+ 0"):
        TrainConfig(preset="fast", epochs=0)
    assert TrainConfig(preset="best", time_budget=2).time_budget == 2.0
    assert "| `--epochs` | `auto` |" in markdown_table()


def test_fast_trains_the_head_alone_and_says_what_it_decided(lfw_split, tmp_path):
    out = tmp_path / "fast"
    classifier = transferkit.train(lfw_split[0], out, preset="fast", image_size=SIZE, batch_size=16)
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["fine_tune_epochs"] == 0 and meta["config"]["epochs"] == PRESETS["fast"]["epochs"]
    assert set(meta["auto_settings"]) == {"epochs", "fine_tune_epochs", "views", "fine_tune_at"} - {"fine_tune_at"}
    assert meta["decisions"][0].startswith("Preset fast:")
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + PRESETS["fast"]["epochs"] and all(",1," in line for line in history[1:])
    assert classifier.evaluate(lfw_split[1])["accuracy"] > 0.75
    report = (out / "report.html").read_text()
    assert "(auto)" in report and "Preset fast:" in report


def cheap(monkeypatch, *candidates):
    monkeypatch.setattr(search, "CANDIDATES", candidates)


def test_best_keeps_the_candidate_best_on_validation_and_records_the_search(lfw_split, tmp_path, monkeypatch):
    cheap(monkeypatch, Candidate("default", {}, 1.0), Candidate("more dropout", {"dropout": 0.5}, 1.0),
          Candidate("broken", {"weights": str(tmp_path / "missing.safetensors")}, 1.0),
          Candidate("too dear", {"dropout": 0.3}, 1e6))
    out = tmp_path / "best"
    classifier = transferkit.train(lfw_split[0], out, preset="best", time_budget=30, image_size=SIZE, epochs=2,
                                   fine_tune_epochs=1, batch_size=16)
    found = json.loads((out / "search.json").read_text())
    tried = [c for c in found["candidates"] if "seconds" in c]
    assert [c["name"] for c in tried] == ["default", "more dropout"]
    assert "estimated_seconds" not in tried[0] and tried[1]["estimated_seconds"] == round(tried[0]["seconds"], 1)
    assert "missing.safetensors" in found["candidates"][2]["failed"]  # a failed candidate is passed over
    assert found["candidates"][3]["skipped"].startswith("estimated ")  # a million times the default's time
    kept = [c for c in tried if c["kept"]]
    assert len(kept) == 1 and kept[0]["val_loss"] == min(c["val_loss"] for c in tried)
    meta = json.loads((out / "model.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["dropout"] == (0.5 if kept[0]["name"] == "more dropout"
                                                                           else 0.2)
    assert classifier.classes == ["background", "face"]
    assert not (tmp_path / ".best.best").exists()
    assert "<title>transferkit report: best</title>" in (out / "report.html").read_text()  # titled by the run's folder, not the candidate's


def test_best_interrupted_keeps_the_best_completed_candidate(lfw_split, tmp_path, monkeypatch):
    cheap(monkeypatch, Candidate("default", {}, 1.0), Candidate("second", {"dropout": 0.5}, 1.0))
    real, calls = recipe.train_run, []

    def stopped_second(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise Interrupted(2)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "train_run", stopped_second)
    out = tmp_path / "best"
    transferkit.train(lfw_split[0], out, preset="best", image_size=SIZE, epochs=2, fine_tune_epochs=0, batch_size=16)
    found = json.loads((out / "search.json").read_text())
    assert [c["name"] for c in found["candidates"]] == ["default"] and found["candidates"][0]["kept"]
    assert json.loads((out / "model.json").read_text())["config"]["dropout"] == 0.2


def test_best_refuses_resume_and_a_backbone_you_chose_is_not_swapped(lfw_split, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--resume does not apply to --preset best"):
        transferkit.train(lfw_split[0], tmp_path / "r", resume=True, preset="best")
    cheap(monkeypatch, Candidate("default", {}, 1.0), Candidate("Lite2", {"backbone": "tf_efficientnet_lite2"}, 1.0,
                                                                 default_backbone=True))
    out = tmp_path / "pinned"
    transferkit.train(lfw_split[0], out, preset="best", image_size=SIZE, epochs=1, fine_tune_epochs=0, batch_size=16)
    found = json.loads((out / "search.json").read_text())
    assert found["candidates"][1] == {"name": "Lite2", "skipped": "you set image_size", "kept": False}
