"""Every setting of a training run, declared once.

Each field of `TrainConfig` carries its help, group, type, choices and bounds (a `Rule`). The
command line's `train` options, the report's settings table and the README's options table are
generated from these declarations, and every bad value, whether it comes from Python, the command
line or a `--config` file, gets the same message: the setting, what it must be, what it got.
This module imports neither torch nor timm.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..utils.errors import ConfigError

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
MONITORS = ("val_loss", "val_accuracy", "val_map")
TASKS = ("auto", "multiclass", "multilabel", "anomaly")
THRESHOLD_METRICS = ("balanced_accuracy", "f1", "youden")
BALANCE_MODES = ("balanced", "none")
CACHE_DTYPES = ("float16", "float32")
LOGGERS = ("none", "tensorboard", "mlflow")
WINDOWS = ("data", "dicom")  # the intensity window of high-bit-depth images (data/window.py)
PAGE_RULES = ("first", "refuse")  # multi-page TIFF and multi-frame DICOM
ANOMALY_THRESHOLDS = ("keep", "f1")
ANOMALY_METHODS = ("patches", "gaussian")
OPTIMIZERS = ("adam", "adamw", "sgd")  # timm's names (training/optim.py)
SCHEDULERS = ("none", "cosine")
GROUPS = ("data", "preset", "backbone", "recipe", "augmentation", "decisions", "cache", "runtime")
# What each preset sets when a setting is left unset (None); the data rules of presets.py come after.
PRESETS = {
    "fast": {"epochs": 20, "fine_tune_epochs": 0, "views": 0},  # the head alone, on the clean views' features
    "default": {"epochs": 10, "fine_tune_epochs": 8, "views": 2},
    "best": {"epochs": 10, "fine_tune_epochs": 8, "views": 2},  # the default first, then the candidates that fit
}
BEST_BUDGET_MINUTES = 10.0


@dataclass(frozen=True)
class Rule:
    """What one setting is: help text, group, type (bool, int, float, str or "layer": an index or
    a name), choices, bounds (inclusive unless open), and whether None is allowed."""

    help: str
    group: str
    kind: object
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    flag: str = ""  # the command line's declaration, when not --name / --name/--no-name
    unset: str = "none"  # how the tables show None (auto: decided by the preset and the data)

    def describe(self) -> str:
        """What a value must be, as the error message says it."""
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        elif self.kind == "layer":
            what = "a layer index (an integer >= 0) or a layer name"
        else:
            what = {bool: "true or false", int: "an integer", float: "a finite number",
                    str: "a string"}[self.kind]
            low, high = (None if v is None else f"{int(v)}" if self.kind is int else f"{v:g}" for v in (self.low, self.high))
            if low is not None and high is not None:
                what += f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
            elif low is not None:
                what += f" {'>' if self.low_open else '>='} {low}"
        unset = "decided by the preset and the data" if self.unset == "auto" else "the default behaviour"
        return what + (f" (or null: {unset})" if self.optional else "")

    def check(self, name: str, value):
        """The value, converted where it is unambiguous (a numeric string, an int for a float);
        ConfigError otherwise."""
        if value is None and self.optional:
            return None
        bad = ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        kind = self.kind
        if kind == "layer":
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "" \
                    or (isinstance(value, int) and value < 0):
                raise bad
            return value
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise bad
            return value
        if kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad
        return value


def setting(default, help: str, group: str, kind, **rule):
    return field(default=default, metadata={"rule": Rule(help, group, kind, **rule)})


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the seed's recipe on the default backbone, with the
    changes that measurements on real data supported (see docs/benchmarks.md)."""

    task: str = setting("auto", "multilabel: any number of labels per image (CSV `path,labels`, or a path on several "
                        "rows); auto: multilabel for a `labels` column, else one label per image; anomaly: a detector trained on "
                        "good images alone (docs/anomaly.md).", "data", str,
                        choices=TASKS)
    label_sep: str = setting("|", "Separator of the class names in a CSV's `labels` column.", "data", str)
    window: str = setting(
        "data", "High-bit-depth images (16-bit PNG/TIFF, 32-bit integer or float TIFF, DICOM): data = one intensity "
        "window for the data set, the training images' window_low..window_high percentiles, mapped to 0..255; dicom = "
        "each DICOM file's own window centre/width (the data set's window for the other files). 8-bit images are "
        "never windowed.", "data", str, choices=WINDOWS)
    window_low: float = setting(0.5, "Percentile of the training images' intensities mapped to 0 (window data).",
                                "data", float, low=0, high=50, high_open=True)
    window_high: float = setting(99.5, "Percentile of the training images' intensities mapped to 255 (window data).",
                                 "data", float, low=50, high=100, low_open=True)
    pages: str = setting("first", "Multi-page TIFF and multi-frame DICOM: first = the first page (frame) of each such "
                         "file, counted in a note; refuse = such files are skipped with their page count.", "data", str,
                         choices=PAGE_RULES)
    normal_class: str | None = setting(
        None, "--task anomaly with class folders (or a CSV of path,label): the class whose images are normal; only "
        "they train the model, the other classes are left out and counted in the log.", "data", str, optional=True)
    anomaly_keep: float = setting(0.99, "--task anomaly: the fraction of good images that must pass; the threshold is "
                                  "fitted on held-out good images (val_split of them, or --val-dir).", "decisions", float,
                                  low=0, high=1, low_open=True, high_open=True)
    anomaly_method: str = setting(
        "patches", "--task anomaly: patches = each patch against a memory bank of the good images' patches, "
        "wherever they are (PatchCore; for parts at any place or angle); gaussian = each patch against the good "
        "images' Gaussian at the same place (PaDiM; for images framed the same way: a fixture, a cell, a scan).",
        "recipe", str, choices=ANOMALY_METHODS)
    anomaly_threshold: str = setting(
        "keep", "--task anomaly: keep = the threshold lets --anomaly-keep of the held-out good images pass; f1 = the "
        "threshold with the best F1 on the held-out good images and the labelled anomalies (the images of the classes "
        "other than --normal-class, which never enter the bank).", "decisions", str, choices=ANOMALY_THRESHOLDS)
    anomaly_bank_mib: float | None = setting(
        None, "--task anomaly: memory cap in MiB of what the run keeps of the good images (float32): patches, the "
        "bank (default 8; past it a greedy coreset keeps as many patches as fit); gaussian, the cells' Gaussians "
        "(default 128; their size does not grow with the images; past it as many channels as fit).", "cache", float,
        low=0, low_open=True, optional=True)
    group_by: str | None = setting(
        None, "A regular expression on each image's path whose first group names its group (a patient, a part, a "
        "video): the validation split keeps each group on one side. A CSV's `group` column does the same.", "data",
        str, optional=True)
    group_duplicates: bool = setting(True, "Keep near-duplicate images (perceptual hashes within 6 bits of 64 and "
                                     "aligned thumbnails correlating 0.95 or more) on one side of the validation "
                                     "split.", "data", bool)
    preset: str = setting("default", "fast: the head alone on cached features (seconds to a minute); default: both "
                          "phases; best: the default, then deeper fine-tuning and bigger backbones while --time-budget "
                          "lasts, keeping the best on validation. Settings you give win over the preset's.", "preset", str,
                          choices=tuple(PRESETS))
    time_budget: float | None = setting(
        None, f"Minutes of wall time for --preset best (default {BEST_BUDGET_MINUTES:g}): a candidate starts only if "
        "its estimated time fits in what is left.", "preset", float, low=0, low_open=True, optional=True)
    backbone: str = setting(DEFAULT_BACKBONE, "Any timm model name (offline weights: `transferkit backbones`).",
                            "backbone", str)
    weights: str | None = setting(None, "Weights file (.safetensors, .pth, Keras .h5, an import-keras folder) or "
                                  "'random'; default: the registered package, else timm's download.",
                                  "backbone", str, optional=True)
    image_size: int | None = setting(None, "Input size in pixels; default: the weights' own.", "backbone", int,
                                     low=16, high=2048, optional=True)
    epochs: int | None = setting(None, "Phase 1 epochs: the new head only, on the frozen backbone; default: the "
                                 "preset's (fast 20, default 10).", "recipe", int, low=0, optional=True, unset="auto")
    fine_tune_epochs: int | None = setting(
        None, "Phase 2 epochs: layers from fine_tune_at on, at lr x fine_tune_lr_factor; default: the preset's (fast 0, "
        "default 8; 5 when the smallest class has under 100 training images).", "recipe", int, low=0, optional=True, unset="auto")
    fine_tune_at: int | str | None = setting(
        None, "First unfrozen layer in phase 2: index or name (`transferkit layers`); default: the backbone's (the "
        "last quarter of its layers, the seed's rule: layer 78 of EfficientNet-Lite0's 98).",
        "recipe", "layer", optional=True, unset="auto")
    lr: float = setting(1e-3, "Base learning rate of phase 1.", "recipe", float, low=0, low_open=True)
    optimizer: str = setting("adam", "The optimizer of each phase (a fresh one per phase; the seed: Adam).", "recipe", str,
                             choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, "Weight decay (not on biases and norms).", "recipe", float, low=0)
    scheduler: str = setting("none", "Learning rate over each phase: none (constant, the seed's) or cosine (decays "
                             "to 0 over the phase's epochs).", "recipe", str, choices=SCHEDULERS)
    fine_tune_lr_factor: float = setting(0.1, "Phase 2's learning rate as a multiple of lr (the seed: 0.1).",
                                         "recipe", float, low=0, low_open=True)
    batch_size: int = setting(32, "Images per training step.", "recipe", int, low=1)
    val_split: float = setting(0.2, "Validation fraction, stratified, when there is no separate validation set "
                               "(refused if it leaves a class without a training or a validation image).",
                               "recipe", float, low=0, high=1, low_open=True, high_open=True)
    seed: int = setting(42, "Seed of the split, the initialisation, the order and the augmentation.", "recipe", int,
                        low=0, high=2**32 - 1)  # what numpy's and torch's seeding accept
    dropout: float = setting(0.2, "Dropout before the new layer.", "recipe", float, low=0, high=1, high_open=True)
    monitor: str = setting("val_loss", "Which validation number picks the kept epoch (val_map: mean average "
                           "precision over the classes).", "recipe", str,
                           choices=MONITORS)
    patience: int | None = setting(
        None, "Early stopping: a phase ends after this many epochs without a better monitored number "
        "(phase 1 then moves on to phase 2); default: off.", "recipe", int, low=1, optional=True)
    flip: bool = setting(True, "Random horizontal flip in training.", "augmentation", bool)
    rotation: float = setting(0.05, "Random rotation, a fraction of a full turn (0: off; the seed: 0.2).",
                              "augmentation", float, low=0, high=0.5)
    train_bn: bool = setting(False, "Let unfrozen BatchNorm layers update their statistics in phase 2.",
                             "recipe", bool)
    class_weight: str = setting("balanced", "Loss weight per class: balanced = n / (C * n_c) (multilabel: pos_weight = "
                                "negatives / positives per label); none: plain mean.",
                                "decisions", str, choices=BALANCE_MODES)
    sampler: str = setting("none", "balanced: every class drawn equally often in an epoch (single-label data).", "decisions", str,
                           choices=BALANCE_MODES)
    threshold_metric: str = setting(
        "none", "Two classes (multilabel: each label): choose the threshold on validation to maximise this; "
        "none: use threshold.",
        "decisions", str, choices=("none", *THRESHOLD_METRICS))
    threshold: float = setting(0.5, "Two classes: the fixed threshold on p(second class); multilabel: on each label's p.", "decisions", float,
                               low=0, high=1)
    ood_keep: float = setting(
        0.95, "The OOD threshold: the fraction of validation images (in-distribution) whose ood_score passes it; "
        "an image above it is `unknown` (its label stays the best class; predict --reject prints unknown). "
        "Changeable at predict time.", "decisions", float, low=0, high=1, low_open=True, high_open=True)
    cache: bool = setting(True, "Train from cached frozen-layer outputs (--no-cache: the seed's plain loop).",
                          "cache", bool)
    views: int | None = setting(None, "Augmented views cached per training image, besides the clean one; default: "
                                "the preset's (fast 0, default 2).", "cache", int, low=0, optional=True, unset="auto")
    cache_dtype: str = setting("float16", "Storage type of cached boundary activations.", "cache", str,
                               choices=CACHE_DTYPES)
    cache_memory_gb: float | None = setting(
        None, "RAM for decoded images and the cache before they spill to disk; default: a quarter of free RAM.",
        "cache", float, low=0, low_open=True, optional=True)
    cache_dir: str | None = setting(None, "Views kept for later runs; default: ~/.cache/transferkit; '': off.",
                                    "cache", str, optional=True)
    cache_cap_gb: float = setting(20.0, "Size cap of cache_dir; the oldest files go first.", "cache", float,
                                  low=0, low_open=True)
    keep_cache: bool = setting(False, "Keep the arrays spilled to RUN/cache/ after training.", "cache", bool)
    bf16: bool | None = setting(None, "bfloat16 while extracting cached views; default: where the hardware "
                                "supports it.", "runtime", bool, optional=True)
    device: str = setting("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N.", "runtime", str)
    threads: int | None = setting(
        None, "CPU threads; default: the cores free when each phase starts (fewer on a busy machine).",
        "runtime", int, low=1, optional=True)
    log_to: str = setting("none", "Also log epochs, settings and metrics to TensorBoard (RUN/tensorboard) or "
                          "MLflow (MLFLOW_TRACKING_URI, else MLflow's default ./mlflow.db).", "runtime", str, choices=LOGGERS)

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, rule_of(f.name).check(f.name, getattr(self, f.name)))
        epochs, fine_tune_epochs = (PRESETS[self.preset][k] if getattr(self, k) is None else getattr(self, k)
                                    for k in ("epochs", "fine_tune_epochs"))
        if epochs + fine_tune_epochs == 0:
            raise ConfigError(f"epochs + fine_tune_epochs must be at least 1, got {epochs} + {fine_tune_epochs}")
        if self.time_budget is not None and self.preset != "best":
            raise ConfigError(f"time_budget is the budget of --preset best, not of {self.preset}; add --preset best "
                              "or leave --time-budget out")
        if not self.label_sep or self.label_sep.strip() != self.label_sep or set(self.label_sep) & set(',"\n'):
            raise ConfigError(f"label_sep must be one or more characters, no comma, quote, newline or edge spaces, "
                              f"got {self.label_sep!r}")
        if self.normal_class is not None and self.task != "anomaly":
            raise ConfigError(f"normal_class is for --task anomaly, not {self.task}; add --task anomaly or leave "
                              "--normal-class out")
        if self.group_by is not None:
            import re

            try:
                pattern = re.compile(self.group_by)
            except re.error as exc:
                raise ConfigError(f"group_by must be a regular expression ({exc}), got {self.group_by!r}") from None
            if pattern.groups < 1:
                raise ConfigError(f"group_by must be a regular expression with a group in parentheses that names "
                                  f"the group (e.g. 'patient(\\d+)/'), got {self.group_by!r}")
        if not valid_device(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def changed(self) -> dict:
        """The settings that differ from the defaults."""
        return {k: v for k, v in self.to_dict().items() if v != default_of(k)}

    @classmethod
    def from_dict(cls, values: dict, origin: str | None = None) -> "TrainConfig":
        """Settings by name; an unknown name is an error that suggests the nearest known one.
        `origin` (a file) prefixes the messages."""
        where = f"{origin}: " if origin else ""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}expected a mapping of setting names to values, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in known]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            raise ConfigError(f"{where}unknown setting {unknown[0]!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"))
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Settings from a YAML or JSON file, or from a run's model.json (its recorded settings)."""
        return cls.from_dict(read_settings(path), str(path))


