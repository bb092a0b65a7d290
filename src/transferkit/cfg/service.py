"""How a trained model answers: the engines that can run it, and the limits of the HTTP service
(declared once: `serve`'s options and defaults come from here)."""

from __future__ import annotations

from dataclasses import dataclass

ENGINES = ("auto", "torch", "onnx", "openvino")  # auto: the fastest export that matches the run (predict/run.py AUTO_ORDER)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 10 * 2**20  # request body
    max_pixels: int = 40_000_000  # width x height, read from the header before decoding
    timeout: float = 10.0  # seconds for one request: upload, decoding and prediction
    max_batch: int = 32  # requests classified together
