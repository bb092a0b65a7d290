"""The HTTP service: `POST /predict` (multipart field `file`, or raw image bytes), `POST /explain`
(the same upload; a PNG with the Grad-CAM heatmap of the predicted class), `GET /health`, and
`GET /`, a self-contained web page to drop or pick an image.

Every limit (upload size, image format, pixel count, request time) is enforced before or while
the work happens; a violation is a 4xx JSON `{"error": "..."}`. Concurrent requests are classified
together: one batch at a time goes through the model (micro-batching).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response

from ..cfg.service import Limits
from ..data.decode import read_image
from ..data.window import Rules
from ..predict.engine import Engine
from ..predict.run import load_engine
from ..utils.errors import ApiError, ImageError
from .web import error, page, read_body, web_app

# Pillow format names accepted by /predict, and DICOM (pydicom).
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "DICOM")


class Batcher:
    """Queues images from concurrent requests; one worker runs them through the model in batches."""

    def __init__(self, classifier, max_batch: int):
        self.classifier, self.max_batch = classifier, max_batch
        self.queue: asyncio.Queue | None = None

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        while True:
            items = [await self.queue.get()]
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            items = [(image, future) for image, future in items if not future.done()]
            if not items:
                continue
            batch = padded(np.stack([image for image, _ in items]))
            try:
                probs = await asyncio.to_thread(self.classifier.predict_proba, batch, len(batch))
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                probs = exc
            for i, (_, future) in enumerate(items):
                if not future.done():
                    if isinstance(probs, Exception):
                        future.set_exception(probs)
                    else:
                        future.set_result(probs[i])

    async def predict(self, image: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future


def padded(batch: np.ndarray) -> np.ndarray:
    """The batch grown to the next power of two by repeating its last image: the model then sees at
    most log2(max_batch) + 1 batch shapes, so the per-shape caches of the inference libraries
    (oneDNN primitives, ONNX Runtime's arena) stop growing after warm-up."""
    size = 1 << (len(batch) - 1).bit_length()
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), 0)]) if size > len(batch) else batch


async def upload_bytes(request: Request, body: bytes) -> bytes:
    """The image bytes: the multipart field `file`, or the whole body."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/x-www-form-urlencoded"):
        raise ApiError(415, "send the image as multipart/form-data (field 'file') or as the raw body")
    if ctype.startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form()
        except Exception as exc:  # noqa: BLE001 - starlette/python-multipart parse errors
            raise ApiError(400, f"malformed multipart body ({getattr(exc, 'detail', exc)})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            fields = ", ".join(form.keys()) or "none"
            raise ApiError(422, f"multipart form needs the image in the field 'file' (got: {fields})")
        body = await upload.read()
    if not body:
        raise ApiError(400, "empty upload: send an image (multipart field 'file' or the raw body)")
    return body


def decode_upload(data: bytes, size: int, limits: Limits, rules: Rules | None = None) -> np.ndarray:
    """Decode as training does (high-bit-depth images through the model's intensity window,
    `rules`), after checking the format and the pixel count from the header."""
    try:
        return read_image(BytesIO(data), size, max_pixels=limits.max_pixels, formats=ALLOWED_FORMATS, rules=rules)
    except ImageError as exc:
        raise ApiError({"format": 415, "size": 413}.get(exc.kind, 422), str(exc)) from None


def explainer(run: str | Path, classifier: Engine):
    """The PyTorch classifier Grad-CAM needs: the engine itself, or the run's weights beside an
    ONNX engine; None when the service runs from a bare .onnx file."""
    from ..predict.run import WEIGHTS, load

    if classifier.name == "torch":
        return classifier
    run = Path(run)
    return load(run) if (run / WEIGHTS).is_file() else None


def explain_png(classifier, image: np.ndarray, label: str | None = None) -> bytes:
    """The image with the Grad-CAM heatmap of its predicted class (or of `label`) over it, as PNG
    bytes."""
    from ..reports.explain import gradcam, overlay_png

    target = None if label is None else np.array([classifier.classes.index(label)])
    cams, _, _ = gradcam(classifier.model, image[None], target, threshold=classifier.threshold,
                         device=classifier.device)
    return overlay_png(image, cams[0])


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's line and headers: a client that
    connects (or keeps a connection alive) and does not send a complete request head within
    `seconds` is disconnected. uvicorn alone waits for ever, so slow clients could hold every
    connection."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        def _arm(self) -> None:
            self._disarm()
            self._head_deadline = self.loop.call_later(seconds, self._head_too_slow)

        def _disarm(self) -> None:
            if getattr(self, "_head_deadline", None) is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeout


def create_app(run: str | Path, engine: str = "auto", limits: Limits = Limits(),
               log: Callable[[str], None] | None = None) -> FastAPI:
    """The service for one run directory (or exported .onnx file)."""
    classifier = load_engine(run, engine, log)
    kind, version, rules = classifier.name, classifier.version, classifier.rules
    batcher = Batcher(classifier, limits.max_batch)
    cam_model, cam_lock = explainer(run, classifier), asyncio.Lock()

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()

    app = web_app("transferkit", lifespan, {RequestValidationError: lambda exc: error(str(exc.errors()), 422)})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model_version": version, "engine": kind, "task": classifier.task,
                "classes": classifier.classes,
                "threshold": classifier.threshold, "image_size": classifier.image_size,
                "explain": cam_model is not None}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page("page.html", "blob:")

    async def upload(request: Request) -> np.ndarray:
        data = await upload_bytes(request, await read_body(request, limits.max_bytes))
        return await asyncio.to_thread(decode_upload, data, classifier.image_size, limits, rules)

    async def classify(request: Request) -> dict:
        image = await upload(request)
        probs = await batcher.predict(image)
        return {"labels" if classifier.multilabel else "label": classifier.labels(probs[None])[0],
                "probabilities": {c: float(p) for c, p in zip(classifier.classes, probs)},
                "threshold": classifier.threshold, "model_version": version}

    async def heatmap(request: Request) -> Response:
        label = request.query_params.get("label")
        if label is not None and label not in classifier.classes:
            raise ApiError(422, f"label {label!r} is not one of the model's classes {classifier.classes}")
        if cam_model is None:
            raise ApiError(404, "Grad-CAM needs the run's PyTorch weights (model.safetensors); "
                                "this service runs from an .onnx file alone")
        image = await upload(request)
        async with cam_lock:  # one at a time: each uses every core
            png = await asyncio.to_thread(explain_png, cam_model, image, label)
        return Response(png, media_type="image/png")

    async def within_limit(work):
        try:
            return await asyncio.wait_for(work, limits.timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request took longer than {limits.timeout:g} s") from None

    @app.post("/predict")
    async def predict(request: Request):
        return await within_limit(classify(request))

    @app.post("/explain")
    async def explain(request: Request):
        return await within_limit(heatmap(request))

    return app
