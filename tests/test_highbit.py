"""High-bit-depth images (issue 27): one intensity window per data set, DICOM, multi-page TIFF.

Real images only, converted: scikit-image's real photographs and micrographs, LFW's faces and ELPV's
solar cells written as 12-bit values in 16-bit PNGs (v x 16), as a narrow-band 16-bit signal
(30,000 + 4v), as DICOM (MONOCHROME1/2, rescale slope/intercept, compressed) and as TIFF."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from conftest import SIZE, lfw_arrays
from transferkit.data.decode import decode, display_image, fill, load_image, read_image, read_pixels, settle
from transferkit.data.listing import load_labelled
from transferkit.data.window import SAMPLES_PER_IMAGE, Rules, Window, check_meta, measure, sample
from transferkit.utils.errors import DataError, ImageError


def real_grey() -> dict[str, np.ndarray]:
    """Real 8-bit grey pictures: a photograph, the moon, coins, a micrograph, a retina detail."""
    from skimage import data

    return {"camera": data.camera()[::2, ::2], "moon": data.moon()[::2, ::2], "coins": data.coins(),
            "cell": data.cell()[::2, ::2], "microaneurysms": data.microaneurysms()}


def twelve_bit(a: np.ndarray) -> np.ndarray:
    return a.astype(np.uint16) * 16


def narrow_band(a: np.ndarray) -> np.ndarray:
    return (30000 + 4 * a.astype(np.int64)).astype(np.uint16)


# --- the decoding before this change, verbatim: 8-bit images must decode exactly as it did ----------

def old_to_rgb(image: Image.Image) -> Image.Image:
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


def old_load_image(path, size: int, draft: bool = True) -> np.ndarray:
    with Image.open(path) as image:
        if draft and image.format == "JPEG":
            image.draft("RGB", (size * 2, size * 2))
        image.load()
        rgb = old_to_rgb(ImageOps.exif_transpose(image)).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def eight_bit_files(root: Path) -> list[Path]:
    """Real 8-bit pictures in every 8-bit mode and format Pillow reads, multi-page TIFF included."""
    from skimage import data

    grey, colour = data.camera()[::4, ::4], data.astronaut()[::4, ::4]
    root.mkdir(parents=True, exist_ok=True)
    pictures = {"L": Image.fromarray(grey), "RGB": Image.fromarray(colour)}
    pictures["RGBA"] = Image.fromarray(np.dstack([colour, grey]), "RGBA")
    pictures["LA"] = Image.fromarray(np.dstack([grey, grey[::-1]]), "LA")
    pictures["P"] = pictures["RGB"].quantize(64)
    pictures["1"] = pictures["L"].convert("1")
    files = []
    for mode, picture in pictures.items():
        for fmt, suffix in (("PNG", ".png"), ("TIFF", ".tif"), ("GIF", ".gif"), ("BMP", ".bmp"), ("WEBP", ".webp"),
                            ("JPEG", ".jpg")):
            if fmt == "JPEG" and mode not in ("L", "RGB") or fmt == "BMP" and mode in ("LA", "RGBA") \
                    or fmt == "WEBP" and mode in ("1", "P", "LA"):
                continue
            path = root / f"{mode}{suffix}"
            picture.save(path, fmt)
            files.append(path)
    pictures["RGB"].convert("CMYK").save(root / "cmyk.tif")
    pictures["L"].save(root / "grey.pgm")
    pictures["L"].save(root / "pages.tif", save_all=True, append_images=[pictures["L"].rotate(90)])
    exif = Image.Exif()
    exif[0x0112] = 6
    pictures["RGB"].save(root / "rotated.jpg", exif=exif.tobytes(), quality=90)
    return files + [root / "cmyk.tif", root / "grey.pgm", root / "pages.tif", root / "rotated.jpg"]


def test_8bit_images_decode_exactly_as_before(tmp_path):
    files = eight_bit_files(tmp_path)
    for path in files:
        for size, draft in ((32, True), (64, True), (64, False)):
            before = old_load_image(path, size, draft)
            assert np.array_equal(load_image(path, size, draft), before), path.name
            # a model with an intensity window leaves 8-bit images alone
            assert np.array_equal(load_image(path, size, draft, Rules(Window(30000, 31000))), before), path.name


def test_8bit_data_sets_decode_to_the_same_arrays_and_keys_as_before(tmp_path):
    from skimage import data

    for k, picture in enumerate([data.camera(), data.coins(), data.moon(), data.astronaut(), data.coffee()]):
        for i in range(3):
            folder = tmp_path / ("a" if k % 2 else "b")
            folder.mkdir(exist_ok=True)
            Image.fromarray(np.asarray(picture)[i * 40:i * 40 + 200, i * 30:i * 30 + 200]).save(folder / f"{k}{i}.png")
    decoded = decode(load_labelled(tmp_path), 48)
    assert decoded.highbit is None and decoded._keys is None  # nothing new on the 8-bit path
    before = np.stack([old_load_image(p, 48) for p in decoded.paths])
    assert np.array_equal(decoded.images, before)


# --- the window ---------------------------------------------------------------------------------

def write_png16(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


@pytest.mark.parametrize("convert, window", [(twelve_bit, Window(0, 16 * 255)),
                                             (narrow_band, Window(30000, 30000 + 4 * 255))])
def test_12bit_and_narrow_band_images_decode_to_their_8bit_originals(tmp_path, convert, window):
    for name, picture in real_grey().items():
        original = tmp_path / f"{name}.png"
        Image.fromarray(picture).save(original)
        path = write_png16(tmp_path / f"{name}16.png", convert(picture))
        for size in (32, 64, 100):
            expected = load_image(original, size).astype(int)
            got = load_image(path, size, rules=Rules(window)).astype(int)
            assert np.abs(got - expected).max() <= 1, (name, size)
            # the decoding before this change: the type's maximum, 16 levels (12-bit) or 4 (narrow band)
            old = old_load_image(path, size).astype(int)
            assert np.abs(old - expected).max() > 30, name
            assert len(np.unique(old)) <= 16 < len(np.unique(got))


def test_the_measured_window_is_the_training_images_percentiles_and_maps_alike(tmp_path):
    pictures = list(real_grey().values())
    for name, convert in (("twelve", twelve_bit), ("narrow", narrow_band)):
        for i, picture in enumerate(pictures):
            (tmp_path / name / "c").mkdir(parents=True, exist_ok=True)
            write_png16(tmp_path / name / "c" / f"{i}.png", convert(picture))
    windows, images = {}, {}
    for name in ("twelve", "narrow"):
        data = decode(load_labelled(tmp_path / name, task="multiclass"), 64, defer=True)
        assert data.highbit is not None and sorted(data.highbit.samples) == list(range(len(pictures)))
        assert not data.images.any()  # waiting for the window
        train_rows = np.arange(3)
        rules, notes = settle(data, train_rows, Rules(), 0.5, 99.5)
        pooled = np.concatenate([sample(read_pixels(data.paths[r], 64).array) for r in train_rows])
        assert (rules.window.low, rules.window.high) == tuple(np.percentile(pooled.astype(np.float64), [0.5, 99.5]))
        assert rules.measured["images"] == 3 and "Intensity window" in notes[0]
        assert len(data.highbit.pixels) == len(pictures)  # kept in memory: no second reading
        fill(data, rules, 64)
        windows[name], images[name] = rules.window, data.images.copy()
        assert data._keys is None and data.highbit.samples == {} and data.highbit.pixels == {}
        # no room to keep them (a memmap past the budget): decoded again, the same images
        tight = decode(load_labelled(tmp_path / name, task="multiclass"), 64, defer=True, budget=0,
                       spill_dir=tmp_path / "spill")
        assert not tight.highbit.pixels
        assert np.array_equal(fill(tight, rules, 64).images, images[name])
    # 16v and 30000 + 4v are the same picture: the same window relative to the signal, the same images
    assert windows["narrow"].low - 30000 == pytest.approx(windows["twelve"].low / 4, abs=0.02)
    assert np.abs(images["narrow"].astype(int) - images["twelve"]).max() <= 1


def test_window_arithmetic_invert_and_round_trip_through_model_json():
    for window in (Window(0, 4095), Window(30000, 31020), Window(-1024, 3071), Window(0.001, 0.25),
                   Window(60000.5, 60255.5)):
        assert window.exact_inverse(), window
        levels = np.arange(256, dtype=np.uint8)[None, :, None]
        assert np.array_equal(window.apply(window.invert(levels)), np.repeat(levels, 3, -1))
    rules = Rules(Window(30000.0, 30981.59375), "dicom", "refuse", {"percentiles": [0.5, 99.5], "images": 112})
    meta = json.loads(json.dumps({"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, **rules.to_meta()}))
    assert Rules.from_meta(meta) == rules
    assert Rules.from_meta({"image_size": 64}) == Rules()  # a run written before windows: none
    problems = []
    check_meta({**meta, "intensity_window": {"low": 5, "high": 5}}, lambda ok, m: ok or problems.append(m))
    check_meta({**meta, "window": "type"}, lambda ok, m: ok or problems.append(m))
    assert len(problems) == 2 and "finite low < high" in problems[0] and "window must be one of" in problems[1]
    with pytest.raises(ValueError):
        Window(3.0, 3.0)
    window, note = measure([np.full(10, 7.0)], 0.5, 99.5)
    assert (window.low, window.high) == (7.0, 8.0) and "same intensity" in note
    assert len(sample(np.zeros((300, 300, 3)))) == SAMPLES_PER_IMAGE


def test_a_high_bit_image_for_an_8bit_model_is_refused_in_one_line(tmp_path):
    path = write_png16(tmp_path / "x.png", twelve_bit(real_grey()["coins"]))
    with pytest.raises(ImageError, match="16-bit PNG image, but this model was trained on 8-bit images only"):
        load_image(path, 32)
    data = decode(load_labelled_one(tmp_path, path), 32)
    assert len(data) == 0 and "trained on 8-bit images only" in data.skipped[0][1]


def load_labelled_one(tmp_path: Path, path: Path):
    (tmp_path / "set" / "c").mkdir(parents=True, exist_ok=True)
    target = tmp_path / "set" / "c" / path.name
    target.write_bytes(path.read_bytes())
    return load_labelled(tmp_path / "set")


def test_mixed_bit_depths_get_one_note_and_one_window(tmp_path):
    pictures = list(real_grey().values())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / "a" / f"{i}.png")
        write_png16(tmp_path / "b" / f"{i}.png", twelve_bit(picture))
    data = decode(load_labelled(tmp_path), 32, defer=True)
    rules, notes = settle(data, np.arange(len(data)), Rules(), 0.5, 99.5)
    mixed = [n for n in notes if "mixed bit depths" in n]
    assert len(mixed) == 1 and "5 8-bit image(s) are used as they are, 16-bit PNG: 5 go through" in mixed[0]
    assert rules.measured["images"] == 5  # the window is the 16-bit images' (8-bit ones are never windowed)


# --- TIFF ---------------------------------------------------------------------------------------

def test_tiff_depths_channels_pages_and_orientation(tmp_path):
    import tifffile

    from skimage import data

    colour = data.astronaut()[::4, ::4].astype(np.uint16) * 16  # 12-bit values in a 16-bit RGB TIFF
    tifffile.imwrite(tmp_path / "rgb16.tif", colour, photometric="rgb")
    pillow = np.asarray(Image.open(tmp_path / "rgb16.tif"))  # what Pillow alone makes of it: the top byte
    assert pillow.dtype == np.uint8 and pillow.max() <= 15
    got = read_pixels(tmp_path / "rgb16.tif", 128)
    assert got.depth == "16-bit TIFF" and got.array.shape == (128, 128, 3)
    assert np.array_equal(got.array, colour.astype(np.float32))  # 128 px: no resampling
    assert np.array_equal(load_image(tmp_path / "rgb16.tif", 128, rules=Rules(Window(0, 4080))),
                          data.astronaut()[::4, ::4])

    grey = real_grey()["cell"]
    tifffile.imwrite(tmp_path / "f64.tif", grey.astype(np.float64) / 255)  # Pillow cannot open float64
    with pytest.raises(UnidentifiedImageError):
        Image.open(tmp_path / "f64.tif")
    assert np.abs(load_image(tmp_path / "f64.tif", 64, rules=Rules(Window(0, 1))).astype(int)
                  - load_image_of(grey, tmp_path, 64)).max() <= 1

    stack = np.stack([twelve_bit(grey), twelve_bit(grey[::-1])])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    first = read_pixels(tmp_path / "stack.tif", 64)
    assert first.pages == 2 and np.array_equal(first.array, read_pixels(write_tiff(tmp_path, stack[0]), 64).array)
    with pytest.raises(ImageError, match=r"multi-page TIFF \(2 pages\): refused by the page rule"):
        read_pixels(tmp_path / "stack.tif", 64, pages="refuse")

    tifffile.imwrite(tmp_path / "two.tif", np.dstack([stack[0], stack[1]]), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(ImageError, match="2-channel MINISBLACK TIFF .* only grey, grey \\+ alpha, RGB or RGBA"):
        read_pixels(tmp_path / "two.tif", 64)
    tifffile.imwrite(tmp_path / "five.tif", np.dstack([stack[0]] * 5), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageError, match="5-channel"):
        read_pixels(tmp_path / "five.tif", 64)

    Image.fromarray(stack[0]).save(tmp_path / "lzw.tif", compression="tiff_lzw")  # tifffile needs imagecodecs
    assert np.array_equal(read_pixels(tmp_path / "lzw.tif", 64).array, first.array)

    tifffile.imwrite(tmp_path / "turned.tif", np.ascontiguousarray(np.rot90(stack[0])), extratags=[(274, 3, 1, 6, True)])
    assert np.array_equal(read_pixels(tmp_path / "turned.tif", 64).array, first.array)

    nan = stack[0].astype(np.float32)
    nan[:10] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    assert np.isfinite(read_pixels(tmp_path / "nan.tif", 64).array).all()


def write_tiff(tmp_path: Path, array: np.ndarray) -> Path:
    import tifffile

    tifffile.imwrite(tmp_path / "one.tif", array, photometric="minisblack")
    return tmp_path / "one.tif"


def load_image_of(picture: np.ndarray, tmp_path: Path, size: int) -> np.ndarray:
    Image.fromarray(picture).save(tmp_path / "ref.png")
    return load_image(tmp_path / "ref.png", size).astype(int)


def test_multi_page_files_follow_the_page_rule_with_one_note(tmp_path):
    import tifffile

    grey = real_grey()["moon"]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            tifffile.imwrite(tmp_path / folder / f"{i}.tif", np.stack([twelve_bit(grey)] * 3), photometric="minisblack")
    data = decode(load_labelled(tmp_path), 32, rules=Rules(Window(0, 4080)))
    assert len(data) == 4 and any(n.startswith("4 multi-page file(s)") and "(3 pages)" in n for n in data.notes)
    refused = decode(load_labelled(tmp_path), 32, rules=Rules(Window(0, 4080), pages="refuse"))
    assert len(refused) == 0 and all("refused by the page rule" in r for _, r in refused.skipped)


def test_16bit_colour_png_is_refused_in_one_line(tmp_path):
    import struct
    import zlib

    colour = real_grey()["coins"][:20, :20, None].repeat(3, -1).astype(np.uint16) * 16
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in colour)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 20, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    with pytest.raises(ImageError, match="16-bit RGB PNG: Pillow reads only the top 8 bits"):
        load_image(tmp_path / "rgb16.png", 16, rules=Rules(Window(0, 4095)))


# --- DICOM --------------------------------------------------------------------------------------

def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                slope: float | None = None, intercept: float | None = None, centre=None, width=None,
                syntax=None, preamble: bool = True) -> Path:
    """A Secondary Capture DICOM file of `stored` values, as a scanner would write it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "OT", "Test^Real"
    ds.set_pixel_data(stored, photometric, bits)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if centre is not None:
        ds.WindowCenter, ds.WindowWidth = centre, width
    if syntax is not None:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def test_dicom_rescale_monochrome1_compression_and_frames(tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    picture = real_grey()["cell"]
    values = twelve_bit(picture)
    png = write_png16(tmp_path / "twin.png", values)
    expected = read_pixels(png, 64).array
    plain = read_pixels(write_dicom(tmp_path / "m2.dcm", values), 64)
    assert plain.depth == "12-bit DICOM" and np.array_equal(plain.array, expected)
    mono1 = read_pixels(write_dicom(tmp_path / "m1.dcm", 4095 - values, "MONOCHROME1"), 64)
    assert np.array_equal(mono1.array, expected) and "MONOCHROME1" in mono1.depth  # inverted back
    # CT-like: stored (v + 1024) / 2 with slope 2 and intercept -1024 gives back v
    rescaled = read_pixels(write_dicom(tmp_path / "ct.dcm", ((values.astype(int) + 1024) // 2).astype(np.uint16),
                                       slope=2, intercept=-1024), 64)
    assert "rescaled" in rescaled.depth and np.array_equal(rescaled.array, expected)
    for syntax in (JPEG2000Lossless, RLELossless):
        compressed = read_pixels(write_dicom(tmp_path / f"{syntax.name[:4]}.dcm", values, syntax=syntax), 64)
        assert np.array_equal(compressed.array, expected), syntax.name
    frames = read_pixels(write_dicom(tmp_path / "mf.dcm", np.stack([values, values[::-1]])), 64)
    assert frames.pages == 2 and np.array_equal(frames.array, expected)
    with pytest.raises(ImageError, match=r"multi-frame DICOM \(2 frames\): refused by the page rule"):
        read_pixels(tmp_path / "mf.dcm", 64, pages="refuse")
    bare = read_pixels(write_dicom(tmp_path / "bare.dcm", values, preamble=False), 64)  # no 'DICM' mark
    assert np.array_equal(bare.array, expected)
    eight = read_pixels(write_dicom(tmp_path / "eight.dcm", picture, bits=8), 64)  # 8-bit: as a PNG would be
    assert eight.depth == "8-bit" and np.array_equal(eight.array, load_image_of(picture, tmp_path, 64))
    uploaded = read_image(io.BytesIO((tmp_path / "m1.dcm").read_bytes()), 64, rules=Rules(Window(0, 4080)))
    assert np.array_equal(uploaded, Window(0, 4080).apply(expected))


def test_dicom_own_window_only_with_window_dicom(tmp_path):
    values = twelve_bit(real_grey()["coins"])
    path = write_dicom(tmp_path / "w.dcm", values, centre=1500, width=1001)
    pixels = read_pixels(path, 32)
    assert (pixels.own_window.low, pixels.own_window.high) == (999.5, 1499.5 + 500)
    with pytest.raises(ImageError, match="without a window of its own, and this model has no data set window"):
        read_image(write_dicom(tmp_path / "none.dcm", values), 32, rules=Rules(None, "dicom"))
    data_window = Window(0, 4080)
    assert np.array_equal(read_image(path, 32, rules=Rules(data_window)), data_window.apply(pixels.array))
    assert np.array_equal(read_image(path, 32, rules=Rules(data_window, "dicom")), pixels.own_window.apply(pixels.array))
    # MONOCHROME1 with the mirrored window shows the same picture (DICOM's window is half a unit off-centre)
    mono1 = read_pixels(write_dicom(tmp_path / "w1.dcm", 4095 - values, "MONOCHROME1", centre=4095 - 1500, width=1001), 32)
    assert (mono1.own_window.low, mono1.own_window.high) == (1000.5, 2000.5)
    assert np.abs(mono1.own_window.apply(mono1.array).astype(int) - pixels.own_window.apply(pixels.array)).max() <= 1


def test_bad_dicom_files_are_skipped_with_their_reason(tmp_path, monkeypatch):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    import transferkit.data.dicom as dicom

    root = tmp_path / "set" / "c"
    root.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR: no pixels
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID, report.SOPInstanceUID, report.Modality = meta.MediaStorageSOPClassUID, generate_uid(), "SR"
    report.save_as(root / "report.dcm", enforce_file_format=True)
    values = twelve_bit(real_grey()["coins"])
    write_dicom(root / "good.dcm", values)
    video = write_dicom(root / "mpeg2.dcm", values)  # then as if compressed as MPEG-2: nothing here decodes it
    ds = pydicom.dcmread(video)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    ds.PixelData = encapsulate([b"\xff\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(video, enforce_file_format=True)
    # JPEG XL (1.2.840.10008.1.2.4.110), a syntax newer than this pydicom: the same bytes, another UID
    (root / "jxl.dcm").write_bytes(video.read_bytes().replace(b"1.2.840.10008.1.2.4.100", b"1.2.840.10008.1.2.4.110"))
    (root / "fake.dcm").write_bytes(b"not a dicom file at all")
    data = decode(load_labelled(tmp_path / "set"), 32, rules=Rules(Window(0, 4080)))
    reasons = {Path(p).name: r for p, r in data.skipped}
    assert len(data) == 1 and set(reasons) == {"report.dcm", "mpeg2.dcm", "jxl.dcm", "fake.dcm"}
    assert reasons["report.dcm"] == "DICOM file without pixel data (Basic Text SR Storage): nothing to classify"
    assert reasons["mpeg2.dcm"].startswith("DICOM compressed as MPEG2") and "no decoder for this" in reasons["mpeg2.dcm"]
    assert reasons["jxl.dcm"].startswith("DICOM with the transfer syntax 1.2.840.10008.1.2.4.110, which pydicom does")
    assert reasons["fake.dcm"].startswith("not an image")
    assert all("\n" not in r for r in reasons.values())

    class Missing:  # a decoder whose packages are not installed (pylibjpeg-libjpeg, say)
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing())
    from pydicom.uid import JPEGLSLossless

    assert dicom.decoder_problem(JPEGLSLossless) == (
        "DICOM compressed as JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80): no decoder installed for "
        "it; pip install 'transferkit[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)")


def test_display_is_windowed_not_black(tmp_path):
    picture = real_grey()["camera"]
    path = write_png16(tmp_path / "x.png", twelve_bit(picture))
    shown = np.asarray(display_image(path, 128, Rules(Window(0, 4080)))).astype(int)
    assert shown.shape == (128, 128, 3) and np.abs(shown.mean() - picture.mean()) < 3
    alone = np.asarray(display_image(path, 128)).astype(int)  # no window yet: the image's own, for the eye
    assert alone.std() > 40
    assert np.asarray(old_to_rgb(Image.open(path))).max() <= 16  # what a viewer dividing by 65,535 shows


# --- train, predict, export, serve, label on 16-bit data ----------------------------------------

def write_sets(root: Path) -> dict[str, Path]:
    """LFW's real faces and backgrounds (train 70 + 70, test 30 + 30) as 8-bit PNG, 12-bit values in
    16-bit PNG and a narrow band 30,000 + 4v."""
    images, labels = lfw_arrays()
    sets = {}
    for name, convert in (("8bit", lambda a: a), ("12bit", twelve_bit), ("narrow", narrow_band)):
        for split, part in (("train", slice(0, 70)), ("test", slice(70, 100))):
            for cls, label in (("face", 1), ("background", 0)):
                folder = root / name / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i, picture in enumerate(images[labels == label][part]):
                    Image.fromarray(convert(picture)).save(folder / f"{i:03d}.png")
        sets[name] = root / name
    return sets


@pytest.fixture(scope="module")
def highbit_runs(tmp_path_factory):
    import transferkit

    root = tmp_path_factory.mktemp("highbit")
    sets = write_sets(root)
    runs = {}
    for name, folder in sets.items():
        out = root / f"run-{name}"
        classifier = transferkit.train(folder / "train", out, image_size=SIZE, preset="fast", epochs=8,
                                       batch_size=16, seed=1)
        runs[name] = (classifier, out, folder)
    return runs


@pytest.mark.slow
def test_12bit_and_narrow_band_train_and_predict_as_their_8bit_originals(highbit_runs):
    accuracy = {name: c.evaluate(folder / "test")["accuracy"] for name, (c, _, folder) in highbit_runs.items()}
    for name in ("12bit", "narrow"):  # 60 test images: within two of them (the old decoding: 93 % and 55 %)
        assert accuracy[name] >= accuracy["8bit"] - 2 / 60, accuracy
    meta = {name: json.loads((out / "model.json").read_text()) for name, (_, out, _) in highbit_runs.items()}
    assert meta["8bit"]["preprocess"]["intensity_window"] is None
    window = meta["narrow"]["preprocess"]["intensity_window"]
    assert 30000 <= window["low"] < window["high"] <= 31020 and window["depths"] == {"16-bit PNG": 112}
    assert window["images"] == 112  # the training images: 140 minus the validation split's 28
    classifier, out, folder = highbit_runs["narrow"]
    from transferkit.predict.run import load

    loaded = load(out)
    assert loaded.rules.window == classifier.rules.window == Rules.from_meta(meta["narrow"]["preprocess"]).window
    files = sorted(str(p) for p in (folder / "test").rglob("*.png"))
    streamed = {r["path"]: r["probabilities"] for r in loaded.predict_files(files)}
    data = loaded.read_labelled(folder / "test")
    probs = loaded.predict_proba(data.images)
    for path, p in zip(data.paths, probs):
        assert np.allclose(list(streamed[path].values()), p, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_holds_the_window_and_equals_pytorch_on_16bit_input(highbit_runs, tmp_path):
    import shutil

    from transferkit.data.decode import iter_pixels
    from transferkit.deploy.export import export
    from transferkit.predict.onnx_engine import OnnxClassifier, read_metadata

    _, out, folder = highbit_runs["narrow"]
    run = tmp_path / "run"
    shutil.copytree(out, run)
    export(run)
    meta = read_metadata(run / "model.onnx")
    assert meta["preprocess"]["dtype"] == "float32" and meta["preprocess"]["intensity_window"]["low"] >= 30000
    from transferkit.predict.run import load

    torch_engine, onnx_engine = load(run), OnnxClassifier(run / "model.onnx")
    assert onnx_engine.session.get_inputs()[0].type == "tensor(float)"
    data = torch_engine.read_labelled(folder / "test")
    expected = torch_engine.predict_proba(data.images)
    # the raw 16-bit intensities, resized as transferkit resizes them, straight into the graph
    raw = np.stack([np.repeat(p.array, 3, -1) for _, p in iter_pixels(data.paths, SIZE)])
    assert raw.min() >= 29000 and raw.dtype == np.float32
    direct = onnx_engine.session.run(None, {onnx_engine.input_name: raw})[0]
    assert np.abs(direct - expected).max() < 1e-4
    assert np.abs(onnx_engine.predict_proba(data.images) - expected).max() < 1e-4  # the engine's own path
    streamed = [r["probabilities"] for r in onnx_engine.predict_files(data.paths)]
    assert np.abs(np.array([list(p.values()) for p in streamed]) - expected).max() < 1e-4


@pytest.mark.slow
def test_dicom_twins_predict_as_their_png_twins(highbit_runs, tmp_path):
    classifier, _, folder = highbit_runs["12bit"]
    pngs = sorted((folder / "test").rglob("*.png"))[::6]
    dicoms = []
    for i, png in enumerate(pngs):
        values = np.asarray(Image.open(png)).astype(np.uint16)
        dicoms.append(write_dicom(tmp_path / f"{i}-m2.dcm", values))
        dicoms.append(write_dicom(tmp_path / f"{i}-m1.dcm", 4095 - values, "MONOCHROME1"))
        dicoms.append(write_dicom(tmp_path / f"{i}-ct.dcm", ((values.astype(int) + 1024) // 2).astype(np.uint16),
                                  slope=2, intercept=-1024))
    twins = {r["path"]: r["probabilities"] for r in classifier.predict_files([str(p) for p in pngs])}
    for record, path in zip(classifier.predict_files([str(d) for d in dicoms]), dicoms):
        assert "error" not in record, record
        twin = twins[str(pngs[int(path.name.split("-")[0])])]
        assert np.allclose(list(record["probabilities"].values()), list(twin.values()), atol=1e-6), path.name


@pytest.mark.slow
def test_serve_takes_16bit_png_and_dicom_uploads_through_the_window(highbit_runs, tmp_path):
    from fastapi.testclient import TestClient

    from transferkit.apps.serve import create_app

    classifier, out, folder = highbit_runs["12bit"]
    png = sorted((folder / "test" / "face").glob("*.png"))[0]
    dcm = write_dicom(tmp_path / "face.dcm", np.asarray(Image.open(png)).astype(np.uint16))
    expected = next(classifier.predict_files([str(png)]))["probabilities"]
    with TestClient(create_app(out, engine="torch")) as client:
        for path in (png, dcm):
            response = client.post("/predict", files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 200, response.text
            assert np.allclose(list(response.json()["probabilities"].values()), list(expected.values()), atol=1e-6)
    _, eight_out, _ = highbit_runs["8bit"]
    with TestClient(create_app(eight_out, engine="torch")) as client:  # an 8-bit model: a clear 422
        response = client.post("/predict", files={"file": (png.name, png.read_bytes())})
        assert response.status_code == 422 and "trained on 8-bit images only" in response.json()["error"]


@pytest.mark.slow
def test_labelling_page_measures_the_pools_window_and_shows_images_windowed(highbit_runs, tmp_path):
    from transferkit.apps.label import Featurizer, display_jpeg, extract_pool, list_pool

    _, out, folder = highbit_runs["narrow"]
    files, _ = list_pool(folder / "test", set())
    alone = Featurizer.build(image_size=SIZE, cache_dir="")
    kept, features, skipped = extract_pool(alone, files)
    assert len(kept) == len(files) and not skipped and alone.rules.window is not None
    assert alone.rules.measured["measured_on"] == "the pool" and 30000 <= alone.rules.window.low
    with_run = Featurizer.build(run=out, cache_dir="")
    assert with_run.rules.window == Rules.from_meta(json.loads((out / "model.json").read_text())["preprocess"]).window
    kept, features, skipped = extract_pool(with_run, files)
    assert len(kept) == len(files) and not skipped
    shown = np.asarray(Image.open(io.BytesIO(display_jpeg(files[0], 64, with_run.rules)))).astype(int)
    original = np.asarray(Image.open(str(files[0]).replace("narrow", "8bit"))).astype(int)
    assert abs(shown.mean() - original.mean()) < 25 and shown.std() > 10  # windowed, not black


@pytest.mark.slow
def test_report_shows_the_images_as_the_model_sees_them(highbit_runs):
    _, out, _ = highbit_runs["12bit"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    meta = json.loads((out / "model.json").read_text())
    assert meta["preprocess"]["window"] == "data" and meta["preprocess"]["pages"] == "first"


def test_evaluate_refuses_nothing_silently(tmp_path):
    """A folder of 16-bit images for a model with no window: every file skipped with the reason."""
    (tmp_path / "c").mkdir()
    write_png16(tmp_path / "c" / "a.png", twelve_bit(real_grey()["coins"]))
    with pytest.raises(DataError, match="no usable images .* trained on 8-bit images only"):
        from transferkit.data.decode import decode_source

        decode_source(tmp_path, 32)
