"""Labelled image sources: class folders or a CSV (path,label), listed and checked before any decoding."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.errors import DataError
from .split import split_problem
from .window import HighBit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".dcm", ".dicom"}


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
    highbit: HighBit | None = None  # high-bit-depth images: their depths, those waiting for the window
    _keys: list[str] | None = field(default=None, repr=False)
    groups: list[str] | None = None  # a CSV's `group` column: the validation split keeps each group on one side

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
            highbit=None if self.highbit is None else self.highbit.subset(index),
            _keys=None if self._keys is None else [self._keys[i] for i in index],
            groups=None if self.groups is None else [self.groups[i] for i in index],
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
    grouped = "group" in columns
    groups = [(row.get("group") or "").strip() for _, row in rows] if grouped else None
    kept_groups = []
    for (line, raw, names), group in zip(entries, groups or [None] * len(entries)):
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
        kept_groups.append(group or f"\0{path}")  # no group given: the image is a group of its own
    notes = [f"{csv_path}: {repeats} repeated row(s) of the same path and label merged"] if repeats else []
    if merged:
        notes.append(f"{csv_path}: {merged} row(s) gave more labels to a path listed before; their labels merged")
    if multilabel:
        array = indicator([[classes.index(n) for n in names] for names in labels], len(classes))
    else:
        array = np.asarray([classes.index(names[0]) for names in labels], dtype=np.int64)
    return LabelledImages(paths, array, list(classes), skipped, notes=notes, groups=kept_groups if grouped else None)


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


def image_key(image: np.ndarray) -> str:
    """A decoded image's identity: the SHA-256 of its pixels (the same file under two names, or two
    byte-different files that decode to the same pixels, get one key)."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:32]


def check_labels(data: LabelledImages, origin: str, split: bool, every_class: bool = True,
                 val_split: float | None = None, seed: int = 0) -> None:
    """Refuse data that cannot train (or validate) a classifier. Run on the listing, before any
    file is decoded, and again on the usable images after decoding: files to read; for training
    data two classes or more, each with an image (two for a validation split); for validation
    data every class present. With `split` and `val_split`: the split that `seed` draws leaves
    every class on both sides."""
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
    if split and val_split is not None:
        problem = split_problem(data.labels, val_split, seed, data.classes)
        if problem:
            raise DataError(f"{origin}: {problem}")