def read_settings(path: str | Path) -> dict:
    """The settings mapping in a YAML/JSON file or a run's model.json (its "config" entry)."""
    path = Path(path)
    if path.is_dir() and (path / "model.json").is_file():
        path = path / "model.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read settings ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - YAML and JSON parse errors alike
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                          f"({str(exc).splitlines()[0]})") from None
    if isinstance(values, dict) and "format_version" in values and "config" in values:
        values = values["config"]  # a run's model.json: the settings it was trained with
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of setting names to values")
    return values


def from_arguments(argv: list[str]) -> TrainConfig:
    """Settings from command-line style arguments, named as the CLI names them: `--name value`, and
    `--name` / `--no-name` for switches (the bench scripts take any setting this way)."""
    names = {option_name(f.name): f.name for f in fields(TrainConfig)}
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--no-") and names.get("--" + arg[5:]) and rule_of(names["--" + arg[5:]]).kind is bool:
            values[names["--" + arg[5:]]], i = False, i + 1
        elif arg in names and rule_of(names[arg]).kind is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            values[names[arg]], i = True, i + 1
        elif arg in names and i + 1 < len(argv):
            values[names[arg]], i = argv[i + 1], i + 2
        else:
            close = difflib.get_close_matches(arg, list(names), n=1)
            raise ConfigError(f"unknown or incomplete option {arg!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    return TrainConfig.from_dict(values)


def valid_device(device: str) -> bool:
    kind, _, index = device.partition(":")
    return (device in ("auto", "cpu", "cuda", "mps")) or (kind == "cuda" and index.isdigit())


def rule_of(name: str) -> Rule:
    return _FIELDS[name].metadata["rule"]


def default_of(name: str):
    return _FIELDS[name].default


def settings() -> list[tuple[str, Rule, object]]:
    """(name, rule, default) of every setting, in declaration order."""
    return [(f.name, f.metadata["rule"], f.default) for f in fields(TrainConfig)]


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag(name: str) -> str:
    """The command line's declaration of a setting: --name, or --name/--no-name for a switch."""
    option = option_name(name)
    return f"{option}/--no-{option[2:]}" if rule_of(name).kind is bool else option


def grouped() -> list[tuple[str, list[tuple[str, Rule, object]]]]:
    """The settings by group, in the groups' order: what the tables show."""
    return [(group, [s for s in settings() if s[1].group == group]) for group in GROUPS]


def shown(value) -> str:
    """A value as the tables show it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (str, int)) else f"{value:g}"


def markdown_table() -> str:
    """The README's options table, by group."""
    lines = ["| | option | default | what it does |", "|---|---|---|---|"]
    for group, members in grouped():
        for i, (name, rule, default) in enumerate(members):
            choices = f" ({' / '.join(rule.choices)})" if rule.choices else ""
            lines.append(f"| {'**' + group + '**' if i == 0 else ''} | `{flag(name)}` | `{shown(default) if default is not None else rule.unset}` | "
                         f"{rule.help}{choices} |")
    return "\n".join(lines)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
