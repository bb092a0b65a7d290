"""The intensity window of high-bit-depth images: one per data set, measured once at train time.

A 12-bit camera writes 0..4,095, a 16-bit one anything in 0..65,535, often in a narrow band; a
float TIFF or a CT scan in Hounsfield units has no fixed range at all. Dividing by the type's
maximum (what transferkit did before) leaves a 12-bit image 16 grey levels of 256. Instead `train`
measures the `window_low` and `window_high` percentiles (settings, 0.5 and 99.5 by default) of the
training images' intensities, as the model sees them (decoded, resized), and every image of that
model, at train, predict, serve, label and in the exported graph, goes through the same window:

    y = round(clip((x - low) * 255 / (high - low), 0, 255))     (half to even, float32 arithmetic)

the 8-bit-equivalent image the backbone was trained for. 8-bit images never go through it.

`Rules` is what model.json's "preprocess" records about it: the window, where windows come from
(`data`, or `dicom`: each DICOM file's own centre/width), the page rule and the measurement.
This module imports neither torch nor Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..utils.errors import ImageError, RunError

SAMPLES_PER_IMAGE = 4096  # intensities kept per training image for the percentiles (a fixed stride)
SOURCES = ("data", "dicom")
PAGE_RULES = ("first", "refuse")


@dataclass(frozen=True)
class Window:
    """Intensities `low`..`high` mapped linearly to 0..255 (outside: clipped)."""

    low: float
    high: float

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or not self.high > self.low:
            raise ValueError(f"an intensity window needs finite low < high, got [{self.low}, {self.high}]")

    @property
    def constants(self) -> tuple[np.float32, np.float32]:
        """(low, scale) in float32, computed as the exported graph computes them."""
        low, high = np.float32(self.low), np.float32(self.high)
        return low, np.float32(255.0) / (high - low)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Float intensities (H, W, C) to uint8 (H, W, 3): C 1 is replicated to three channels."""
        low, scale = self.constants
        y = (np.asarray(x, dtype=np.float32) - low) * scale
        np.clip(y, 0, 255, out=y)
        out = np.rint(y).astype(np.uint8)
        return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out

    def invert(self, images: np.ndarray) -> np.ndarray:
        """uint8 images as float32 intensities that `apply` (and the exported graph) maps back to
        exactly the same uint8 values: how an 8-bit or already windowed image enters a graph
        whose input is intensities."""
        step = (float(np.float32(self.high)) - float(np.float32(self.low))) / 255.0
        return (float(np.float32(self.low)) + np.asarray(images, dtype=np.float64) * step).astype(np.float32)

    def exact_inverse(self) -> bool:
        """Whether `invert` then `apply` gives back every one of the 256 levels."""
        levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
        return bool((self.apply(self.invert(levels))[..., :1] == levels).all())

    def to_dict(self) -> dict:
        return {"low": float(self.low), "high": float(self.high)}

    @classmethod
    def from_dicom(cls, centre: float, width: float) -> "Window":
        """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1): c - 0.5 - (w - 1) / 2 .. c - 0.5 + (w - 1) / 2."""
        half = (max(float(width), 1.0) - 1.0) / 2.0
        low, high = float(centre) - 0.5 - half, float(centre) - 0.5 + half
        return cls(low, high if high > low else low + 1.0)


@dataclass(frozen=True)
class Rules:
    """How a model reads images beyond size and normalisation: the data set's intensity window
    (None when its training images were all 8-bit), where windows come from (`source`), the page
    rule, and how the window was measured (`measured`: percentiles, images, their bit depths)."""

    window: Window | None = None
    source: str = "data"
    pages: str = "first"
    measured: dict = field(default_factory=dict)

    def window_for(self, own: Window | None) -> Window | None:
        """The window an image goes through: a DICOM file's own (`source` dicom), else the data set's."""
        return own if (own is not None and self.source == "dicom") else self.window

    def to_uint8(self, pixels: np.ndarray, own: Window | None, depth: str) -> np.ndarray:
        """A decoded image as the model takes it: uint8 as it is; intensities through the window."""
        if pixels.dtype == np.uint8:
            return pixels
        window = self.window_for(own)
        if window is None:
            if self.source == "dicom":
                raise ImageError(f"a {depth} image without a window of its own, and this model has no data set window "
                                 "(its training images were 8-bit or DICOM files with their own windows)")
            raise ImageError(f"a {depth} image, but this model was trained on 8-bit images only (its model.json has "
                             "no intensity window); train on such images, or convert it to 8-bit")
        return window.apply(pixels)

    def to_meta(self) -> dict:
        """model.json's preprocess entries."""
        intensity = None if self.window is None else {**self.window.to_dict(), **self.measured}
        return {"window": self.source, "intensity_window": intensity, "pages": self.pages}

    @classmethod
    def from_meta(cls, preprocess: dict) -> "Rules":
        """From model.json's (or an export's) preprocess; runs written before windows: no window."""
        intensity = preprocess.get("intensity_window")
        window = None if intensity is None else Window(float(intensity["low"]), float(intensity["high"]))
        measured = {} if intensity is None else {k: v for k, v in intensity.items() if k not in ("low", "high")}
        return cls(window, preprocess.get("window", "data"), preprocess.get("pages", "first"), measured)

    @classmethod
    def from_config(cls, config) -> "Rules":
        """A run's rules before its window is measured."""
        return cls(None, config.window, config.pages)


