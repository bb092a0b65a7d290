"""A trained classifier: saved as safetensors + JSON (no pickle), loaded, used on files."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .backbones import Preprocess, timm_model
from .data import IMAGE_SUFFIXES, DataError, decode, decoded_batches, load_labelled
from .evaluate import classification_metrics, predict_arrays
from .model import TransferModel, predict_labels

FORMAT_VERSION = 1


class RunError(ValueError):
    """A run directory is missing or does not hold a usable model."""


class Classifier:
    """What `predict` needs: the model, its class names and the metadata of `model.json`."""

    def __init__(self, model: TransferModel, classes: list[str], meta: dict):
        self.model, self.classes, self.meta = model.eval(), list(classes), dict(meta)
        self.meta.setdefault("threshold", 0.5)
        self.meta.setdefault("temperature", 1.0)
        self.model.temperature = float(self.meta["temperature"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def image_size(self) -> int:
        return int(self.meta["preprocess"]["image_size"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(run_dir / "model.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "num_outputs": self.model.head.out_features,
            "dropout": self.model.dropout.p,
            "augmentation": {"flip": self.model.augment.flip, "rotation": self.model.augment.rotation},
            **self.meta,
            "versions": {"transferkit": __version__, "torch": torch.__version__,
                         "timm": timm.__version__, "python": platform.python_version()},
        }
        (run_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "Classifier":
        run_dir = Path(run_dir)
        meta_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise RunError(f"{path}: not found (is {run_dir} a transferkit run directory?)")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise RunError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
            backbone = timm_model(meta["backbone"], num_classes=0, **meta.get("timm_kwargs", {}))
            model = TransferModel(backbone, len(meta["classes"]), Preprocess(**meta["preprocess"]),
                                  dropout=meta["dropout"], **meta["augmentation"])
            model.load_state_dict(load_file(str(weights_path)))
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - any inconsistency means an unusable run
            raise RunError(f"{run_dir}: cannot load the model ({type(exc).__name__}: {exc})") from None
        model.to(device, memory_format=torch.channels_last)
        return cls(model, meta["classes"], meta)

    def predict_proba(self, images: np.ndarray, batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """(N, C) calibrated probabilities for uint8 images (N, S, S, 3) of this model's size;
        `tta`: the mean of the probabilities of each image and its horizontal mirror."""
        probs = predict_arrays(self.model, images, batch_size, self.device)
        if tta:
            probs = (probs + predict_arrays(self.model, images[:, :, ::-1], batch_size, self.device)) / 2
        return probs

    def labels(self, probabilities: np.ndarray) -> list[str]:
        index = predict_labels(torch.from_numpy(probabilities), self.threshold).tolist()
        return [self.classes[i] for i in index]

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 64,
                      workers: int | None = None, tta: bool = False) -> Iterator[dict]:
        """Stream one record per file, in order: {path, label, probabilities} or {path, error}."""
        for batch in decoded_batches(paths, self.image_size, batch_size, workers):
            if isinstance(batch, tuple):
                yield {"path": batch[0], "error": batch[1]}
                continue
            probs = self.predict_proba(np.stack([a for _, a in batch]), batch_size, tta)
            for (path, _), p, label in zip(batch, probs, self.labels(probs)):
                yield {"path": path, "label": label,
                       "probabilities": {c: float(v) for c, v in zip(self.classes, p)}}

    def evaluate(self, source: str | Path, batch_size: int = 64, tta: bool = False) -> dict:
        """Metrics on a labelled folder or CSV whose classes are among this model's."""
        data = decode(load_labelled(source, self.classes), self.image_size)
        if len(data) == 0:
            raise DataError(f"{source}: no usable images")
        probs = self.predict_proba(data.images, batch_size, tta)
        metrics = classification_metrics(data.labels, probs, self.classes, self.threshold)
        metrics.update(source=str(source), tta=tta,
                       skipped=[{"path": p, "reason": r} for p, r in data.skipped])
        return metrics


def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[str]:
    """Files as given; folders expanded (recursively, sorted) to the image files inside them."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES:
                    yield str(child)
        else:
            yield str(path)


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Load a run directory written by `train`."""
    return Classifier.load(run_dir, device)
