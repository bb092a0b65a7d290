"""Decoding: any image file to a (S, S, 3) uint8 RGB array, once, in parallel threads; unusable files
are skipped with their reason, never a crash mid-epoch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.errors import DataError, ImageError
from . import dicom, tiff
from .listing import LabelledImages, image_key, load_labelled
from .memory import allocate, memory_budget
from .window import SAMPLES_PER_IMAGE, HighBit, Rules, Window, measure, sample, with_window


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any 8-bit PIL mode to RGB: alpha composited on white, CMYK/P converted. Modes of more than
    8 bits a sample need an intensity window (`read_pixels`, `Rules`), not a fixed scale."""
    if image.mode in HIGH_MODES:
        raise ImageError(f"a {HIGH_MODES[image.mode]} image needs an intensity window (read it with read_pixels)")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, size: int, draft: bool = True, rules: Rules | None = None) -> np.ndarray:
    """Decode one file to an (size, size, 3) uint8 RGB array, EXIF orientation applied. `draft`
    lets large JPEGs decode at a reduced scale (at least twice the target size). High-bit-depth
    images go through `rules`' intensity window (a model's: `Engine.rules`).

    Raises ImageError with a one-line reason for anything that is not a usable image.
    """
    path = _checked(path)
    return read_image(path, size, draft, rules=rules)


def _checked(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImageError("file not found")
    if path.stat().st_size == 0:
        raise ImageError("empty file")
    return path


def read_image(source, size: int, draft: bool = True, max_pixels: int | None = None,
               formats: tuple[str, ...] | None = None, rules: Rules | None = None) -> np.ndarray:
    """`load_image` for a path or a binary file object (e.g. an upload). The format (`formats`, in
    Pillow's names, plus "DICOM") and the pixel count (`max_pixels`, default Pillow's
    decompression-bomb limit) are checked from the header, before decoding."""
    rules = rules or Rules()
    pixels = read_pixels(source, size, draft, max_pixels, formats, rules.pages)
    return rules.to_uint8(pixels.array, pixels.own_window, pixels.depth)


@dataclass
class Pixels:
    """One decoded image at the model's size: uint8 (S, S, 3), exactly as before high-bit-depth
    support, for 8-bit files; float32 intensities (S, S, C), C 1 or 3, for the others (they need
    a window). `pages`: the file's page (frame) count, of which the first was read."""

    array: np.ndarray
    depth: str = "8-bit"
    own_window: Window | None = None
    pages: int = 1

    @property
    def high(self) -> bool:
        return self.array.dtype != np.uint8


def read_pixels(source, size: int, draft: bool = True, max_pixels: int | None = None,
                formats: tuple[str, ...] | None = None, pages: str = "first", fit: bool = False) -> Pixels:
    """A path or binary file object decoded: PNG, JPEG, BMP, GIF, WebP, PPM/PGM and 8-bit TIFF by
    Pillow as before; TIFF with wider samples or several pages by tifffile (`tiff`); DICOM by
    pydicom (`dicom`, recognised by its 'DICM' mark or a .dcm/.dicom name). `fit`: at most `size`
    pixels a side, aspect kept (the labelling page), instead of `size` x `size`."""
    max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        named_dicom = str(getattr(source, "name", source)).lower().endswith(dicom.SUFFIXES)
        if dicom.sniff(source):
            if formats and "DICOM" not in formats:
                raise ImageError(f"image format DICOM not allowed (allowed: {', '.join(formats)})", "format")
            found = dicom.read(source, max_pixels, pages)
            return _from_array(found.pixels, size, fit, found.depth, found.own_window, found.frames)
        try:
            image = Image.open(source)
        except UnidentifiedImageError:
            if tiff.sniff(source):
                if formats and "TIFF" not in formats:
                    raise ImageError(f"image format TIFF not allowed (allowed: {', '.join(formats)})", "format") from None
                found = tiff.read(source, max_pixels, pages)
                return _from_array(found.pixels, size, fit, found.depth, None, found.pages)
            if named_dicom and not (formats and "DICOM" not in formats):  # DICOM without its preamble
                found = dicom.read(source, max_pixels, pages, forced=True)
                return _from_array(found.pixels, size, fit, found.depth, found.own_window, found.frames)
            raise
        with image:
            if formats and image.format not in formats:
                raise ImageError(f"image format {image.format} not allowed (allowed: {', '.join(formats)})", "format")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"too many pixels: {width}x{height} > {max_pixels} (decompression bomb guard)",
                                 "size")
            count = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
            if count > 1 and pages == "refuse":
                raise ImageError(f"multi-page TIFF ({count} pages): refused by the page rule (pages=first reads the first)")
            if image.format == "TIFF" and _wide_tiff(image):
                try:
                    if hasattr(source, "seek"):
                        source.seek(0)
                    found = tiff.read(source, max_pixels, pages, pillow_can=image.mode in HIGH_MODES)
                    return _from_array(found.pixels, size, fit, found.depth, None, found.pages)
                except tiff.UsePillow:
                    pass
            if image.mode in HIGH_MODES:
                image.load()
                array = np.asarray(ImageOps.exif_transpose(image)).astype(np.float32)[:, :, None]
                return _from_array(array, size, fit, HIGH_MODES[image.mode] + f" {image.format}", None, count)
            if image.format == "PNG" and any(";16" in str(tile.args) for tile in image.tile):
                raise ImageError(f"16-bit {image.mode} PNG: Pillow reads only the top 8 bits of its channels; save it "
                                 "as a 16-bit TIFF (or as 16-bit grey PNG)")
            rgb = decoded_rgb(image, (size if fit else size * 2) if draft else None)
            if fit:
                rgb.thumbnail((size, size))
            else:
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return Pixels(np.asarray(rgb, dtype=np.uint8), "8-bit", None, count)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)", "format") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too many pixels (decompression bomb guard): {exc}", "size") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"unreadable image ({exc})") from None