def check_meta(preprocess: dict, check) -> None:
    """The window entries of a preprocess object are usable (`check(ok, message)` reports)."""
    check(preprocess.get("window", "data") in SOURCES,
          f"preprocess.window must be one of {', '.join(SOURCES)}, got {preprocess.get('window')!r}")
    check(preprocess.get("pages", "first") in PAGE_RULES,
          f"preprocess.pages must be one of {', '.join(PAGE_RULES)}, got {preprocess.get('pages')!r}")
    intensity = preprocess.get("intensity_window")
    if intensity is None:
        return
    ok = isinstance(intensity, dict)
    try:
        Window(float(intensity["low"]), float(intensity["high"]))
    except (KeyError, TypeError, ValueError):
        ok = False
    check(ok, f"preprocess.intensity_window must be {{low, high}} with finite low < high, got {intensity!r}")


def sample(pixels: np.ndarray) -> np.ndarray:
    """Up to SAMPLES_PER_IMAGE of an image's intensities, at a fixed stride (reproducible)."""
    flat = np.asarray(pixels, dtype=np.float32).reshape(-1)
    step = max(1, len(flat) // SAMPLES_PER_IMAGE)
    return flat[::step][:SAMPLES_PER_IMAGE].copy()


def measure(samples: list[np.ndarray], low_percentile: float, high_percentile: float) -> tuple[Window, str | None]:
    """The window of a data set from its images' samples: the two percentiles of all of them
    pooled (each image weighs the same). A degenerate window (every intensity equal) is widened
    by one unit, with a note saying so."""
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples])
    low, high = (float(v) for v in np.percentile(pooled, [low_percentile, high_percentile]))
    note = None
    if not high > low:
        low, high = float(pooled.min()), float(pooled.max())
    if not high > low:
        note = f"every training image has the same intensity {low:g}: the window is [{low:g}, {low + 1:g}]"
        high = low + 1.0
    return Window(low, high), note


@dataclass
class HighBit:
    """What `decode` records about a set with high-bit-depth images: each image's bit depth
    ("8-bit", "16-bit PNG", "12-bit DICOM", ...) and, for the images still waiting for the data
    set's window (train, before it is measured), a sample of their intensities by row, and their
    decoded intensities while they fit the memory budget (the others are decoded again)."""

    depths: list[str]
    samples: dict[int, np.ndarray] = field(default_factory=dict)
    pixels: dict[int, tuple] = field(default_factory=dict)  # row -> (intensities, own window, depth)

    def subset(self, index) -> "HighBit":
        where = {int(old): new for new, old in enumerate(index)}
        return HighBit([self.depths[int(i)] for i in index],
                       {where[r]: s for r, s in self.samples.items() if r in where},
                       {where[r]: p for r, p in self.pixels.items() if r in where})

    @staticmethod
    def concat(parts: list["HighBit | None"], lengths: list[int]) -> "HighBit | None":
        """The parts of consecutive sets (of `lengths` images) as one; None when none has any."""
        if all(p is None for p in parts):
            return None
        depths, samples, offset = [], {}, 0
        for part, n in zip(parts, lengths):
            depths += part.depths if part is not None else ["8-bit"] * n
            samples.update({offset + r: s for r, s in (part.samples.items() if part is not None else ())})
            offset += n
        return HighBit(depths, samples)


def with_window(rules: Rules, window: Window | None, measured: dict) -> Rules:
    return replace(rules, window=window, measured=measured)


def graph_window(meta: dict) -> Window | None:
    """The window an exported graph holds (its metadata's preprocess), or None for uint8 input."""
    preprocess = meta["preprocess"]
    if preprocess.get("dtype", "uint8") == "uint8":
        return None
    rules = Rules.from_meta(preprocess)
    if rules.window is None:
        raise RunError("the export's input is float32 intensities but its metadata has no intensity window")
    return rules.window
