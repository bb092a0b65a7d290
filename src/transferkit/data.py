"""Labelled image sources (class folders or a CSV), robust decoding, and the stratified split.

Images are decoded and resized once, in parallel, into a uint8 array (N, S, S, 3) held in RAM, or
in a disk-backed memmap when it would exceed the memory budget. Files that cannot be used are
skipped with their reason and reported, never a crash mid-epoch.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


@dataclass
class LabelledImages:
    """Image paths with their labels, plus the files that were skipped and notes on what was
    changed (merged duplicates). Labels are integer indices into `classes` (N,), or for multi-label
    data a 0/1 matrix (N, C): any number of classes per image, none included."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    images: np.ndarray | None = None  # decoded (N, S, S, 3) uint8, once `decode` has run
    notes: list[str] = field(default_factory=list)
    _keys: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self) -> list[str]:
        """Each decoded image's identity (`image_key`), computed once: duplicates, the held-out
        check and the view cache all use it."""
        if self._keys is None:
            self._keys = [image_key(image) for image in self.images]
        return self._keys

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def counts(self) -> dict[str, int]:
        """Images per class (multi-label: images that carry each class)."""
        if self.multilabel:
            return {c: int(self.labels[:, i].sum()) for i, c in enumerate(self.classes)}
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}

    def names(self, i: int) -> list[str]:
        """The class names of image i."""
        if self.multilabel:
            return [c for c, on in zip(self.classes, self.labels[i]) if on]
        return [self.classes[self.labels[i]]]

    def subset(self, index: np.ndarray) -> "LabelledImages":
        return LabelledImages(
            paths=[self.paths[i] for i in index],
            labels=self.labels[index],
            classes=self.classes,
            images=None if self.images is None else self.images[index],
            _keys=None if self._keys is None else [self._keys[i] for i in index],
        )


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _link_problem(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"dangling symlink (target {os.readlink(path)} not found)" if path.is_symlink() else str(exc.strerror)
    return "not a regular file"


def walk_files(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """Every visible file below `folder`, in sorted order. Symlinked folders are followed like any
    other, each real folder once; a link to a folder already listed or to one above `folder` is a
    loop; dangling and looping links are added to `skipped` with their reason."""
    files: list[Path] = []
    seen: set[str] = set()
    top = os.path.realpath(folder)

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen or top.startswith(real + os.sep):  # an ancestor: listing it again never ends
            skipped.append((str(directory), "symlink loop (a folder already listed, or one above it)"))
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(directory), f"unreadable folder ({exc.strerror})"))
            return
        for entry in entries:
            if not _visible(entry.name):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    walk(path)
                elif entry.is_file():
                    files.append(path)
                else:
                    skipped.append((str(path), _link_problem(path)))
            except OSError as exc:
                skipped.append((str(path), _link_problem(path) if entry.is_symlink() else str(exc.strerror)))

    walk(folder)
    return sorted(files)


def from_folder(root: str | Path, classes: list[str] | None = None, multilabel: bool = False,
                sep: str = "|") -> LabelledImages:
    """One sub-folder per class (the folder name is the class); files in nested folders count.
    `multilabel`: each image carries its folder's class (the same image in two folders, both)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected one sub-folder per class, or a CSV file)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not found:
        raise DataError(f"{root}: no class folders (expected e.g. {root}/cats/*.jpg, {root}/dogs/*.jpg)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root}: classes {unknown} are not among the model's classes {classes}")
    if multilabel:
        check_names(found, sep, str(root))
    paths, labels, skipped = [], [], []
    for path in sorted(root.iterdir()):
        if _visible(path.name) and not path.is_dir():
            skipped.append((str(path), "not inside a class folder" if path.is_file() else _link_problem(path)))
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in walk_files(folder, skipped):
            paths.append(str(path))
            labels.append(index)
    labels = np.asarray(labels, dtype=np.int64)
    if multilabel:
        labels = indicator([[i] for i in labels], len(classes))
    return LabelledImages(paths, labels, list(classes), skipped)


def from_csv(csv_path: str | Path, classes: list[str] | None = None, task: str = "auto",
             sep: str = "|") -> LabelledImages:
    """A CSV with a header `path,label` (one class per image) or `path,labels` (multi-label: zero or
    more class names separated by `sep`); relative paths are relative to the CSV's folder. A path
    listed again with the same label is merged (with a note); with another label it is refused,
    except for multi-label data (`task="multilabel"`, or a `labels` column), where the labels of
    all its rows are merged (with a note)."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [(name or "").strip() for name in reader.fieldnames or []]
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read CSV ({exc})") from None
    columns = set(reader.fieldnames)
    column = "labels" if "labels" in columns else "label"
    if "path" not in columns or column not in columns:
        raise DataError(f"{csv_path}: expected a header with columns 'path' and 'label' (or 'labels', for "
                        f"multi-label data), got {reader.fieldnames}")
    if column == "labels" and task == "multiclass":
        raise DataError(f"{csv_path}: a 'labels' column is multi-label data, but the task is multiclass "
                        "(use a 'label' column, or task multilabel)")
    multilabel = column == "labels" or task == "multilabel"
    if not rows:
        raise DataError(f"{csv_path}: no rows after the header")
    entries = []  # (line, raw path, class names)
    for line, row in rows:
        raw, value = (row["path"] or "").strip(), (row[column] or "").strip()
        if column == "labels":
            names = split_labels(value, sep, f"{csv_path}:{line}")
        else:
            names = [value] if value else []
            if multilabel:
                check_names(names, sep, f"{csv_path}:{line}")
        entries.append((line, raw, names))
    found = sorted({n for _, _, names in entries for n in names})
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{csv_path}: labels {unknown} are not among the model's classes {classes}")
    paths, labels, skipped, where = [], [], [], {}
    repeats, merged = 0, 0
    for line, raw, names in entries:
        if not raw or not (names or multilabel):
            skipped.append((f"{csv_path}:{line}", "empty path or label"))
            continue
        path = os.path.normpath(Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw)
        if path in where:
            first_line, index = where[path]
            if set(labels[index]) == set(names):
                repeats += 1
            elif multilabel:
                labels[index] = sorted(set(labels[index]) | set(names))
                merged += 1
            else:
                raise DataError(f"{csv_path}:{line}: {raw} is labelled {names[0]!r} here and {labels[index][0]!r} "
                                f"on line {first_line}; one image, one label (multi-label data: task multilabel)")
            continue
        where[path] = (line, len(paths))
        paths.append(path)
        labels.append(names)
    notes = [f"{csv_path}: {repeats} repeated row(s) of the same path and label merged"] if repeats else []
    if merged:
        notes.append(f"{csv_path}: {merged} row(s) gave more labels to a path listed before; their labels merged")
    if multilabel:
        array = indicator([[classes.index(n) for n in names] for names in labels], len(classes))
    else:
        array = np.asarray([classes.index(names[0]) for names in labels], dtype=np.int64)
    return LabelledImages(paths, array, list(classes), skipped, notes=notes)


