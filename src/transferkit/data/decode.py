"""Decoding: any image file to a (S, S, 3) uint8 RGB array, once, in parallel threads; unusable files
are skipped with their reason, never a crash mid-epoch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.errors import DataError, ImageError
from .listing import LabelledImages, load_labelled
from .memory import allocate, memory_budget


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha composited on white, 16-bit and float scaled, CMYK/P converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = (array - low) / (high - low or 1.0) * 255.0
        image = Image.fromarray(np.nan_to_num(scaled).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, size: int, draft: bool = True) -> np.ndarray:
    """Decode one file to an (size, size, 3) uint8 RGB array, EXIF orientation applied. `draft`
    lets large JPEGs decode at a reduced scale (at least twice the target size).

    Raises ImageError with a one-line reason for anything that is not a usable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError("file not found")
    if path.stat().st_size == 0:
        raise ImageError("empty file")
    return read_image(path, size, draft)


def read_image(source, size: int, draft: bool = True, max_pixels: int | None = None,
               formats: tuple[str, ...] | None = None) -> np.ndarray:
    """`load_image` for a path or a binary file object (e.g. an upload). The format (`formats`, in
    Pillow's names) and the pixel count (`max_pixels`, default Pillow's decompression-bomb limit)
    are checked from the header, before decoding."""
    max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(source) as image:
            if formats and image.format not in formats:
                raise ImageError(f"image format {image.format} not allowed (allowed: {', '.join(formats)})", "format")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"too many pixels: {width}x{height} > {max_pixels} (decompression bomb guard)",
                                 "size")
            rgb = decoded_rgb(image, size * 2 if draft else None).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)", "format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels (decompression bomb guard): {exc}", "size") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"unreadable image ({exc})") from None


def decoded_rgb(image: Image.Image, draft: int | None = None) -> Image.Image:
    """An opened image decoded as `train` sees it: EXIF orientation applied, any mode as RGB; a
    JPEG decoded at a reduced scale of at least `draft` pixels a side when given."""
    if draft and image.format == "JPEG":
        image.draft("RGB", (draft, draft))
    image.load()
    return _to_rgb(ImageOps.exif_transpose(image))


def _try_load(args: tuple[str, int]) -> np.ndarray | str:
    try:
        return load_image(*args)
    except ImageError as exc:
        return str(exc)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def iter_decoded(paths: Iterable[str], size: int, workers: int | None = None,
                 chunk: int = 64) -> Iterator[tuple[str, np.ndarray | str]]:
    """Decode files in parallel, in order, streaming: yields (path, array) or (path, reason)."""
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding/resizing
        batch: list[str] = []
        for path in paths:
            batch.append(str(path))
            if len(batch) == chunk:
                yield from zip(batch, pool.map(_try_load, [(p, size) for p in batch]))
                batch = []
        if batch:
            yield from zip(batch, pool.map(_try_load, [(p, size) for p in batch]))


def decoded_batches(paths: Iterable[str], size: int, batch_size: int, workers: int | None = None
                    ) -> Iterator[list[tuple[str, np.ndarray]] | tuple[str, str]]:
    """`iter_decoded` grouped for a model, in file order: a list of up to `batch_size` (path, array)
    pairs, or (path, reason) for a file that could not be decoded (the images before it first)."""
    pending: list[tuple[str, np.ndarray]] = []
    for path, result in iter_decoded(paths, size, workers):
        if isinstance(result, str):
            if pending:
                yield pending
                pending = []
            yield path, result
            continue
        pending.append((path, result))
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def decode(data: LabelledImages, size: int, workers: int | None = None,
           spill_dir: str | Path | None = None, budget: int | None = None,
           progress=None, keep: bool = False) -> LabelledImages:
    """Decode every file once; keep the usable ones (in RAM, or a memmap past `budget` bytes)."""
    n = len(data)
    budget = memory_budget() if budget is None else budget
    store = allocate((n, size, size, 3), np.uint8, n * size * size * 3 <= budget, spill_dir, keep)
    kept, skipped = [], list(data.skipped)
    for i, (path, result) in enumerate(iter_decoded(data.paths, size, workers)):
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            store[len(kept)] = result  # compacted in place: no copy, even for a memmap
            kept.append(i)
        if progress:
            progress(i + 1, n)
    kept = np.asarray(kept, dtype=np.int64)
    return LabelledImages(
        paths=[data.paths[i] for i in kept],
        labels=data.labels[kept],
        classes=data.classes,
        skipped=skipped,
        images=store[: len(kept)],
        notes=data.notes,
        groups=None if data.groups is None else [data.groups[i] for i in kept],
    )


def decode_source(source: str | Path, size: int, classes: list[str] | None = None, task: str = "auto",
                  sep: str = "|", **options) -> LabelledImages:
    """A labelled folder or CSV (`load_labelled`) decoded at `size` (`decode`'s options); an error
    when no image is usable."""
    data = decode(load_labelled(source, classes, task, sep), size, **options)
    if len(data) == 0:
        raise DataError(f"{source}: no usable images" + (f" ({len(data.skipped)} skipped, first: "
                        f"{data.skipped[0][0]}: {data.skipped[0][1]})" if data.skipped else ""))
    return data

