"""The offline browser app: `export RUN --format web --out DIR` writes

    DIR/index.html   the page: drop or pick images (or the webcam), label and probabilities
    DIR/model.onnx   the float ONNX export (uint8 RGB in, probabilities out, metadata inside)
    DIR/ort/         onnxruntime-web's files, verbatim from its npm package (pinned below)
    DIR/offline.js   the model and ort's WebAssembly as base64, read only when the page is opened
                     from disk (file://), where a page may not fetch the files beside it

Nothing is fetched from a network at run time: served statically the page loads model.onnx and
ort/ from its own folder; opened from disk it loads offline.js. The page decodes an image as
transferkit does (Pillow's bilinear resize, reimplemented in the page) and the ONNX graph does the
rest, so its probabilities are PyTorch's within 1e-4 (PNG; see docs/deploy.md for JPEG).

onnxruntime-web's files come from npm at export time (`npm pack`, so npm's own cache answers
when it has them; `make setup` fills it), checked against the pinned SHA-512 and kept in
transferkit's cache; TRANSFERKIT_ORT_WEB names a folder that already holds them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

from ..predict.onnx_engine import read_metadata
from ..training.cache import default_cache_dir
from ..utils.errors import ExportError
from ..utils.files import atomic_path, write_text

ORT_WEB = "onnxruntime-web"
ORT_WEB_VERSION = "1.31.1"
ORT_WEB_INTEGRITY = ("sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw==")
# what the page needs: the WebAssembly-only build (a classic script), its loader and binary
# (package.json: its version and MIT licence; the package ships no LICENSE file)
ORT_FILES = ("dist/ort.wasm.min.js", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm",
             "package.json")


def ort_web_dir() -> Path:
    """A folder with ORT_FILES (by their base names) of onnxruntime-web ORT_WEB_VERSION."""
    given = os.environ.get("TRANSFERKIT_ORT_WEB")
    folder = Path(given) if given else default_cache_dir() / f"{ORT_WEB}-{ORT_WEB_VERSION}"
    if all((folder / Path(name).name).is_file() for name in ORT_FILES):
        return folder
    if given:
        raise ExportError(f"{folder}: TRANSFERKIT_ORT_WEB has not all of {ORT_WEB} {ORT_WEB_VERSION}'s files "
                          f"({', '.join(Path(n).name for n in ORT_FILES)})")
    npm = shutil.which("npm")
    if npm is None:
        raise ExportError(f"the web export needs {ORT_WEB} {ORT_WEB_VERSION}'s files from npm: install npm (Node.js), "
                          "or set TRANSFERKIT_ORT_WEB to a folder holding them")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([npm, "pack", f"{ORT_WEB}@{ORT_WEB_VERSION}", "--pack-destination", tmp,
                                   "--silent"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ExportError(f"npm pack {ORT_WEB}@{ORT_WEB_VERSION} took over 10 minutes; try again") from None
        tarball = Path(tmp) / f"{ORT_WEB}-{ORT_WEB_VERSION}.tgz"
        if done.returncode != 0 or not tarball.is_file():
            why = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise ExportError(f"npm pack {ORT_WEB}@{ORT_WEB_VERSION} failed ({why})")
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        if digest != ORT_WEB_INTEGRITY:
            raise ExportError(f"{ORT_WEB} {ORT_WEB_VERSION} from npm does not match its pinned SHA-512; refused")
        with tarfile.open(tarball) as archive:
            for name in ORT_FILES:
                member = archive.getmember(f"package/{name}")
                with atomic_path(folder / Path(name).name) as target:
                    target.write_bytes(archive.extractfile(member).read())
    return folder


def export_web(classifier, out: Path, quantize_mode: str | None, write_model: Callable[[Path], Path]) -> Path:
    """The app folder (module docstring) for a run; float only, uint8 RGB images in. `write_model`
    writes the run's float ONNX export to the path it is given."""
    if quantize_mode is not None:
        raise ExportError("the web app runs the float model (its probabilities match PyTorch's); drop --quantize")
    if classifier.rules.window is not None:
        raise ExportError("the web app reads 8-bit images; this model takes high-bit-depth intensities "
                          "(an intensity window), which a browser does not decode")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder (the web export writes a folder)")
    vendor = ort_web_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort").mkdir(exist_ok=True)
    for name in ORT_FILES:
        with atomic_path(out / "ort" / Path(name).name) as target:
            shutil.copyfile(vendor / Path(name).name, target)
    model = write_model(out / "model.onnx")
    meta = read_metadata(model)
    bundle = {"model": model, "wasm": vendor / "ort-wasm-simd-threaded.wasm", "mjs": vendor / "ort-wasm-simd-threaded.mjs"}
    write_text(out / "offline.js", "window.TK_OFFLINE = " + json.dumps(
        {key: base64.b64encode(path.read_bytes()).decode() for key, path in bundle.items()}) + ";\n")
    page = resources.files("transferkit.deploy").joinpath("web.html").read_text(encoding="utf-8")
    script_safe = json.dumps(meta).replace("</", "<\\/")  # class names cannot close the script element
    write_text(out / "index.html", page.replace("/*TK_META*/", script_safe))
    for path in [out / "ort", *out.rglob("*")]:  # readable by a static web server's own user
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out