def split_labels(value: str, sep: str, where: str) -> list[str]:
    """The class names of a `labels` cell: empty for none; an empty name (two separators in a row,
    or one at either end) is an error."""
    if not value:
        return []
    names = [n.strip() for n in value.split(sep)]
    if not all(names):
        raise DataError(f"{where}: empty class name in {value!r} (class names are separated by {sep!r}; "
                        "leave the cell empty for an image with no label)")
    return sorted(set(names))


def check_names(names: list[str], sep: str, where: str) -> None:
    """Multi-label class names must not hold the separator (the labels column could not say them)."""
    bad = [n for n in names if sep in n]
    if bad:
        raise DataError(f"{where}: class name {bad[0]!r} contains the label separator {sep!r} "
                        "(rename it, or choose another separator: label_sep)")


def indicator(rows: list[list[int]], num_classes: int) -> np.ndarray:
    """Lists of class indices as a 0/1 matrix (N, C)."""
    matrix = np.zeros((len(rows), num_classes), dtype=np.uint8)
    for i, row in enumerate(rows):
        matrix[i, row] = 1
    return matrix


def load_labelled(source: str | Path, classes: list[str] | None = None, task: str = "auto",
                  sep: str = "|") -> LabelledImages:
    """Class folders or a CSV, chosen by what `source` is; `task` multilabel reads either as
    multi-label data (a CSV with a `labels` column is multi-label anyway)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return from_csv(source, classes, task, sep)
    if not source.exists():
        raise DataError(f"{source}: not found")
    return from_folder(source, classes, task == "multilabel", sep)


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


def memory_budget(gigabytes: float | None = None) -> int:
    """Bytes that decoded images and cached arrays may take in RAM before they spill to disk:
    `gigabytes` when given, else a quarter of the memory available now."""
    if gigabytes:
        return int(gigabytes * 2**30)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return available // 4


def allocate(shape: tuple[int, ...], dtype, in_ram: bool, spill_dir: str | Path | None = None,
             keep: bool = False) -> np.ndarray:
    """A zeroed array in RAM, or a disk-backed memmap in `spill_dir`: deleted with the array, or
    left on disk when `keep`."""
    if in_ram:
        return np.zeros(shape, dtype=dtype)
    spill = Path(spill_dir or tempfile.gettempdir())
    spill.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=spill, suffix=".bin", delete=False)
    shape = tuple(max(d, 1) for d in shape)
    array = np.memmap(handle, dtype=dtype, mode="w+", shape=shape)
    array._transferkit_file = handle  # keeps the file open exactly as long as the array
    if not keep:
        os.unlink(handle.name)  # POSIX: the space is freed when the array goes
    return array


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
    )


def image_key(image: np.ndarray) -> str:
    """A decoded image's identity: the SHA-256 of its pixels (the same file under two names, or two
    byte-different files that decode to the same pixels, get one key)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:32]


