"""Keras MobileNetV2 weight files (.h5) as timm models with Keras numerics and Keras layer names.

Read with h5py, no TensorFlow. Two layouts: a bare keras-applications file (one group per layer at
the root, as `save_weights` writes it) and a whole saved model holding a nested `mobilenetv2_*`
model plus its own head (the head is reported, not imported). The timm model is built with TF
'same' padding and BatchNorm epsilon 1e-3 (`TIMM_KWARGS`), which reproduce Keras's features;
preprocessing is Keras's `x / 127.5 - 1`. `keras_layers` lists the 154 layers Keras lists, so
`fine_tune_at` counts as the seed does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils.errors import BackboneError
from ..utils.files import atomic_path, sha256_of, write_text
from .sources import IMPORTED

TIMM_KWARGS = {"pad_type": "same", "bn_eps": 1e-3}
MEAN = STD = (0.5, 0.5, 0.5)  # (x / 255 - 0.5) / 0.5 == x / 127.5 - 1
DEFAULT_FINE_TUNE_AT = "block_13_depthwise"  # the seed's fine_tune_at = 120
# block_16_project's output channels (320 x width, rounded to 8) -> timm model
WIDTHS = {112: "mobilenetv2_035", 160: "mobilenetv2_050", 240: "mobilenetv2_075",
          320: "mobilenetv2_100", 448: "mobilenetv2_140"}


class KerasError(BackboneError):
    """A Keras file that is not a usable MobileNetV2; the message names the file and the layer."""


class Weightless(nn.Module):
    """A Keras layer that owns no weights and has no module of its own in timm (the input, the zero
    padding before a stride-2 depthwise convolution, the residual addition): listed so that indices
    count as in Keras. Never called; the class name is Keras's."""


class InputLayer(Weightless):
    pass


class ZeroPadding2D(Weightless):
    pass


class Add(Weightless):
    pass


