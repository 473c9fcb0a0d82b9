"""The HTTP app (FastAPI): routes, limits and the life cycle of the batch worker.

Routes (JSON in and out, errors as `{"detail": "one line"}`):
  POST /v1/classify?topk=5   an image -> top-k classes, the record of `eva02 predict --json`
  POST /v1/features          an image -> its pooled embedding (`eva02 features`' default)
  POST /v1/explain?method=   an image -> a PNG of its explanation heat map (attention rollout, Grad-CAM)
  POST /v1/zero-shot, /v1/embed/image, /v1/embed/text   the EVA-02-CLIP models' routes (clip_routes.py)
  GET  /v1/model             what is served; GET /healthz, /readyz, /metrics
  GET  /                     the browser page (eva02/serve/page/: static HTML, CSS and JS)
An image is the whole request body (raw bytes, whatever the content type says: curl --data-binary
calls it a urlencoded form) or the first file of a multipart form; a JSON body gets 415. A request
is admitted only while fewer than `max_queue` are held (reading, decoding, waiting or in the model):
else 503 with Retry-After, before its body is read. Bodies over `max_upload_bytes` get 413 as soon
as they pass the limit; images that cannot be read get 400 with the loader's reason; a request not
answered within `timeout_s` gets 504 (408 if its body had not arrived by then). Images are decoded
in a thread pool, the model runs in the batcher's own thread; explanations are batched like the
other kinds (one kind per method), and their drawings are made in the decoding threads. A route whose
kind the model does not compute (classify on a CLIP model, zero-shot on a classifier) gets 400.
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

from eva02.data.images import ImageError
from eva02.serve.batcher import Batcher, Closed
from eva02.serve.clip_routes import add_clip_routes
from eva02.serve.metrics import Metrics, RequestMetrics
from eva02.serve.runner import EXPLAIN, ModelRunner
from eva02.serve.uploads import IMAGE_BODY, Upload, read_image

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
    max_texts: int = 1024  # CLIP: texts of one /v1/embed/text request, labels x templates of one zero-shot
    head_cache: int = 32  # CLIP: zero-shot heads kept, by label set and templates

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_upload_bytes", "decode_threads", "max_texts", "head_cache"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"max_wait_ms must be >= 0 and timeout_s > 0, got {self.max_wait_ms}, {self.timeout_s}")


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

    def need(self, kind: str) -> None:
        """400, before the upload is read, for a route whose kind this model does not compute."""
        if kind not in self.runner.kinds:
            raise HTTPException(400, self.runner.refusal(kind))

    async def infer(self, request: Request, kind: str) -> Any:
        """Admit, read, decode and queue one image; its row of the batch result."""
        return await self.admitted(lambda stage: self._infer(request, kind, stage))

    async def explain(self, request: Request, method: str, target: int | None) -> tuple[bytes, int | None]:
        """Admit, read, decode and queue one image for an explanation: (PNG bytes, the class explained)."""
        return await self.admitted(lambda stage: self._explain(request, method, target, stage))

    async def admitted(self, work: Callable[[list[str]], Awaitable[Any]]) -> Any:
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
        upload = await read_image(request, self.settings.max_upload_bytes)
        image = await self.decoded(upload, self.runner.decode, stage)
        return await self.computed(kind, image, stage)

    async def _explain(self, request: Request, method: str, target: int | None, stage: list[str]):
        upload = await read_image(request, self.settings.max_upload_bytes)
        image, view = await self.decoded(upload, self.runner.decode_view, stage)
        heat, explained = await self.computed(EXPLAIN + method, (image, target), stage)
        stage[0] = "drawing"
        png = await self.in_decoder(self.runner.overlay_png, view, heat)
        return png, explained

    async def decoded(self, upload: Upload, decode: Callable[[bytes, str], Any], stage: list[str]) -> Any:
        """The upload decoded in a decoding thread (400 if it is no image)."""
        stage[0] = "decoding"
        try:
            return await self.in_decoder(decode, upload.data, upload.name)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None

    async def in_decoder(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a decoding thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decoders, fn, *args)

    async def computed(self, kind: str, payload: Any, stage: list[str]) -> Any:
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
        state.need("classify")
        probs = await state.infer(request, "classify")
        return JSONResponse(runner.classify_json(probs, topk))

    @app.post("/v1/features", openapi_extra=IMAGE_BODY)
    async def features(request: Request) -> JSONResponse:
        """Pooled embedding of one image."""
        state.need("features")
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

    add_clip_routes(app, state)

    page = {name: resources.files("eva02.serve").joinpath("page", name).read_bytes() for name in PAGE_FILES}
    for name, media_type in PAGE_FILES.items():
        app.add_api_route(
            "/" if name == "index.html" else f"/{name}", _page_file(page[name], media_type), methods=["GET"],
            include_in_schema=False,
        )  # fmt: skip

    @app.get("/v1/model")
    async def model() -> dict:
        """The model served, its input size and what it computes."""
        limits = {"max_batch": state.settings.max_batch}
        if "embed-text" in runner.kinds:
            limits["max_texts"] = state.settings.max_texts
        return {**runner.info(), **limits}

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
    refusal = runner.explain_refusal(method)
    if refusal is not None:
        raise HTTPException(400, refusal)
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