# Pillow's modes of more than 8 bits a sample, and what they are.
HIGH_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit",
              "I": "32-bit integer", "F": "32-bit float"}


def _wide_tiff(image: Image.Image) -> bool:
    """A TIFF whose samples are wider than 8 bits (Pillow would truncate or refuse some)."""
    bits = getattr(image, "tag_v2", {}).get(258, 8)
    return image.mode in HIGH_MODES or max(bits if isinstance(bits, tuple) else (bits,)) > 8


def _from_array(array: np.ndarray, size: int, fit: bool, depth: str, own: Window | None, pages: int) -> Pixels:
    """A decoded (H, W, C) array at the model's size: uint8 (an 8-bit DICOM) as Pillow resizes an
    8-bit image; intensities resized per channel in float (Pillow's bilinear filter, as for 8-bit
    images), non-finite values first set to the nearest finite extreme."""
    if array.dtype == np.uint8:
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).convert("RGB")
        if fit:
            image.thumbnail((size, size))
        else:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return Pixels(np.asarray(image, dtype=np.uint8), depth, own, pages)
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        if not finite.any():
            raise ImageError(f"a {depth} image with no finite pixel value")
        low, high = array[finite].min(), array[finite].max()
        array = np.where(np.isposinf(array), high, np.where(finite, array, low)).astype(np.float32)
    height, width = array.shape[:2]
    if fit:
        scale = min(1.0, size / max(height, width))
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
    else:
        target = (size, size)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c]), "F").resize(
        target, Image.Resampling.BILINEAR), dtype=np.float32) for c in range(array.shape[-1])]
    return Pixels(np.stack(channels, axis=-1), depth, own, pages)


def display_image(source, size: int, rules: Rules | None = None) -> Image.Image:
    """An image as a person should see it, at most `size` pixels a side: 8-bit as `train` sees it,
    high-bit-depth through the model's window (none known yet: the image's own 0.5..99.5
    percentiles, for the eye only)."""
    rules = rules or Rules()
    pixels = read_pixels(source, size, pages=rules.pages, fit=True)
    if not pixels.high:
        return Image.fromarray(pixels.array)
    window = rules.window_for(pixels.own_window)
    if window is None:
        window, _ = measure([sample(pixels.array)], 0.5, 99.5)
    return Image.fromarray(window.apply(pixels.array))


def decoded_rgb(image: Image.Image, draft: int | None = None) -> Image.Image:
    """An opened image decoded as `train` sees it: EXIF orientation applied, any mode as RGB; a
    JPEG decoded at a reduced scale of at least `draft` pixels a side when given."""
    if draft and image.format == "JPEG":
        image.draft("RGB", (draft, draft))
    image.load()
    return _to_rgb(ImageOps.exif_transpose(image))


