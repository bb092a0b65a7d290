"""Pretrained backbones: one factory (`create_backbone`) over a registry of offline weight sources.

Weights are resolved in this order: a file the user names; an installed weights package that
transferkit knows (see `WEIGHT_SOURCES`); timm's own download (online only). A backbone with no
weights fails at once, unless the caller asks for random initialisation explicitly. Keras
MobileNetV2 files (.h5, see `keras.py`) give a timm MobileNetV2 with Keras numerics and layers.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..cfg.settings import DEFAULT_BACKBONE
from ..utils.errors import BackboneError
from ..utils.files import sha256_of
from . import keras
from .adapters import adapter_for
from .sources import Resolved, WeightSource, available_backbones, resolve_weights



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


def check_name(name: str) -> None:
    """A timm model name, or an error listing similar ones (no network, no model built)."""
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise BackboneError(f"unknown backbone {name!r} (not a timm model).{hint}")


def timm_model(name: str, **kwargs) -> nn.Module:
    check_name(name)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:  # an option this architecture does not take (e.g. dynamic_img_size)
        raise BackboneError(f"{name}: cannot be built with {kwargs} ({exc})") from None


def size_kwargs(name: str, image_size: int | None) -> dict:
    """Models with a fixed input size (vision transformers) run at another size with timm's
    `dynamic_img_size` (position embeddings interpolated)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size is None or cfg is None or not cfg.fixed_input_size or cfg.input_size[-1] == image_size:
        return {}
    return {"dynamic_img_size": True}


def online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights hub answers within `timeout` seconds (DNS included): an offline machine
    fails fast instead of retrying for a minute. HF_HUB_OFFLINE=1 says offline without asking."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    answered = threading.Event()

    def probe():
        try:
            socket.create_connection((host, 443), timeout).close()
            answered.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(timeout)


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    image_size: int | None = None,
    timm_kwargs: dict | None = None,
) -> Backbone:
    """Create `name` (any timm model) without its classifier and load pretrained weights.

    `weights`: None resolves automatically (known package, then timm download); a path loads that
    file; "random" keeps random initialisation (explicit opt-in). Where they come from is
    `sources.resolve_weights`; how they load, `load_weights`.
    """
    check_name(name)
    kwargs = {**size_kwargs(name, image_size), **(timm_kwargs or {})}
    found = resolve_weights(name, weights)
    model, origin, digest, kwargs, preprocess = load_weights(name, found, kwargs, image_size)
    source = found.source
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    names = [n for n, _ in layers]
    return Backbone(
        name=name,
        model=model,
        preprocess=preprocess or Preprocess.from_timm(model, image_size),
        weights=origin,
        weights_sha256=digest,
        default_fine_tune_at=source.fine_tune_at if source and source.fine_tune_at in names
        else adapter.default_fine_tune_at(layers),
        layers=layers,
        timm_kwargs=kwargs,
    )


def load_weights(name: str, found: Resolved, kwargs: dict, image_size: int | None
                 ) -> tuple[nn.Module, str, str | None, dict, Preprocess | None]:
    """Build `name` without its classifier with the weights `found` says: (the model, where its
    weights came from, their sha256, the timm kwargs that rebuild it, the preprocessing the
    weights bring, if any). A registered file whose checksum does not match is refused."""
    source, path = found.source, found.path
    digest = sha256_of(path) if path is not None and found.kind != "file" else None
    if found.registered and digest != source.sha256:
        raise BackboneError(f"{path}: sha256 {digest} does not match the registered {source.sha256}; "
                            f"the file is corrupted: reinstall it ({source.install})")
    if found.kind == "random":
        if source is not None and source.mapping == "keras":  # the architecture of its weights
            kwargs = {**keras.TIMM_KWARGS, **kwargs}
        return timm_model(name, num_classes=0, **kwargs), "random initialisation (no pretrained weights)", None, \
            kwargs, None
    if found.kind == "keras":
        model, keras_file = keras.load(path, name, kwargs)
        origin = source.description if found.registered else \
            f"Keras file {path} ({keras_file.model_name or 'bare MobileNetV2'})"
        return model, origin, digest, {**keras.TIMM_KWARGS, **kwargs}, _keras_preprocess(keras_file, image_size)
    if found.kind == "file":
        config = imported_config(path, name)
        kwargs = {**config.get("timm_kwargs", {}), **kwargs}
        model = timm_model(name, num_classes=0, **kwargs)
        state = read_state_dict(path)
        mapping = "keys" if set(model.state_dict()) <= set(state) else "ordered"
        model.load_state_dict(map_state(model, state, mapping, str(path)))
        preprocess = None
        if "preprocess" in config:
            saved = config["preprocess"]
            preprocess = Preprocess(image_size or int(saved["image_size"]), tuple(saved["mean"]), tuple(saved["std"]))
        return model, f"file {path}", sha256_of(path), kwargs, preprocess
    if found.kind == "package":
        model = timm_model(name, num_classes=0, **kwargs)
        model.load_state_dict(map_state(model, read_state_dict(path), source.mapping, str(path)))
        return model, source.description, digest, kwargs, None
    model = _timm_download(name, source, kwargs)
    return model, f"timm download ({model.pretrained_cfg.get('hf_hub_id') or name})", None, kwargs, None


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
    have = ", ".join(f"{r['backbone']} ({r['status']})" for r in available_backbones())
    fix = (f"Fix:{f' {source.install}, or' if source else ''} pass --weights FILE, or --weights random to "
           f"train from scratch. Available offline: {have or 'none'}")
    if not online():
        raise BackboneError(f"no pretrained weights for {name!r}: none installed offline, and the weights hub "
                            f"cannot be reached (offline). {fix}")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, hub and missing-weights errors alike
        raise BackboneError(f"no pretrained weights for {name!r}: none installed offline, and timm's download "
                            f"failed ({type(exc).__name__}). {fix}") from None


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
