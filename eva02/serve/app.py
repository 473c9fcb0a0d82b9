"""The HTTP app (FastAPI): routes, limits and the life cycle of the batch worker.

Routes (JSON in and out, errors as `{"detail": "one line"}`):
  POST /v1/classify?topk=5   an image -> top-k classes, the record of `eva02 predict --json`
  POST /v1/features          an image -> its pooled embedding (`eva02 features`' default)
  POST /v1/explain?method=   an image -> a PNG of its explanation heat map (attention rollout, Grad-CAM)
  POST /v1/zero-shot, /v1/embed-text   reserved for the CLIP models: 501 for now
  GET  /v1/model             what is served; GET /healthz, /readyz, /metrics
  GET  /                     the browser page (eva02/serve/page/: static HTML, CSS and JS)
An image is the whole request body (raw bytes, whatever the content type says: curl --data-binary
calls it a urlencoded form) or the first file of a multipart form; a JSON body gets 415. A request
is admitted only while fewer than `max_queue` are held (reading, decoding, waiting or in the model):
else 503 with Retry-After, before its body is read. Bodies over `max_upload_bytes` get 413 as soon
as they pass the limit; images that cannot be read get 400 with the loader's reason; a request not
answered within `timeout_s` gets 504 (408 if its body had not arrived by then). Images are decoded
in a thread pool, the model runs in the batcher's own thread; explanations are batched like the
other kinds (one kind per method), and their drawings are made in the decoding threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from eva02.data.images import ImageError
from eva02.serve.batcher import Batcher, Closed
from eva02.serve.metrics import Metrics, RequestMetrics
from eva02.serve.runner import EXPLAIN, ModelRunner

log = logging.getLogger("eva02.serve")
RETRY_AFTER = {"Retry-After": "1"}  # seconds; a full queue empties at the model's pace, usually well within


@dataclass(frozen=True)
class ServeSettings:
    """Batching and limits of one server (the `eva02 serve` flags)."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 128  # requests held at once
    max_upload_bytes: int = 16 * 2**20
    timeout_s: float = 30.0
    decode_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_upload_bytes", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"max_wait_ms must be >= 0 and timeout_s > 0, got {self.max_wait_ms}, {self.timeout_s}")


SEND_IMAGE = "send the image as a multipart file field (curl -F file=@x.jpg) or as the raw body (--data-binary @x.jpg)"
# Bodies that cannot be an image. (A urlencoded type is taken as raw bytes: curl --data-binary sends that.)
NOT_IMAGES = ("application/json",)


class UploadTooLarge(Exception):
    """The request body passed the upload limit."""


# The request body the image routes take, for /openapi.json (the routes read it themselves).
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

