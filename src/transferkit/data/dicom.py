"""DICOM files (pydicom) as intensities: what the standard says a viewer shows, before windowing.

- The modality LUT is applied: Rescale Slope and Intercept (CT's Hounsfield units), or a Modality
  LUT Sequence.
- MONOCHROME1 (the minimum is white: many CR/DR images) is inverted over the range the stored bits
  can hold after the modality LUT, so that a higher intensity is always brighter and MONOCHROME1
  and MONOCHROME2 files of one kind share one window.
- The file's own Window Center/Width (the first pair, LINEAR as PS3.3 C.11.2.1.2.1 defines it;
  LINEAR_EXACT as its own formula; SIGMOID read as LINEAR) is returned beside the pixels: `--window
  dicom` uses it, the default ignores it (one window per data set).
- 8-bit grey or colour files without a rescale are 8-bit images (never windowed), as a PNG would be.
- Multi-frame files follow the page rule (first frame, or refused); files without pixel data, or
  compressed with a transfer syntax that no installed decoder reads, are refused with one line
  that says what to install.

Imports pydicom only when a DICOM file is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..utils.errors import ImageError
from ..utils.files import head
from .window import Window

SUFFIXES = (".dcm", ".dicom")
EXTRA = "pip install 'transferkit[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"


@dataclass
class Dicom:
    """One frame: uint8 (H, W, C) for an 8-bit file, else float32 intensities (H, W, C); C is 1 or 3."""

    pixels: np.ndarray
    depth: str
    own_window: Window | None
    frames: int


def sniff(source) -> bool:
    """Whether `source` (a path or a binary file object) starts with DICOM's preamble and 'DICM'."""
    data = head(source, 132)
    return len(data) == 132 and data[128:] == b"DICM"


def decoder_problem(uid) -> str | None:
    """Why pixel data in transfer syntax `uid` cannot be decoded here, or None when it can."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return (f"DICOM compressed as {uid.name} ({uid}): pydicom has no decoder for this transfer syntax; "
                "convert the file to an uncompressed or JPEG/JPEG 2000/RLE transfer syntax")
    if not decoder.is_available:
        return f"DICOM compressed as {uid.name} ({uid}): no decoder installed for it; {EXTRA}"
    return None


def read(source, max_pixels: int, pages: str = "first", forced: bool = False) -> Dicom:
    """The first (or only) frame of a DICOM file. ImageError with one line for anything that
    cannot be read as an image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(source, force=forced)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ImageError(f"unreadable DICOM file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                         "format") from None
    if forced and not any(k in ds for k in ("SOPClassUID", "PixelData", "Modality", "Rows")):
        raise ImageError("not an image (unrecognised format; not a DICOM file either)", "format")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("Modality") or "no SOP class"
        raise ImageError(f"DICOM file without pixel data ({what}): nothing to classify")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageError(f"DICOM header incomplete ({exc})") from None
    if rows * columns > max_pixels:
        raise ImageError(f"too many pixels: {columns}x{rows} > {max_pixels} (decompression bomb guard)", "size")
    if frames > 1 and pages == "refuse":
        raise ImageError(f"multi-frame DICOM ({frames} frames): refused by the page rule (pages=first reads the first)")
    if samples not in (1, 3):
        raise ImageError(f"DICOM with {samples} samples per pixel: only grey (1) or colour (3) is read")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_transfer_syntax:
        raise ImageError(f"DICOM with the transfer syntax {syntax}, which pydicom does not know (a newer compression?); "
                         "convert the file to an uncompressed or JPEG/JPEG 2000/RLE transfer syntax")
    if syntax is not None and syntax.is_compressed:
        problem = decoder_problem(syntax)
        if problem:
            raise ImageError(problem)
    try:
        from pydicom.pixels import pixel_array

        array = pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many types for a damaged stream
        raise ImageError(f"DICOM pixel data not decodable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    bits = int(ds.get("BitsStored", 8 * array.dtype.itemsize) or 8)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return Dicom(apply_color_lut(array[..., 0], ds).astype(np.float32), f"{bits}-bit palette DICOM", None, frames)
    if array.shape[-1] == 3:  # colour: pydicom gives RGB (YBR converted)
        if array.dtype == np.uint8:
            return Dicom(array, "8-bit", None, frames)  # as a PNG would be
        return Dicom(array.astype(np.float32), f"{bits}-bit colour DICOM", None, frames)
    return grey(ds, array, bits, photometric, frames)


def grey(ds, array: np.ndarray, bits: int, photometric: str, frames: int) -> Dicom:
    """A grey frame: modality LUT, MONOCHROME1 inverted, the file's own window."""
    from pydicom.pixels import apply_modality_lut

    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    rescaled = "ModalityLUTSequence" in ds or slope != 1 or intercept != 0
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    stored = (np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]) if signed else np.array([0, 2 ** bits - 1]))
    if array.dtype.kind == "f":  # float pixel data: no stored range, the modality LUT does not apply
        values, span = array.astype(np.float64), None
    else:
        values = apply_modality_lut(array, ds) if rescaled else array
        span = np.sort(np.asarray(apply_modality_lut(stored, ds) if rescaled else stored, dtype=np.float64))
    own = own_window(ds)
    mono1 = photometric == "MONOCHROME1"
    if mono1:
        reflect = float(span[0] + span[1]) if span is not None else float(np.nanmax(values) + np.nanmin(values))
        values = reflect - np.asarray(values, dtype=np.float64)
        own = None if own is None else Window(reflect - own.high, reflect - own.low)
    depth = f"{bits}-bit DICOM" + (" (rescaled)" if rescaled else "") + (" MONOCHROME1" if mono1 else "")
    if array.dtype == np.uint8 and not rescaled and bits <= 8:  # an 8-bit picture: as a PNG would be
        return Dicom(np.asarray(values).astype(np.uint8), "8-bit", own, frames)
    return Dicom(np.asarray(values, dtype=np.float32), depth, own, frames)


def own_window(ds) -> Window | None:
    """The file's first Window Center/Width pair as a window, or None."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    try:
        centre = float(centre[0] if not isinstance(centre, (int, float)) and len(centre) else centre)
        width = float(width[0] if not isinstance(width, (int, float)) and len(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not width > 0:
        return None
    if str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() == "LINEAR_EXACT":
        return Window(centre - width / 2, centre + width / 2)
    return Window.from_dicom(centre, width)