def _work(args: tuple) -> np.ndarray | Pixels | str:
    """One file in a worker thread: uint8 through `rules`, or its `Pixels` when `raw`, or the
    reason it cannot be used."""
    path, size, rules, raw = args
    try:
        pixels = read_pixels(_checked(path), size, pages=rules.pages)
        return pixels if raw else rules.to_uint8(pixels.array, pixels.own_window, pixels.depth)
    except ImageError as exc:
        return str(exc)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _iterate(paths: Iterable[str], size: int, workers: int | None, chunk: int, rules: Rules, raw: bool):
    workers = workers or default_workers()
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding/resizing
        batch: list[str] = []
        for path in paths:
            batch.append(str(path))
            if len(batch) == chunk:
                yield from zip(batch, pool.map(_work, [(p, size, rules, raw) for p in batch]))
                batch = []
        if batch:
            yield from zip(batch, pool.map(_work, [(p, size, rules, raw) for p in batch]))


def iter_decoded(paths: Iterable[str], size: int, workers: int | None = None,
                 chunk: int = 64, rules: Rules | None = None) -> Iterator[tuple[str, np.ndarray | str]]:
    """Decode files in parallel, in order, streaming: yields (path, array) or (path, reason);
    high-bit-depth images through `rules`' window (a model's)."""
    yield from _iterate(paths, size, workers, chunk, rules or Rules(), False)


def iter_pixels(paths: Iterable[str], size: int, workers: int | None = None, chunk: int = 64,
                pages: str = "first") -> Iterator[tuple[str, Pixels | str]]:
    """`iter_decoded` before any window: (path, Pixels) or (path, reason)."""
    yield from _iterate(paths, size, workers, chunk, Rules(pages=pages), True)


def decoded_batches(paths: Iterable[str], size: int, batch_size: int, workers: int | None = None,
                    rules: Rules | None = None) -> Iterator[list[tuple[str, np.ndarray]] | tuple[str, str]]:
    """`iter_decoded` grouped for a model, in file order: a list of up to `batch_size` (path, array)
    pairs, or (path, reason) for a file that could not be decoded (the images before it first)."""
    pending: list[tuple[str, np.ndarray]] = []
    for path, result in iter_decoded(paths, size, workers, rules=rules):
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
           progress=None, keep: bool = False, rules: Rules | None = None, defer: bool = False) -> LabelledImages:
    """Decode every file once; keep the usable ones (in RAM, or a memmap past `budget` bytes).
    High-bit-depth images go through `rules`' window; with `defer` (train, before the data set's
    window is measured) those that need it wait: their row stays zero and `highbit` keeps a
    sample of their intensities (`settle`, then `fill`, finish them)."""
    rules = rules or Rules()
    n = len(data)
    budget = memory_budget() if budget is None else budget
    store = allocate((n, size, size, 3), np.uint8, n * size * size * 3 <= budget, spill_dir, keep)
    kept, skipped = [], list(data.skipped)
    depths: list[str] = []
    waiting: dict[int, np.ndarray] = {}
    waiting_keys: dict[int, str] = {}
    kept_pixels: dict[int, tuple] = {}  # the waiting images' intensities, up to half the memory budget
    room = max(0, budget - n * size * size * 3) // 2
    multipage: list[tuple[str, int]] = []
    for i, (path, result) in enumerate(_iterate(data.paths, size, workers, 64, rules, True)):
        if not isinstance(result, str):
            row = len(kept)
            if defer and result.high and rules.window_for(result.own_window) is None:
                waiting[row], waiting_keys[row] = sample(result.array), image_key(result.array)
                if result.array.nbytes <= room:
                    kept_pixels[row] = (result.array, result.own_window, result.depth)
                    room -= result.array.nbytes
            else:
                try:
                    store[row] = rules.to_uint8(result.array, result.own_window, result.depth)
                except ImageError as exc:
                    result = str(exc)
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            kept.append(i)  # compacted in place: no copy, even for a memmap
            depths.append(result.depth)
            if result.pages > 1:
                multipage.append((path, result.pages))
        if progress:
            progress(i + 1, n)
    kept = np.asarray(kept, dtype=np.int64)
    notes = list(data.notes)
    if multipage:
        notes.append(f"{len(multipage)} multi-page file(s) (TIFF pages or DICOM frames): the first page of each was "
                     f"used (pages=refuse skips them instead); first: {multipage[0][0]} ({multipage[0][1]} pages)")
    images = store[: len(kept)]
    highbit = HighBit(depths, waiting, kept_pixels) if any(d != "8-bit" for d in depths) else None
    keys = None
    if waiting:  # the waiting rows are still zeros: their identity is their intensities'
        keys = [waiting_keys[r] if r in waiting_keys else image_key(images[r]) for r in range(len(kept))]
    return LabelledImages(
        paths=[data.paths[i] for i in kept],
        labels=data.labels[kept],
        classes=data.classes,
        skipped=skipped,
        images=images,
        notes=notes,
        highbit=highbit,
        _keys=keys,
        groups=None if data.groups is None else [data.groups[i] for i in kept],
    )


