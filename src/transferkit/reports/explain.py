"""Grad-CAM (Selvaraju et al. 2017) for CNN backbones: where in the image the evidence for a
class lies, from the last convolutional feature map (the output of `forward_features`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.decode import decoded_batches
from ..models.inference import to_batch
from ..models.transfer import TransferModel, to_unit
from ..predict.metrics import predict_labels, predict_sets
from ..utils.errors import RunError
from ..utils.files import write_bytes


def gradcam(model: TransferModel, images: np.ndarray, target: np.ndarray | None = None,
            threshold: float = 0.5, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps (N, S, S) in [0, 1] for uint8 images (N, S, S, 3), with the probabilities (N, C)
    and the explained class of each image (`target`, else the class predicted with `threshold`;
    multi-label: the most probable class).

    The score explained is the class logit; with one logit (two classes) it is the logit for
    class 1 and minus the logit for class 0. Channel weights are the spatial mean of the score's
    gradient; the map is ReLU(sum of weighted channels), upsampled to the image size."""
    model.eval()
    with torch.no_grad():
        fmap = model.backbone.forward_features(model.normalize(to_unit(to_batch(images, device))))
    if fmap.ndim != 4:
        raise RunError(f"Grad-CAM needs a CNN backbone with a spatial feature map; "
                         f"{type(model.backbone).__name__} gives shape {tuple(fmap.shape)}")
    fmap = fmap.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(model.dropout(model.backbone.forward_head(fmap, pre_logits=True)))
        probs = model.probabilities(logits.detach())
        if target is None:
            target = probs.argmax(1).cpu().numpy() if model.multilabel else predict_labels(probs.cpu().numpy(), threshold)
        chosen = torch.as_tensor(target, device=logits.device)
        if model.binary:
            score = logits[:, 0] * torch.where(chosen == 1, 1.0, -1.0)
        else:
            score = logits.gather(1, chosen[:, None])[:, 0]
        (grads,) = torch.autograd.grad(score.sum(), fmap)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu().numpy(), probs.cpu().numpy(), chosen.cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, min_size: int = 224) -> np.ndarray:
    """The image with the heatmap blended over it (matplotlib's "jet"), at least `min_size` pixels."""
    from matplotlib import colormaps
    from PIL import Image

    size = max(min_size, image.shape[0])
    picture = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32)
    heat = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((size, size), Image.BILINEAR))
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return ((1 - alpha) * picture + alpha * colour).round().clip(0, 255).astype(np.uint8)


def overlay_png(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> bytes:
    """`overlay` as PNG bytes."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(overlay(image, cam, alpha)).save(buffer, format="PNG")
    return buffer.getvalue()


def explained_classes(classifier, probs: np.ndarray, label: str | None) -> list[list[int]]:
    """The classes to explain for each image: `label` when given; else the predicted class, or for
    a multi-label model every predicted class (the most probable one when none is predicted)."""
    if label is not None:
        if label not in classifier.classes:
            raise RunError(f"label {label!r} is not one of the model's classes {classifier.classes}")
        return [[classifier.classes.index(label)]] * len(probs)
    if not classifier.multilabel:
        return [[int(c)] for c in predict_labels(probs, classifier.threshold)]
    chosen = predict_sets(probs, classifier.threshold)
    return [[int(c) for c in np.flatnonzero(row)] or [int(np.argmax(p))] for row, p in zip(chosen, probs)]


def explain_files(classifier, paths: Iterable[str | Path], out_dir: str | Path,
                  batch_size: int = 16, label: str | None = None) -> Iterator[dict]:
    """Write one overlay PNG per image and explained class (`explained_classes`) into `out_dir`
    (NAME.png; multi-label: NAME_CLASS.png); yield {path, output, label, probability} per overlay
    or {path, error}, in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    model = classifier.model
    for batch in decoded_batches(paths, classifier.image_size, batch_size, rules=classifier.rules):
        if isinstance(batch, tuple):
            yield {"path": batch[0], "error": batch[1]}
            continue
        images = np.stack([a for _, a in batch])
        probs = classifier.predict_proba(images, batch_size)
        wanted = explained_classes(classifier, probs, label)
        cams = {}  # (image, class) -> heatmap, one Grad-CAM pass per class over the images that need it
        for c in sorted({c for classes in wanted for c in classes}):
            index = [i for i, classes in enumerate(wanted) if c in classes]
            maps, _, _ = gradcam(model, images[index], np.full(len(index), c), device=classifier.device)
            cams.update({(i, c): m for i, m in zip(index, maps)})
        for i, (path, image) in enumerate(batch):
            for c in wanted[i]:
                name = Path(path).stem + ("_" + re.sub(r"[^\w.-]+", "_", classifier.classes[c])
                                          if classifier.multilabel else "")
                while f"{name}.png" in used:
                    name += "_"
                used.add(f"{name}.png")
                target = out_dir / f"{name}.png"
                write_bytes(target, overlay_png(image, cams[(i, c)]))
                yield {"path": path, "output": str(target), "label": classifier.classes[c],
                       "probability": float(probs[i, c])}