def keras_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Keras base model's layers, in Keras's order, each with the timm module doing its work
    (ReLU layers map to the activation inside timm's BatchNormAct2d)."""
    layers = [("input_layer", InputLayer()), ("Conv1", model.conv_stem), ("bn_Conv1", model.bn1),
              ("Conv1_relu", model.bn1.act)]
    blocks = [block for stage in model.blocks for block in stage]
    first = blocks[0]
    layers += [("expanded_conv_depthwise", first.conv_dw), ("expanded_conv_depthwise_BN", first.bn1),
               ("expanded_conv_depthwise_relu", first.bn1.act), ("expanded_conv_project", first.conv_pw),
               ("expanded_conv_project_BN", first.bn2)]
    for i, block in enumerate(blocks[1:], start=1):
        p = f"block_{i}_"
        layers += [(p + "expand", block.conv_pw), (p + "expand_BN", block.bn1), (p + "expand_relu", block.bn1.act)]
        if block.conv_dw.stride[0] == 2:
            layers.append((p + "pad", ZeroPadding2D()))
        layers += [(p + "depthwise", block.conv_dw), (p + "depthwise_BN", block.bn2),
                   (p + "depthwise_relu", block.bn2.act), (p + "project", block.conv_pwl),
                   (p + "project_BN", block.bn3)]
        if block.has_skip:
            layers.append((p + "add", Add()))
    return layers + [("Conv_1", model.conv_head), ("Conv_1_bn", model.bn2), ("out_relu", model.bn2.act)]


def is_keras_mobilenetv2(model: nn.Module) -> bool:
    """A timm MobileNetV2 built with Keras numerics (`TIMM_KWARGS`): its layers are Keras's."""
    from timm.layers import BatchNormAct2d

    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture", ""))
    return (arch in WIDTHS.values() and isinstance(getattr(model, "bn1", None), BatchNormAct2d)
            and model.bn1.eps == TIMM_KWARGS["bn_eps"]
            and type(model.conv_stem).__name__.startswith("Conv2dSame"))


@dataclass
class KerasFile:
    """The MobileNetV2 weights of one file: {layer: {weight: array}} plus what else it holds."""

    path: Path
    weights: dict[str, dict[str, np.ndarray]]
    model_name: str | None = None  # e.g. mobilenetv2_1.00_160, when the file stores its config
    image_size: int | None = None
    head: list[str] = field(default_factory=list)  # classifier layers found and not imported

    @property
    def backbone(self) -> str:
        kernel = self.weights.get("block_16_project", {}).get("kernel")
        if kernel is None:
            raise KerasError(f"{self.path}: no block_16_project kernel; not a complete MobileNetV2")
        channels = int(kernel.shape[-1])
        if channels not in WIDTHS:
            raise KerasError(f"{self.path}: block_16_project has {channels} output channels, a width "
                             f"multiplier timm has no MobileNetV2 for (supported: 0.35, 0.5, 0.75, 1.0, 1.4)")
        return WIDTHS[channels]


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _layer_weights(group, into: dict, path: Path) -> None:
    """Add the tensors a group lists in its `weight_names` (paths relative to the group)."""
    for name in _text(group.attrs.get("weight_names", [])):
        layer, weight = name.split("/")[0], name.split("/")[-1].split(":")[0]
        weight = "kernel" if weight == "depthwise_kernel" else weight  # Keras 2's depthwise name
        if weight in into.setdefault(layer, {}):
            raise KerasError(f"{path}: layer {layer} holds {weight} twice")
        into[layer][weight] = np.asarray(group[name][()])


def _is_head(weights: dict[str, np.ndarray]) -> bool:
    return set(weights) == {"kernel", "bias"} and weights["kernel"].ndim == 2


def read(path: str | Path) -> KerasFile:
    """Read the MobileNetV2 weights of a Keras .h5 file, bare or nested in a saved model."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise KerasError(f"{path}: file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise KerasError(f"{path}: not an HDF5 file ({exc})") from None
    with handle as f:
        root = f["model_weights"] if "model_weights" in f else f
        names = _text(root.attrs.get("layer_names", []))
        if not names and "layers" in f:
            raise KerasError(f"{path}: a Keras 3 .weights.h5 file, which stores no layer names; "
                             "save the model with model.save('model.h5') instead")
        nested = [n for n in names if n.startswith("mobilenetv2_")]
        weights: dict[str, dict[str, np.ndarray]] = {}
        others: dict[str, dict[str, np.ndarray]] = {}
        if nested:
            _layer_weights(root[nested[0]], weights, path)
            for name in names:
                if name != nested[0]:
                    _layer_weights(root[name], others, path)
        elif "Conv1" in names:
            for name in names:
                _layer_weights(root[name], weights, path)
        else:
            raise KerasError(f"{path}: no MobileNetV2 in it (neither a nested mobilenetv2_* model nor "
                             "a Conv1 layer)")
        model_name, image_size = nested[0] if nested else None, None
        config = f.attrs.get("model_config")
        if config is not None:
            image_size = _input_size(json.loads(config), model_name)
    if image_size is None:  # keras-applications names its files ..._<alpha>_<size>_no_top.h5
        match = re.search(r"_(\d{2,4})(?:_no_top)?\.h5$", path.name)
        image_size = int(match.group(1)) if match else None
    head = [layer for layer, tensors in {**weights, **others}.items() if _is_head(tensors)]
    weights = {k: v for k, v in weights.items() if k not in head}
    extra = [k for k, v in others.items() if v and k not in head]
    if extra:
        raise KerasError(f"{path}: layer {extra[0]} outside the MobileNetV2 holds weights that are "
                         "neither the base model's nor a dense head")
    return KerasFile(path, weights, model_name, image_size, head)


def _input_size(config: dict, model_name: str | None) -> int | None:
    """The base model's input height from a saved model's config, when it has one."""
    layers = config.get("config", {}).get("layers", [])
    if model_name:
        layers = next((layer["config"].get("layers", []) for layer in layers if layer.get("name") == model_name
                       or layer.get("config", {}).get("name") == model_name), layers)
    for layer in layers:
        if layer.get("class_name") == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if shape and shape[1]:
                return int(shape[1])
    return None


def state_dict(model: nn.Module, keras: KerasFile) -> dict[str, torch.Tensor]:
    """The timm model's state dict from the Keras tensors: conv HWIO -> OIHW, depthwise HWC1 ->
    C1HW, BatchNorm gamma/beta/moving mean/moving variance. Every timm tensor filled, every Keras
    tensor used once, shapes equal; otherwise a KerasError naming the first mismatching layer."""
    names = {id(m): n for n, m in model.named_modules()}
    target = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[tuple[str, str]] = set()

    def take(layer: str, weight: str) -> torch.Tensor:
        found = keras.weights.get(layer, {}).get(weight)
        if found is None:
            raise KerasError(f"{keras.path}: layer {layer}: no {weight} in the file")
        used.add((layer, weight))
        return torch.from_numpy(np.ascontiguousarray(found, dtype=np.float32))

    for layer, module in keras_layers(model):
        if isinstance(module, nn.Conv2d):
            kernel = take(layer, "kernel")
            if kernel.ndim != 4:
                raise KerasError(f"{keras.path}: layer {layer}: kernel has shape {tuple(kernel.shape)}, "
                                 "not a 2-D convolution's")
            pairs = {"weight": kernel.permute(2, 3, 0, 1) if module.groups > 1 else kernel.permute(3, 2, 0, 1)}
        elif isinstance(module, nn.BatchNorm2d):
            pairs = {"weight": take(layer, "gamma"), "bias": take(layer, "beta"),
                     "running_mean": take(layer, "moving_mean"), "running_var": take(layer, "moving_variance"),
                     "num_batches_tracked": torch.zeros((), dtype=torch.long)}
        else:
            continue
        for key, tensor in pairs.items():
            name = f"{names[id(module)]}.{key}"
            if tensor.shape != target[name].shape:
                raise KerasError(f"{keras.path}: layer {layer}: {key} has shape {tuple(tensor.shape)} "
                                 f"after conversion, {model.pretrained_cfg['architecture']} needs "
                                 f"{tuple(target[name].shape)}")
            state[name] = tensor.contiguous()
    missing = [k for k in target if k not in state]
    if missing:
        raise KerasError(f"{keras.path}: nothing fills {missing[0]}")
    unused = [f"{layer}/{w}" for layer, tensors in keras.weights.items() for w in tensors if (layer, w) not in used]
    if unused:
        raise KerasError(f"{keras.path}: layer {unused[0]} is not part of a Keras MobileNetV2 "
                         "(a tensor nothing uses); another architecture?")
    return state


def load(path: str | Path, backbone: str | None = None,
         timm_kwargs: dict | None = None) -> tuple[nn.Module, KerasFile]:
    """A timm MobileNetV2 (no classifier, Keras numerics, plus `timm_kwargs`) with the file's
    weights loaded; `backbone`, when given, must be the file's width."""
    import timm

    keras = read(path)
    name = keras.backbone
    if backbone is not None and backbone != name:
        raise KerasError(f"{keras.path}: holds a Keras {name} (width from block_16_project), "
                         f"not {backbone}; use --backbone {name}")
    model = timm.create_model(name, pretrained=False, num_classes=0, **{**TIMM_KWARGS, **(timm_kwargs or {})})
    model.load_state_dict(state_dict(model, keras))
    return model.eval(), keras


def import_file(path: str | Path, out: str | Path) -> dict:
    """Convert a Keras MobileNetV2 .h5 file to `out`/backbone.safetensors (timm names) plus
    `out`/backbone.json (backbone, timm kwargs, preprocessing, Keras layer names); returns the JSON.
    Train on it with `--backbone <backbone> --weights <out>`."""
    from safetensors.torch import save_file

    model, found = load(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / IMPORTED) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    config = {
        "backbone": found.backbone,
        "timm_kwargs": TIMM_KWARGS,
        "preprocess": {"image_size": found.image_size or 224, "mean": list(MEAN), "std": list(STD)},
        "source": str(found.path),
        "source_sha256": sha256_of(found.path),
        "keras_model": found.model_name,
        "head_not_imported": found.head,
        "layers": [name for name, _ in keras_layers(model)],
    }
    write_text((out / IMPORTED).with_suffix(".json"), json.dumps(config, indent=2) + "\n")
    return config