PLANNED = {
    "/v1/zero-shot": "zero-shot classification with the label texts you send comes with the CLIP models",
    "/v1/embed-text": "text embeddings come with the CLIP models",
}
# The browser page: file -> media type. Scripts and styles are files of their own, so the page's
# Content-Security-Policy can forbid inline code.
PAGE_FILES = {"index.html": "text/html", "page.js": "text/javascript", "page.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ServeState:
    """What the routes share: the runner, the batcher, the metrics and the admission count."""

    def __init__(self, runner: ModelRunner, settings: ServeSettings) -> None:
        self.runner = runner
        self.settings = settings
        self.batcher = Batcher(
            runner.run, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
            on_batch=self._on_batch,
        )  # fmt: skip
        self.decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="eva02-decode")
        self.held = 0  # admitted requests not answered yet
        self.ready = False
        self.draining = False
        self.warm_up_error: str | None = None
        self.metrics = Metrics(
            lambda: self.batcher.depth, lambda: self.held, {k: str(v) for k, v in runner.info().items()}
        )

    def _on_batch(self, kind: str, size: int, seconds: float) -> None:
        self.metrics.observe_batch(kind, size, seconds)

    async def warm_up(self) -> None:
        """One model call per kind on the model thread; readyz turns 200 after it."""
        try:
            await asyncio.get_running_loop().run_in_executor(self.batcher.executor, self.runner.warm_up)
        except Exception as e:  # stays not ready, and says why
            self.warm_up_error = f"{type(e).__name__}: {e}"
            log.error("eva02 serve: the warm-up call failed, the server stays not ready: %s", self.warm_up_error)
            return
        self.ready = True

    async def infer(self, request: Request, kind: str) -> Any:
        """Admit, read, decode and queue one image; its row of the batch result."""
        return await self._admitted(lambda stage: self._infer(request, kind, stage))

    async def explain(self, request: Request, method: str, target: int | None) -> tuple[bytes, int | None]:
        """Admit, read, decode and queue one image for an explanation: (PNG bytes, the class explained)."""
        return await self._admitted(lambda stage: self._explain(request, method, target, stage))

    async def _admitted(self, work: Callable[[list[str]], Awaitable[Any]]) -> Any:
        """Run `work(stage)` as one admitted request: 503 when not ready or full, 408/504 past the timeout."""
        if not self.ready:
            raise HTTPException(
                503, "the model is warming up; retry shortly (GET /readyz says when)", headers=RETRY_AFTER
            )
        if self.held >= self.settings.max_queue:
            raise HTTPException(
                503, f"the server is busy ({self.held} requests held, --max-queue {self.settings.max_queue})",
                headers=RETRY_AFTER,
            )  # fmt: skip
        self.held += 1
        stage = ["reading"]
        try:
            return await asyncio.wait_for(work(stage), self.settings.timeout_s)
        except asyncio.TimeoutError:
            if stage[0] == "reading":
                raise HTTPException(408, f"the upload did not arrive within {self.settings.timeout_s:g} s") from None
            raise HTTPException(
                504, f"no result within {self.settings.timeout_s:g} s ({stage[0]}); the server is overloaded"
            ) from None
        finally:
            self.held -= 1

    async def _infer(self, request: Request, kind: str, stage: list[str]) -> Any:
        image = await self._decoded(request, self.runner.decode, stage)
        return await self._computed(kind, image, stage)

    async def _explain(self, request: Request, method: str, target: int | None, stage: list[str]):
        image, view = await self._decoded(request, self.runner.decode_view, stage)
        heat, explained = await self._computed(EXPLAIN + method, (image, target), stage)
        stage[0] = "drawing"
        png = await asyncio.get_running_loop().run_in_executor(self.decoders, self.runner.overlay_png, view, heat)
        return png, explained

    async def _decoded(self, request: Request, decode: Callable[[bytes, str], Any], stage: list[str]) -> Any:
        """The upload, read within the limits and decoded in a decoding thread (400 if it is no image)."""
        data, name = await read_image(request, self.settings.max_upload_bytes)
        stage[0] = "decoding"
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decoders, decode, data, name)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None

    async def _computed(self, kind: str, payload: Any, stage: list[str]) -> Any:
        """The payload's result from the next batch of its kind (503 while stopping, 500 if the call fails)."""
        stage[0] = "waiting for the model"
        try:
            future = self.batcher.submit(kind, payload)
        except Closed:
            raise HTTPException(503, "the server is shutting down", headers=RETRY_AFTER) from None
        try:
            return await future
        except Exception as e:
            log.exception("eva02 serve: a model call failed")
            raise HTTPException(500, f"the model call failed: {type(e).__name__}: {e}") from None


