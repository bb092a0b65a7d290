"""The HTTP service: `POST /predict` (multipart field `file`, or raw image bytes), `POST /explain`
(the same upload; a PNG with the Grad-CAM heatmap of the predicted class), `GET /health`, and
`GET /`, a self-contained web page to drop or pick an image.

An anomaly run (`train --task anomaly`) is served too: `/predict` answers the record `predict`
prints (anomaly_score, label "anomaly" | "normal", threshold) and the patch-score map over the
image (`explain`'s overlay) as a PNG data URL in the same answer, `/explain` that PNG alone.
`Classifying` and `Detecting` are what the service asks of each kind of run.

Every limit (upload size, image format, pixel count, request time) is enforced before or while
the work happens; a violation is a 4xx JSON `{"error": "..."}`. Concurrent requests are classified
together: one batch at a time goes through the model (micro-batching).
"""

from __future__ import annotations

import asyncio
import base64
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
from ..utils.errors import ApiError, ImageError, RunError
from .web import error, page, read_body, web_app

# Pillow format names accepted by /predict, and DICOM (pydicom).
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "DICOM")


class Batcher:
    """Queues images from concurrent requests; one worker runs them through the model in batches.
    `infer`: a batch of uint8 images to a dict of arrays, one row per image."""

    def __init__(self, infer: Callable[[np.ndarray], dict[str, np.ndarray]], max_batch: int):
        self.infer, self.max_batch = infer, max_batch
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
                answer = await asyncio.to_thread(self.infer, batch)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                answer = exc
            for i, (_, future) in enumerate(items):
                if not future.done():
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result({key: value[i] for key, value in answer.items()})

    async def predict(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """This image's row of `infer`'s answer."""
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


class Classifying:
    """What the service asks of a classifier run (or exported file): probabilities, the OOD score,
    unknown and set where the engine has them; Grad-CAM from the PyTorch weights."""

    def __init__(self, run: str | Path, engine: str, log, ood_keep: float | None, coverage: float | None):
        self.model = load_engine(run, engine, log).configure(ood_keep, coverage)
        self.size, self.rules, self.version = self.model.image_size, self.model.rules, self.model.version
        self.cam_model = explainer(run, self.model)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.predict_open(batch, len(batch))

    def health(self) -> dict:
        model = self.model
        return {"task": model.task, "classes": model.classes, "threshold": model.threshold,
                "explain": self.cam_model is not None,
                "ood": {"threshold": model.open_world.threshold, "keep": model.open_world.keep}
                if model.has_ood else None, "coverage": model.open_world.coverage}

    def answer(self, _image: np.ndarray, row: dict[str, np.ndarray]) -> dict:
        model, probs = self.model, row["probabilities"]
        return {"labels" if model.multilabel else "label": model.labels(probs[None])[0],
                "probabilities": {c: float(p) for c, p in zip(model.classes, probs)},
                **model.extras({k: v[None] for k, v in row.items()}, 0),
                "threshold": model.threshold, "model_version": self.version}

    def check_label(self, label: str | None) -> None:
        if label is not None and label not in self.model.classes:
            raise ApiError(422, f"label {label!r} is not one of the model's classes {self.model.classes}")
        if self.cam_model is None:
            raise ApiError(404, "Grad-CAM needs the run's PyTorch weights (model.safetensors); "
                                "this service runs from an .onnx file alone")

    def explain(self, image: np.ndarray, label: str | None) -> bytes:
        return explain_png(self.cam_model, image, label)


class Detecting:
    """What the service asks of an anomaly run: each image's anomaly score and patch-score map; the
    answer is `predict`'s record (AnomalyDetector.record) with the map over the image as a PNG, in
    the colours of `explain` (reports.anomaly.heat: blue a typical good patch, red the threshold)."""

    def __init__(self, run: str | Path, engine: str, ood_keep: float | None, coverage: float | None):
        from ..predict.anomaly_engine import load_detector

        if engine not in ("auto", "torch"):
            raise RunError(f"{run}: an anomaly run is served by PyTorch (its weights and bank); --engine {engine} "
                           "is for classifiers (use auto or torch)")
        for option, value in (("--ood-keep", ood_keep), ("--coverage", coverage)):
            if value is not None:
                raise RunError(f"{run}: {option} is for classifiers; an anomaly run answers its anomaly score "
                               "against its own threshold")
        self.detector = load_detector(run)
        self.size, self.rules, self.version = self.detector.image_size, None, self.detector.version

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        scores, maps = self.detector.score(batch, len(batch), maps=True)
        return {"anomaly_score": scores, "map": maps}

    def health(self) -> dict:
        meta = self.detector.meta
        return {"task": "anomaly", "threshold": self.detector.threshold, "normal_class": meta.get("normal_class"),
                "explain": True, "map": "the patch-score map: blue a typical good patch, red the threshold or more"}

    def png(self, image: np.ndarray, row: dict[str, np.ndarray]) -> bytes:
        from ..reports.anomaly import heat
        from ..reports.explain import overlay_png

        return overlay_png(image, heat(self.detector, row["map"][None])[0])

    def answer(self, image: np.ndarray, row: dict[str, np.ndarray]) -> dict:
        record = self.detector.record("", float(row["anomaly_score"]))
        del record["path"]  # an upload has none
        return {**record, "model_version": self.version,
                "map": "data:image/png;base64," + base64.b64encode(self.png(image, row)).decode("ascii")}

    def check_label(self, label: str | None) -> None:
        if label is not None:
            raise ApiError(422, "label is for classifiers; an anomaly run's map shows where the image is unusual")


def create_app(run: str | Path, engine: str = "auto", limits: Limits = Limits(),
               log: Callable[[str], None] | None = None, ood_keep: float | None = None,
               coverage: float | None = None) -> FastAPI:
    """The service for one run directory (or exported .onnx file); `ood_keep` and `coverage` as
    for predict. An anomaly run folder is served by its detector."""
    from ..predict.run import is_anomaly_run

    anomaly = is_anomaly_run(run)
    served = Detecting(run, engine, ood_keep, coverage) if anomaly else Classifying(run, engine, log, ood_keep, coverage)
    kind = "torch" if anomaly else served.model.name
    batcher = Batcher(served.infer, limits.max_batch)
    cam_lock = asyncio.Lock()

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
        return {"status": "ok", "model_version": served.version, "engine": kind, **served.health(),
                "image_size": served.size}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page("page.html", "blob: data:")  # data: the anomaly map comes inside the answer

    async def upload(request: Request) -> np.ndarray:
        data = await upload_bytes(request, await read_body(request, limits.max_bytes))
        return await asyncio.to_thread(decode_upload, data, served.size, limits, served.rules)

    async def predicted(request: Request) -> dict:
        image = await upload(request)
        row = await batcher.predict(image)
        return await asyncio.to_thread(served.answer, image, row)

    async def heatmap(request: Request) -> Response:
        label = request.query_params.get("label")
        served.check_label(label)
        image = await upload(request)
        if anomaly:  # the map comes with the score: one batched pass
            png = await asyncio.to_thread(served.png, image, await batcher.predict(image))
        else:
            async with cam_lock:  # one at a time: each uses every core
                png = await asyncio.to_thread(served.explain, image, label)
        return Response(png, media_type="image/png")

    async def within_limit(work):
        try:
            return await asyncio.wait_for(work, limits.timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request took longer than {limits.timeout:g} s") from None

    @app.post("/predict")
    async def predict(request: Request):
        return await within_limit(predicted(request))

    @app.post("/explain")
    async def explain(request: Request):
        return await within_limit(heatmap(request))

    return app