def merge_duplicates(data: LabelledImages, origin: str) -> LabelledImages:
    """One copy of each image: copies with the same label are merged (the extra copies are listed
    as skipped, naming the kept one); copies with different labels are refused, or for multi-label
    data merged with their labels combined. Done before the split, so that no image can be on both
    sides of it."""
    first: dict[str, int] = {}
    keep, merged, combined = [], [], 0
    labels = data.labels.copy()
    for i, key in enumerate(data.keys()):
        j = first.setdefault(key, i)
        if j == i:
            keep.append(i)
            continue
        reason = f"same image as {data.paths[j]} (merged)"
        if (labels[j] != labels[i]).any():
            if not data.multilabel:
                raise DataError(f"{origin}: the same image is labelled {data.classes[labels[j]]!r} "
                                f"({data.paths[j]}) and {data.classes[labels[i]]!r} ({data.paths[i]}); "
                                "one image, one label")
            labels[j] |= labels[i]
            combined += 1
            reason = f"same image as {data.paths[j]} (merged; their labels combined)"
        merged.append((data.paths[i], reason))
    if not merged:
        return data
    result = LabelledImages(data.paths, labels, data.classes, images=data.images, _keys=data._keys).subset(
        np.asarray(keep))
    result.skipped = data.skipped + merged
    result.notes = data.notes + [f"{origin}: {len(merged)} duplicate image(s) " + (
        f"merged, {combined} of them with their labels combined" if combined else "with the same label merged")
        + " (listed in skipped.csv)"]
    return result


def shared_images(a: LabelledImages, b: LabelledImages) -> list[tuple[str, str]]:
    """Pairs of paths (in a, in b) that hold the same image."""
    paths = dict(zip(a.keys(), a.paths))
    return [(paths[key], path) for key, path in zip(b.keys(), b.paths) if key in paths]


def decode_source(source: str | Path, size: int, classes: list[str] | None = None, task: str = "auto",
                  sep: str = "|", **options) -> LabelledImages:
    """A labelled folder or CSV (`load_labelled`) decoded at `size` (`decode`'s options); an error
    when no image is usable."""
    data = decode(load_labelled(source, classes, task, sep), size, **options)
    if len(data) == 0:
        raise DataError(f"{source}: no usable images" + (f" ({len(data.skipped)} skipped, first: "
                        f"{data.skipped[0][0]}: {data.skipped[0][1]})" if data.skipped else ""))
    return data


def check_labels(data: LabelledImages, origin: str, split: bool, every_class: bool = True) -> None:
    """Refuse data that cannot train (or validate) a classifier. Run on the listing, before any
    file is decoded, and again on the usable images after decoding: files to read; for training
    data two classes or more, each with an image (two for a validation split); for validation
    data every class present."""
    usable = "usable " if data.images is not None else ""
    if len(data) == 0:
        raise DataError(f"{origin}: no {usable}image files")
    if every_class and len(data.classes) < 2:
        raise DataError(f"{origin}: only one class ({data.classes}); need at least two")
    counts = data.counts()
    if data.multilabel and every_class:
        rare = [c for c, k in counts.items() if k < 2]
        if rare:
            raise DataError(f"{origin}: label(s) {rare} occur on fewer than 2 {usable}images; each label needs "
                            "at least 2 (add images, or drop the label)")
    empty = [c for c, k in counts.items() if k == 0]
    if empty:
        raise DataError(f"{origin}: no {usable}images for class(es) {empty}" + (
            "" if every_class else "; a validation set must hold every class the model learns"))
    small = [c for c, k in counts.items() if k < 2]
    if split and small:
        raise DataError(f"{origin}: class(es) {small} have a single {usable}image; a validation split needs "
                        "at least 2 per class (add images, or give a separate validation set)")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), stratified by label, reproducible for a seed (every class needs two
    images: see `check_labels`). Multi-label (N, C) labels: iterative stratification (Sechidis et
    al. 2011), then every label is made present on both sides."""
    if labels.ndim == 2:
        return multilabel_split(labels, fraction, seed)
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    n_val = max(int(round(len(labels) * fraction)), int((counts > 0).sum()))
    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=n_val, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def multilabel_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """iterative-stratification's MultilabelStratifiedShuffleSplit, with "no label" stratified like
    a class; a label left wholly on one side (rare labels can be) then has one of its images moved
    across, the one whose other labels are the most common on the side it leaves."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    labels = np.hstack([labels, (labels.sum(1) == 0)[:, None]]).astype(np.uint8)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train, val = next(splitter.split(np.zeros(len(labels)), labels))
    side = np.zeros(len(labels), dtype=bool)
    side[val] = True
    counts = labels.sum(0)
    for c in np.argsort(counts, kind="stable")[np.sort(counts) >= 2]:
        for to_val in (True, False):
            if not (labels[side == to_val, c]).any():
                donors = np.flatnonzero((side != to_val) & (labels[:, c] == 1))
                others = labels[side != to_val].sum(0)
                pick = donors[np.argmax([others[labels[d] == 1].min() for d in donors])]
                side[pick] = to_val
    return np.flatnonzero(~side), np.flatnonzero(side)
