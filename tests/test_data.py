"""Data sources, decoding of every image mode and format, bad files, and the split."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import lfw_arrays
from PIL import Image

from transferkit.data.decode import decode, load_image
from transferkit.data.window import Rules, Window
from transferkit.data.listing import LabelledImages, check_labels, from_csv, load_labelled
from transferkit.data.split import stratified_split
from transferkit.utils.errors import DataError, ImageError


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return np.stack([lfw_arrays()[0][0]] * 3, axis=-1)  # a real face, 25x25 RGB


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, face, mode):
    image = Image.fromarray(face).convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        image = Image.fromarray(face[..., 0].astype(np.uint16) * 257)  # 16-bit, full range
    elif mode in ("I", "F"):
        image = Image.fromarray(face[..., 0].astype(np.int32 if mode == "I" else np.float32))
    path = tmp_path / ("x.tif" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    image.save(path)
    # high-bit-depth modes go through an intensity window (a model's: test_highbit.py measures one)
    window = {"I;16": Window(0, 65535), "I": Window(0, 255), "F": Window(0, 255)}.get(mode)
    array = load_image(path, 32, rules=Rules(window))
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    reference = np.asarray(Image.fromarray(face).resize((32, 32), Image.Resampling.BILINEAR))
    if mode == "F":  # float images have no fixed range: stretched to 0..255, same picture
        assert np.corrcoef(array[..., 0].ravel(), reference[..., 0].ravel())[0, 1] > 0.99
        return
    tolerance = {"P": 16, "1": 128, "CMYK": 8}.get(mode, 4)  # palette dithering, 1-bit threshold
    assert np.abs(array.astype(int) - reference.astype(int)).mean() < tolerance, mode


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png", 8) == 255).all()


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("BMP", ".bmp"),
                                         ("TIFF", ".tif"), ("WEBP", ".webp"), ("GIF", ".gif")])
def test_common_formats(tmp_path, face, fmt, suffix):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(face).save(path, fmt)
    array = load_image(path, 25)
    assert np.abs(array.astype(int) - face.astype(int)).mean() < 12, fmt


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    pixel = load_image(tmp_path / "a.gif", 10)[5, 5]
    assert pixel[0] > 200 and pixel[2] < 50


def test_exif_orientation_is_applied(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(image).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    shown = load_image(tmp_path / "o.jpg", 40)
    assert shown[:20].mean() > 200 and shown[20:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, I am a text file\n", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "unreadable|not an image"),
])
def test_bad_files_raise_a_one_line_reason(tmp_path, content, reason):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(tmp_path / "bad.png", 16)
    assert "\n" not in str(info.value)


def test_truncated_image(tmp_path, face):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(face, (8, 8, 1))).save(buffer, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated|unreadable"):
        load_image(tmp_path / "t.jpg", 16)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png", 16)


def make_folder(root, face, extra=None):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(face).save(root / name / f"{i}.png")
    for relative, content in (extra or {}).items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return root


def test_bad_files_are_skipped_counted_and_listed(tmp_path, face):
    root = make_folder(tmp_path / "d", face, {
        "cat/empty.jpg": b"", "cat/notes.txt": b"text", "dog/broken.png": b"\x89PNG\r\n\x1a\nxx",
        "stray.png": b"x", "dog/.DS_Store": b"mac",
    })
    data = decode(load_labelled(root), 16)
    assert len(data) == 8 and data.images.shape == (8, 16, 16, 3)
    assert data.counts() == {"cat": 4, "dog": 4}
    reasons = dict(data.skipped)
    assert set(reasons) == {str(root / p) for p in ("cat/empty.jpg", "cat/notes.txt", "dog/broken.png", "stray.png")}
    assert reasons[str(root / "cat/empty.jpg")] == "empty file"
    assert reasons[str(root / "stray.png")] == "not inside a class folder"


def test_decoded_images_spill_to_disk_past_the_budget(tmp_path, face):
    root = make_folder(tmp_path / "d", face, {"cat/bad.png": b"x"})
    in_ram = decode(load_labelled(root), 16)
    spilled = decode(load_labelled(root), 16, spill_dir=tmp_path / "spill", budget=100)
    assert isinstance(spilled.images, np.memmap) and not isinstance(in_ram.images, np.memmap)
    assert np.array_equal(np.asarray(spilled.images), in_ram.images)


def test_csv_source(tmp_path, face):
    make_folder(tmp_path, face)
    (tmp_path / "list.csv").write_text("path,label\ncat/0.png,cat\ncat/1.png,cat\n"
                                       f"{tmp_path}/dog/0.png,dog\ndog/missing.png,dog\n,dog\n")
    data = decode(from_csv(tmp_path / "list.csv"), 16)
    assert data.classes == ["cat", "dog"] and data.counts() == {"cat": 2, "dog": 1}
    assert dict(data.skipped)[str(tmp_path / "dog/missing.png")] == "file not found"
    assert any("empty path" in reason for _, reason in data.skipped)
    (tmp_path / "bad.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(DataError, match="bad.csv: expected a header"):
        from_csv(tmp_path / "bad.csv")


def test_unusable_datasets_fail_before_training(tmp_path, face):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_labelled(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        load_labelled(tmp_path / "nope")
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    Image.fromarray(face).save(one / "a.png")
    with pytest.raises(DataError, match="only one class"):
        check_labels(decode(load_labelled(tmp_path / "one"), 16), "one", split=False)
    root = make_folder(tmp_path / "zero", face)
    (root / "bird").mkdir()
    (root / "bird" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no usable images for class\(es\) \['bird'\]"):
        check_labels(decode(load_labelled(root), 16), "zero", split=False)


def test_stratified_split_is_reproducible_and_stratified():
    labels = np.array([0] * 80 + [1] * 20)
    a = stratified_split(labels, 0.25, seed=3)
    b = stratified_split(labels, 0.25, seed=3)
    c = stratified_split(labels, 0.25, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert np.bincount(labels[a[1]]).tolist() == [20, 5]
    with pytest.raises(DataError, match="single usable image"):
        check_labels(LabelledImages(["a"] * 4, np.array([0, 0, 0, 1]), ["a", "b"], images=np.zeros((4, 1))), "x",
                     split=True)


def test_jpeg_draft_decodes_large_photos_at_reduced_scale_with_the_same_result(tmp_path):
    from skimage.data import astronaut

    path = tmp_path / "photo.jpg"
    Image.fromarray(astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC).save(path, quality=92)
    with Image.open(path) as image:  # what draft mode asks of Pillow: a 1/8-scale decode here
        image.draft("RGB", (128, 128))
        assert image.size == (256, 256)
    fast, full = load_image(path, 64), load_image(path, 64, draft=False)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3.0  # grey levels of 255
