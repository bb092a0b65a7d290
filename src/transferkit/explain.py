"""Grad-CAM (Selvaraju et al. 2017) for CNN backbones: where in the image the evidence for a
class lies, from the last convolutional feature map (the output of `forward_features`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import decoded_batches
from .errors import RunError
from .files import write_bytes
from .inference import to_batch
from .metrics import predict_labels
from .model import TransferModel, to_unit


def gradcam(model: TransferModel, images: np.ndarray, target: np.ndarray | None = None,
            threshold: float = 0.5, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps (N, S, S) in [0, 1] for uint8 images (N, S, S, 3), with the probabilities (N, C)
    and the explained class of each image (`target`, else the class predicted with `threshold`).

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
        chosen = torch.as_tensor(predict_labels(probs.cpu().numpy(), threshold) if target is None else target,
                                 device=logits.device)
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


def explain_files(classifier, paths: Iterable[str | Path], out_dir: str | Path,
                  batch_size: int = 16) -> Iterator[dict]:
    """Write one overlay PNG per image (the evidence for its predicted class) into `out_dir`;
    yield {path, output, label, probability} or {path, error}, in order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for batch in decoded_batches(paths, classifier.image_size, batch_size):
        if isinstance(batch, tuple):
            yield {"path": batch[0], "error": batch[1]}
            continue
        images = np.stack([a for _, a in batch])
        cams, probs, chosen = gradcam(classifier.model, images, threshold=classifier.threshold,
                                      device=classifier.device)
        for (path, image), cam, p, c in zip(batch, cams, probs, chosen):
            name = Path(path).stem
            while f"{name}.png" in used:
                name += "_"
            used.add(f"{name}.png")
            target = out_dir / f"{name}.png"
            write_bytes(target, overlay_png(image, cam))
            yield {"path": path, "output": str(target), "label": classifier.classes[int(c)],
                   "probability": float(p[int(c)])}
