"""Every setting declared once: validation messages, config files, the generated CLI options and the
README's options table."""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from transferkit.cfg.settings import TrainConfig, markdown_table, option_name, read_settings, settings
from transferkit.cli import app
from transferkit.utils.errors import ConfigError, TransferkitError

README = Path(__file__).resolve().parents[1] / "README.md"

# setting -> a value it must refuse
BAD = {
    "backbone": 3, "weights": 1.5, "image_size": 8, "epochs": -1, "fine_tune_epochs": 2.5,
    "fine_tune_at": -3, "lr": math.inf, "fine_tune_lr_factor": 0, "batch_size": 0, "val_split": 1.5,
    "seed": "x", "dropout": 1.0, "monitor": "val_f1", "flip": "maybe", "rotation": 0.7, "train_bn": 2,
    "class_weight": "heavy", "sampler": "sometimes", "threshold_metric": "recall", "threshold": 7,
    "cache": "yes", "views": -2, "cache_dtype": "int8", "cache_memory_gb": 0, "cache_dir": 5,
    "cache_cap_gb": -1, "keep_cache": None, "bf16": "on", "device": "banana", "patience": 0, "threads": 0,
    "log_to": "wandb", "task": "both", "label_sep": "a,b", "preset": "quick", "time_budget": 0,
    "window": "type", "window_low": 50, "window_high": 101, "pages": "all",
    "optimizer": "lbfgs", "weight_decay": -0.1, "scheduler": "step",
    "group_by": "patient", "group_duplicates": "maybe", "ood_keep": 1.0,
}

BAD.update(normal_class=5, anomaly_keep=1.0, anomaly_bank_mib=0, anomaly_method="padim",
           anomaly_threshold="best")  # --task anomaly (docs/anomaly.md)


def test_every_setting_has_a_rule_and_a_bad_value_here():
    assert set(BAD) == {f.name for f in fields(TrainConfig)}
    groups = {rule.group for _, rule, _ in settings()}
    assert groups <= {"data", "preset", "backbone", "recipe", "augmentation", "decisions", "cache", "runtime"}


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_value_names_the_setting_what_it_must_be_and_what_it_got(name):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**{name: BAD[name]})
    message = str(caught.value)
    assert isinstance(caught.value, TransferkitError) and isinstance(caught.value, ValueError)
    assert message.startswith(f"{name} must be "), message
    assert message.endswith(f"got {BAD[name]!r}"), message
    assert "\n" not in message


def test_values_are_converted_where_unambiguous():
    config = TrainConfig(epochs="3", lr="0.01", flip="false", fine_tune_at="12", image_size=64.0)
    assert (config.epochs, config.lr, config.flip, config.fine_tune_at, config.image_size) == (3, 0.01, False, 12, 64)
    assert TrainConfig(fine_tune_at="blocks.4.0.conv_pw").fine_tune_at == "blocks.4.0.conv_pw"
    with pytest.raises(ConfigError, match=r"epochs \+ fine_tune_epochs must be at least 1"):
        TrainConfig(epochs=0, fine_tune_epochs=0)


def test_unknown_settings_suggest_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'fine_tune_epoch' \(did you mean 'fine_tune_epochs'\?\)"):
        TrainConfig.from_dict({"fine_tune_epoch": 3})


def test_yaml_and_json_files_and_a_runs_model_json(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 4\nrotation: 0.2\nbackbone: mobilenetv2_100\n")
    (tmp_path / "b.json").write_text(json.dumps({"epochs": 4, "rotation": 0.2, "backbone": "mobilenetv2_100"}))
    a, b = TrainConfig.from_file(tmp_path / "a.yaml"), TrainConfig.from_file(tmp_path / "b.json")
    assert a == b and a.changed() == {"epochs": 4, "rotation": 0.2, "backbone": "mobilenetv2_100"}
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text(json.dumps({"format_version": 2, "config": a.to_dict(), "classes": ["x", "y"]}))
    assert TrainConfig.from_file(run / "model.json") == a == TrainConfig.from_file(run)
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        read_settings(tmp_path / "bad.yaml")
    (tmp_path / "wrong.json").write_text('{"views": -1}')
    with pytest.raises(ConfigError, match=r"wrong\.json: views must be an integer >= 0 \(or null: decided by the preset and the data\), got -1"):
        TrainConfig.from_file(tmp_path / "wrong.json")


def test_every_setting_is_a_train_option_with_its_help():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = re.sub(r"\s+", " ", result.output)
    for name, rule, _ in settings():
        assert option_name(name) in text, name
        assert rule.help.split(":")[0][:30] in text, name


def test_cli_values_are_checked_with_the_same_messages(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--val-split", "1.5"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: val_split must be a finite number in (0, 1), got '1.5'"
    (tmp_path / "s.yaml").write_text("dropout: 3\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--config",
                                      str(tmp_path / "s.yaml")])
    assert result.exit_code == 2 and "s.yaml: dropout must be a finite number in [0, 1), got 3" in result.output


def test_command_line_overrides_the_config_file(tmp_path, monkeypatch):
    import transferkit.training.recipe as recipe

    seen = {}
    monkeypatch.setattr(recipe, "train", lambda data, out, config, **kw: seen.setdefault("config", config))
    (tmp_path / "s.yaml").write_text("epochs: 4\nflip: false\nfine_tune_epochs: 1\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--config",
                                      str(tmp_path / "s.yaml"), "--epochs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert seen["config"].changed() == {"epochs": 2, "flip": False, "fine_tune_epochs": 1}


def test_readme_options_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- options:start -->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert block, "README lacks the options markers"
    assert block.group(1) == markdown_table(), "run: python tools/readme_options.py"


def test_bench_scripts_take_any_setting_as_the_cli_names_it():
    from transferkit.cfg.settings import from_arguments

    config = from_arguments(["--epochs", "3", "--no-flip", "--cache", "--fine-tune-at", "blocks.4.0.conv_pw"])
    assert config.changed() == {"epochs": 3, "flip": False, "fine_tune_at": "blocks.4.0.conv_pw"}
    with pytest.raises(ConfigError, match=r"unknown or incomplete option '--epoch' \(did you mean --epochs\?\)"):
        from_arguments(["--epoch", "3"])
    with pytest.raises(ConfigError, match="rotation must be a finite number in"):
        from_arguments(["--rotation", "2"])


@pytest.mark.slow  # two tiny training runs
def test_a_runs_model_json_reruns_it_to_the_same_model(tmp_path):
    from conftest import lfw_arrays, write_folders

    images, _ = lfw_arrays()
    data = write_folders(tmp_path / "data", {"face": list(images[:12]), "background": list(images[100:112])})
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "a"), "--image-size", "32", "--epochs",
                                "2", "--fine-tune-epochs", "1", "--rotation", "0.2", "--seed", "7", "--threads", "1",
                                "--cache-dir", "", "--quiet"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "b"), "--config",
                                str(tmp_path / "a" / "model.json"), "--quiet"])
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / run / "model.json").read_text()) for run in ("a", "b"))
    assert a["config"] == b["config"] and a["config"]["seed"] == 7 and a["config"]["rotation"] == 0.2
    assert a["model_sha256"] == b["model_sha256"]
