"""High-bit-depth and multi-page TIFF through tifffile.

Pillow reads 8-bit TIFF (kept as it was: those images decode exactly as before) and single-channel
16/32-bit TIFF, but a 16-bit RGB TIFF comes out of Pillow as 8-bit RGB with the low byte dropped,
and float64, 2-channel, 12-bit-packed or >4-channel TIFF not at all; tifffile reads every one of
them as its real numbers. So a TIFF whose samples are wider than 8 bits goes through tifffile;
when its compression needs the optional `imagecodecs` package (LZW, JPEG, ...), a grey image falls
back on Pillow (which decodes those), anything else is refused with the line to install it.

Channels: 1 (grey), 1 + alpha (grey; the alpha is ignored), 3 (RGB), 3 + alpha (RGB; the alpha is
ignored: compositing on white has no meaning before the window); any other count is refused.
MINISWHITE is inverted over the range the samples can hold; a palette image goes through its
colour map; the TIFF Orientation tag is applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..utils.errors import ImageError
from ..utils.files import head


class UsePillow(Exception):
    """tifffile cannot decode this compression without imagecodecs, but Pillow reads the image."""


@dataclass
class Tiff:
    pixels: np.ndarray  # float32 (H, W, C), C 1 or 3
    depth: str
    pages: int


def sniff(source) -> bool:
    """Whether `source` (a path or a binary file object) starts like a TIFF (classic or BigTIFF)."""
    return head(source, 4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


ORIENTATIONS = {  # TIFF/EXIF orientation -> the array operation that shows the image upright
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a.swapaxes(0, 1), 2),
    8: lambda a: np.rot90(a, 1),
}


def read(source, max_pixels: int, pages: str = "first", pillow_can: bool = False) -> Tiff:
    """The first page of a TIFF as float32 intensities. `pillow_can`: Pillow reads this image
    correctly (raise UsePillow rather than refuse when a codec is missing)."""
    import tifffile

    try:
        with tifffile.TiffFile(source) as tif:
            series = tif.series[0]
            page = series.pages[0] if series.pages else tif.pages[0]
            shape = page.shape
            count = max(1, int(np.prod(series.shape)) // max(1, int(np.prod(shape))))
            if count > 1 and pages == "refuse":
                raise ImageError(f"multi-page TIFF ({count} pages): refused by the page rule (pages=first reads the first)")
            height, width = int(page.imagelength), int(page.imagewidth)
            if height * width > max_pixels:
                raise ImageError(f"too many pixels: {width}x{height} > {max_pixels} (decompression bomb guard)", "size")
            samples = int(page.samplesperpixel)
            alpha = sum(1 for kind in (page.extrasamples or ()) if int(kind) in (1, 2))  # associated, unassociated
            colour = samples - alpha
            photometric = page.photometric.name
            if photometric not in ("MINISBLACK", "MINISWHITE", "RGB", "PALETTE") or colour not in (1, 3) or alpha > 1:
                raise ImageError(f"{samples}-channel {photometric} TIFF ({page.dtype}): only grey, grey + alpha, RGB or "
                                 "RGBA are read at more than 8 bits; save each channel as its own grey image, or as RGB")
            try:
                array = page.asarray()
            except ValueError as exc:
                if "imagecodecs" not in str(exc):
                    raise
                if pillow_can:
                    raise UsePillow() from None
                raise ImageError(f"TIFF compressed as {page.compression.name}: decoding it needs the imagecodecs "
                                 "package (pip install imagecodecs)") from None
            colormap = page.colormap
            orientation = int(getattr(page.tags.get(274), "value", 1) or 1)
            bits, kind = int(page.bitspersample), page.dtype.kind
    except (ImageError, UsePillow):
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, struct errors...
        raise ImageError(f"unreadable TIFF ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    array = np.asarray(array).reshape(height, width, samples)[..., :colour]
    if photometric == "PALETTE":
        if colormap is None:
            raise ImageError("palette TIFF without a colour map")
        array = np.moveaxis(np.asarray(colormap)[:, array[..., 0]], 0, -1)
    pixels = array.astype(np.float32)
    if photometric == "MINISWHITE":
        top = {"u": float(2 ** bits - 1), "i": -1.0}.get(kind)  # the sum of the range's ends
        pixels = (float(np.nanmax(pixels) + np.nanmin(pixels)) if top is None else top) - pixels
    pixels = np.ascontiguousarray(ORIENTATIONS.get(orientation, lambda a: a)(pixels))
    name = {"f": f"{bits}-bit float", "i": f"{bits}-bit signed integer"}.get(kind, f"{bits}-bit")
    return Tiff(pixels, f"{name} TIFF", count)