async def read_image(request: Request, limit: int) -> tuple[bytes, str]:
    """(bytes, name) of the image in the body: the first file of a multipart form, else the raw body.
    413 once more than `limit` bytes arrive (at once when Content-Length says so)."""
    too_large = HTTPException(413, f"the upload is larger than the limit of {limit} bytes (--max-upload-mb)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    received = 0

    async def receive_within_limit():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise UploadTooLarge
        return message

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in NOT_IMAGES:
        raise HTTPException(415, f"a body of type {content_type} is not an image: {SEND_IMAGE}")
    limited = Request(request.scope, receive_within_limit)
    try:
        if content_type == "multipart/form-data":
            return await _first_file(limited)
        return b"".join([chunk async for chunk in limited.stream()]), "request body"
    except UploadTooLarge:
        raise too_large from None
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before the upload ended") from None


async def _first_file(request: Request) -> tuple[bytes, str]:
    form = await request.form(max_files=1, max_fields=16)
    try:
        for value in form.values():
            if isinstance(value, UploadFile):
                name = " ".join((value.filename or "").split())[:200]  # one line in messages, bounded
                return await value.read(), name or "upload"
    finally:
        await form.close()
    raise HTTPException(400, f"the multipart form has no file: {SEND_IMAGE}")


# ------------------------------------------------------------------------------------------- app
def create_app(runner: ModelRunner, settings: ServeSettings | None = None) -> FastAPI:
    """The server's ASGI app for a loaded model; its state is `app.state.serve` (a ServeState)."""
    state = ServeState(runner, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        warm = asyncio.get_running_loop().create_task(state.warm_up())
        try:
            yield
        finally:  # uvicorn gets here after the requests in flight were answered
            state.draining = True
            await warm
            await state.batcher.close()
            state.decoders.shutdown(wait=True)

    # No /docs page: it loads its scripts from a CDN. /openapi.json describes the routes.
    app = FastAPI(title="eva02 serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    _add_routes(app, state)
    app.add_middleware(RequestMetrics, metrics=state.metrics, routes=[r.path for r in app.routes])

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or err['loc'][0]}: {err['msg']}" for err in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=400)

    return app


def _add_routes(app: FastAPI, state: ServeState) -> None:
    runner = state.runner

    # JSONResponse directly: FastAPI's encoder would walk every float of an embedding in Python.
    @app.post("/v1/classify", openapi_extra=IMAGE_BODY)
    async def classify(request: Request, topk: int = Query(5, ge=1, description="classes to return")) -> JSONResponse:
        """Top-k classes of one image."""
        if runner.predictor is None:
            raise HTTPException(
                400, f"model '{runner.name}' has no classifier head (a pre-trained backbone); use POST /v1/features"
            )
        probs = await state.infer(request, "classify")
        return JSONResponse(runner.classify_json(probs, topk))

    @app.post("/v1/features", openapi_extra=IMAGE_BODY)
    async def features(request: Request) -> JSONResponse:
        """Pooled embedding of one image."""
        return JSONResponse(runner.features_json(await state.infer(request, "features")))

    @app.post("/v1/explain", openapi_extra=IMAGE_BODY, response_class=Response)
    async def explain(
        request: Request,
        method: Literal["attention-rollout", "gradcam"] = Query("attention-rollout", description="how to explain"),
        target: int | None = Query(None, ge=0, description="gradcam: the class to explain (default: the top class)"),
    ) -> Response:
        """A PNG of one image's explanation heat map, drawn over the region the model saw."""
        _check_explain(runner, method, target)
        png, explained = await state.explain(request, method, target)
        headers = {"X-Explain-Method": method, "Cache-Control": "no-store"}
        if explained is not None:
            headers["X-Explain-Target"] = str(explained)
        return Response(png, media_type="image/png", headers=headers)

    for path, what in PLANNED.items():
        app.add_api_route(path, _not_yet(what), methods=["POST"], include_in_schema=False)

    page = {name: resources.files("eva02.serve").joinpath("page", name).read_bytes() for name in PAGE_FILES}
    for name, media_type in PAGE_FILES.items():
        app.add_api_route(
            "/" if name == "index.html" else f"/{name}", _page_file(page[name], media_type), methods=["GET"],
            include_in_schema=False,
        )  # fmt: skip

    @app.get("/v1/model")
    async def model() -> dict:
        """The model served, its input size and what it computes."""
        return {**runner.info(), "max_batch": state.settings.max_batch}

    @app.get("/healthz")
    async def healthz() -> dict:
        """200 while the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once the model is loaded and warmed up, 503 before that and while shutting down."""
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not state.ready:
            detail = f"warm-up failed: {state.warm_up_error}" if state.warm_up_error else "warming up"
            return JSONResponse({"status": detail}, status_code=503)
        return JSONResponse({"status": "ready", "model": runner.name})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


def _check_explain(runner: ModelRunner, method: str, target: int | None) -> None:
    """400 for an explanation this model cannot give, before the upload is read."""
    if method not in runner.explain_methods:
        raise HTTPException(
            400, f"model '{runner.name}' has no classifier head, so no Grad-CAM; use method=attention-rollout"
        )
    if target is None:
        return
    if method != "gradcam":
        raise HTTPException(400, "target: attention rollout does not depend on a class; it applies to gradcam only")
    if target >= runner.model.cfg.num_classes:
        raise HTTPException(400, f"target: {target} is out of range, the model has classes 0 to "
                            f"{runner.model.cfg.num_classes - 1}")  # fmt: skip


def _page_file(body: bytes, media_type: str):
    async def page_file() -> Response:
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    return page_file


def _not_yet(what: str):
    async def planned() -> None:
        raise HTTPException(501, f"not available yet: {what}")

    return planned