def settle(data: LabelledImages, train_rows: np.ndarray, rules: Rules, low: float, high: float
           ) -> tuple[Rules, list[str]]:
    """The data set's window, measured on the waiting training images' samples (rows
    `train_rows` of `data`): `rules` with it, and the notes to log."""
    highbit = data.highbit
    if highbit is None:
        return rules, []
    counts: dict[str, int] = {}
    for depth in highbit.depths:
        counts[depth] = counts.get(depth, 0) + 1
    notes = []
    window = None
    rows = [int(r) for r in train_rows if int(r) in highbit.samples]
    if not rows and highbit.samples:
        rows = sorted(highbit.samples)
        notes.append("no training image needs the intensity window; it was measured on the validation images")
    if rows:
        window, degenerate = measure([highbit.samples[r] for r in rows], low, high)
        measured_depths: dict[str, int] = {}
        for r in rows:
            measured_depths[highbit.depths[r]] = measured_depths.get(highbit.depths[r], 0) + 1
        rules = with_window(rules, window, {"percentiles": [low, high], "images": len(rows),
                                            "depths": measured_depths, "samples_per_image": SAMPLES_PER_IMAGE})
        notes.append(f"Intensity window [{window.low:.6g}, {window.high:.6g}]: the {low:g} and {high:g} percentiles "
                     f"of {len(rows)} training image(s) ({shown_counts(measured_depths)}); every high-bit-depth image "
                     "of this model goes through it to 0..255")
        if degenerate:
            notes.append(degenerate)
    if rules.source == "dicom":
        notes.append("window dicom: DICOM files with their own window centre/width use it; the others the data set's")
    eight = counts.pop("8-bit", 0)
    if eight and counts:
        notes.append(f"note: mixed bit depths: {eight} 8-bit image(s) are used as they are, {shown_counts(counts)} "
                     f"go through the intensity window" + (f" [{window.low:.6g}, {window.high:.6g}]" if window else "")
                     + "; check that both kinds show the same things alike (the report shows them as the model sees them)")
    return rules, notes


def shown_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def fill(data: LabelledImages, rules: Rules, size: int, workers: int | None = None) -> LabelledImages:
    """The waiting images through `rules`' window now measured, into their rows (from their kept
    intensities, or decoded again); their keys become those of the images the model sees."""
    highbit = data.highbit
    if highbit is None or not highbit.samples:
        return data
    for row, (pixels, own, depth) in highbit.pixels.items():
        data.images[row] = rules.to_uint8(pixels, own, depth)
    rows = sorted(set(highbit.samples) - set(highbit.pixels))
    for row, (path, result) in zip(rows, iter_decoded([data.paths[r] for r in rows], size, workers, rules=rules)):
        if isinstance(result, str):
            raise DataError(f"{path}: unreadable on its second reading ({result}); did it change during training?")
        data.images[row] = result
    highbit.samples, highbit.pixels = {}, {}
    data._keys = None
    return data


def decode_source(source: str | Path, size: int, classes: list[str] | None = None, task: str = "auto",
                  sep: str = "|", **options) -> LabelledImages:
    """A labelled folder or CSV (`load_labelled`) decoded at `size` (`decode`'s options); an error
    when no image is usable."""
    data = decode(load_labelled(source, classes, task, sep), size, **options)
    if len(data) == 0:
        raise DataError(f"{source}: no usable images" + (f" ({len(data.skipped)} skipped, first: "
                        f"{data.skipped[0][0]}: {data.skipped[0][1]})" if data.skipped else ""))
    return data
