"""What the two web apps (the prediction service and the labelling page) share: the app with its
error handlers (every error a JSON `{"error": "..."}`), the page and its security policy, and
request bodies read within a limit."""

from __future__ import annotations

import json
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from ..utils.errors import ApiError

JSON_LIMIT = 65536  # bytes of a JSON request body


def error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def web_app(title: str, lifespan, handlers: dict[type, Callable[[Exception], JSONResponse]] | None = None) -> FastAPI:
    """A FastAPI app without generated docs, answering an `ApiError` with its status and message and
    Starlette's HTTP errors with theirs; `handlers`: more exception types, each to its response."""
    app = FastAPI(title=title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    answers = {ApiError: lambda exc: error(exc.message, exc.status),
               HTTPException: lambda exc: error(str(exc.detail), exc.status_code, exc.headers), **(handlers or {})}
    for kind, answer in answers.items():
        async def handle(_request, exc, answer=answer):
            return answer(exc)

        app.add_exception_handler(kind, handle)
    return app


def page(name: str, img_src: str) -> HTMLResponse:
    """A self-contained page of this package, under a policy that allows its inline script and
    style, images from `img_src`, and requests to its own origin only."""
    html = resources.files("transferkit.apps").joinpath(name).read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        f"img-src {img_src}; connect-src 'self'")})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    too_large = ApiError(413, f"upload too large (limit {limit} bytes)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict:
    """A small JSON object body. Only `application/json` is accepted: a browser sends that type
    cross-origin only after a CORS preflight, which these apps never allow (no CSRF by a form)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ApiError(415, "send a JSON object with Content-Type: application/json")
    body = await read_body(request, JSON_LIMIT)  # refused as soon as it passes the limit, not after reading it all
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ApiError(400, "expected a JSON object")
    return value
