"""The routes of an EVA-02-CLIP model: zero-shot classification and embeddings in the joint space.

  POST /v1/zero-shot?topk=5  an image and `labels` (a JSON list of strings: a form field beside the
                             file, or a query parameter with a raw body), optionally `templates`
                             (a JSON list, each with one `{}`; default "a photo of a {}.")
                             -> the record of /v1/classify over the labels (softmax scores)
  POST /v1/embed/image       an image -> its normalised embedding
  POST /v1/embed/text        {"texts": [...]} (application/json) -> their normalised embeddings
For any other model these routes answer 400, before the body is read. Requests go through the same
admission, upload limit, queue and timeout as the image routes. The classifier head of a label set
(its prompts through the text tower, reduced as `eva02.clip.zero_shot_classifier` does) is computed
once and kept in an LRU cache of `head_cache` label sets; requests that need a head being computed
wait for that one computation, which is dropped when none of them waits any more.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from eva02.serve.clip import DEFAULT_TEMPLATES
from eva02.serve.uploads import IMAGE_BODY, read_image, read_json

if TYPE_CHECKING:
    from eva02.serve.app import ServeState

Key = tuple[tuple[str, ...], tuple[str, ...]]  # (labels, templates)
TEXT_FIELD = {"type": "string", "description": 'a JSON list of strings, e.g. ["a cat", "a dog"]'}
ZERO_SHOT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "labels": TEXT_FIELD,
                        "templates": TEXT_FIELD,
                    },
                    "required": ["file", "labels"],
                }
            },
            **{k: v for k, v in IMAGE_BODY["requestBody"]["content"].items() if k != "multipart/form-data"},
        },
    }
}
TEXT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"texts": {"type": "array", "items": {"type": "string"}}},
                    "required": ["texts"],
                }
            }
        },
    }
}


@dataclass(eq=False)
class _Pending:
    task: asyncio.Task
    waiters: int = 0


class HeadCache:
    """Zero-shot heads (E, C) by (labels, templates): the `size` most recently used, and one
    computation in flight per key, shared by the requests that wait for it."""

    def __init__(self, size: int, on_lookup: Callable[[str], None] | None = None) -> None:
        self.size = size
        self.on_lookup = on_lookup or (lambda result: None)  # 'hit', 'miss' (computed) or 'shared'
        self._heads: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._pending: dict[Key, _Pending] = {}

    def __len__(self) -> int:
        return len(self._heads)

    async def get(self, key: Key, compute: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
        """The head of `key`: kept, being computed (waited for), or computed now by `compute()`."""
        head = self._heads.get(key)
        if head is not None:
            self._heads.move_to_end(key)
            self.on_lookup("hit")
            return head
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(asyncio.get_running_loop().create_task(compute()))
            pending.task.add_done_callback(lambda task: self._settle(key, task))
            self.on_lookup("miss")
        else:
            self.on_lookup("shared")
        pending.waiters += 1
        try:
            return await asyncio.shield(pending.task)  # one waiter giving up does not stop the others'
        finally:
            pending.waiters -= 1
            if pending.waiters == 0 and not pending.task.done():  # nobody waits any more: drop the work
                pending.task.cancel()
                if self._pending.get(key) is pending:
                    del self._pending[key]

    def _settle(self, key: Key, task: asyncio.Task) -> None:
        if self._pending.get(key) is not None and self._pending[key].task is task:
            del self._pending[key]
        if task.cancelled() or task.exception() is not None:  # its waiters heard of the failure
            return
        self._heads[key] = task.result()
        self._heads.move_to_end(key)
        while len(self._heads) > self.size:
            self._heads.popitem(last=False)


# --------------------------------------------------------------------------------------- input
def json_field(raw: str, what: str) -> Any:
    """The JSON value of a form field or query parameter; 400 naming `what` if it does not parse."""
    try:
        return json.loads(raw)
    except ValueError:
        raise HTTPException(
            400, f'{what}: not valid JSON; send a JSON list of strings, e.g. ["a cat", "a dog"]'
        ) from None


def text_list(raw: Any, what: str, *, allow_empty_items: bool = True) -> list[str]:
    """`raw` if it is a non-empty list of strings; 400 naming `what` otherwise."""
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) for v in raw):
        got = type(raw).__name__ if not isinstance(raw, list) else "a list with other items" if raw else "[]"
        raise HTTPException(400, f"{what}: expected a non-empty JSON list of strings, got {got}")
    if not allow_empty_items:
        empty = [i for i, v in enumerate(raw) if not v.strip()]
        if empty:
            raise HTTPException(400, f"{what}: item {empty[0]} is empty")
    return raw


def one_of(fields: dict[str, str], query: str | None, what: str) -> str | None:
    """A value given as a form field or as a query parameter (400 if both)."""
    if what in fields and query is not None:
        raise HTTPException(400, f"{what}: given both as a form field and as a query parameter; give it once")
    return fields.get(what, query)


def prompt_spec(fields: dict[str, str], labels: str | None, templates: str | None, limit: int) -> Key:
    """(labels, templates) of a zero-shot request, checked: 400 naming the problem."""
    raw = one_of(fields, labels, "labels")
    if raw is None:
        raise HTTPException(400, "labels: give the labels to choose from as a JSON list, as a form field "
                            """beside the file (-F 'labels=["a cat", "a dog"]') or a query parameter""")  # fmt: skip
    names = text_list(json_field(raw, "labels"), "labels", allow_empty_items=False)
    raw = one_of(fields, templates, "templates")
    forms = list(DEFAULT_TEMPLATES) if raw is None else text_list(json_field(raw, "templates"), "templates")
    for t in forms:
        try:
            ok = "{}" in t and t.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise HTTPException(400, f"templates: {t[:80]!r} is not a template: it needs one '{{}}' where the "
                                "label goes and no other braces")  # fmt: skip
    if len(names) * len(forms) > limit:
        raise HTTPException(400, f"labels x templates: {len(names)} x {len(forms)} prompts, more than the limit "
                            f"of {limit} (--max-texts)")  # fmt: skip
    return tuple(names), tuple(forms)


def texts_of(body: Any, limit: int) -> list[str]:
    """The texts of an /v1/embed/text body {"texts": [...]}, checked: 400 naming the problem."""
    if not isinstance(body, dict) or set(body) != {"texts"}:
        raise HTTPException(400, 'the body must be a JSON object with one field, "texts": a list of strings')
    texts = text_list(body["texts"], "texts")
    if len(texts) > limit:
        raise HTTPException(400, f"texts: {len(texts)} texts, more than the limit of {limit} (--max-texts)")
    return texts


# -------------------------------------------------------------------------------------- routes
def add_clip_routes(app: FastAPI, state: ServeState) -> None:
    """POST /v1/zero-shot, /v1/embed/image and /v1/embed/text (400 for a model that is no CLIP model)."""
    runner = state.runner
    heads = HeadCache(state.settings.head_cache, state.metrics.observe_head)
    limit = state.settings.max_upload_bytes

    async def head_of(key: Key) -> np.ndarray:
        labels, templates = key
        prompts = [t.format(c) for c in labels for t in templates]  # label-major, as zero_shot_classifier
        ids = await state.in_decoder(runner.tokenize, prompts)  # (C*T, L)
        emb = await state.computed("embed-text", ids, ["waiting for the model"])  # (C*T, E)
        return await state.in_decoder(runner.head, emb, len(labels))  # (E, C)

    async def zero_shot_of(request: Request, topk: int, labels: str | None, templates: str | None, stage: list[str]):
        upload = await read_image(request, limit)
        key = prompt_spec(upload.fields, labels, templates, state.settings.max_texts)
        head_task = asyncio.ensure_future(heads.get(key, lambda: head_of(key)))  # beside the image's decoding
        try:
            image = await state.decoded(upload, runner.decode, stage)
            emb = await state.computed("embed-image", image, stage)  # (E,)
            head = await head_task
        finally:
            if not head_task.done():
                head_task.cancel()
            elif not head_task.cancelled():
                head_task.exception()  # seen: its failure, if any, is moot once the image failed
        probs = await state.in_decoder(runner.scores, emb, head)
        return runner.zero_shot_json(probs, key[0], topk)

    async def text_embeddings_of(request: Request, stage: list[str]):
        texts = texts_of(await read_json(request, limit, '{"texts": [...]}'), state.settings.max_texts)
        stage[0] = "tokenizing"
        ids = await state.in_decoder(runner.tokenize, texts)  # (N, L)
        return runner.texts_json(await state.computed("embed-text", ids, stage))

    @app.post("/v1/zero-shot", openapi_extra=ZERO_SHOT_BODY)
    async def zero_shot(
        request: Request,
        topk: int = Query(5, ge=1, description="labels to return"),
        labels: str | None = Query(None, description="with a raw body: the labels as a JSON list"),
        templates: str | None = Query(None, description='with a raw body: the templates, default ["a photo of a {}."]'),
    ) -> JSONResponse:
        """Zero-shot classification of one image among the labels sent with it."""
        state.need("zero-shot")
        if labels is not None:  # a bad query is refused before the upload is read
            prompt_spec({}, labels, templates, state.settings.max_texts)
        return JSONResponse(await state.admitted(lambda stage: zero_shot_of(request, topk, labels, templates, stage)))

    @app.post("/v1/embed/image", openapi_extra=IMAGE_BODY)
    async def embed_image(request: Request) -> JSONResponse:
        """Normalised embedding of one image in the joint space."""
        state.need("embed-image")
        return JSONResponse(runner.features_json(await state.infer(request, "embed-image")))

    @app.post("/v1/embed/text", openapi_extra=TEXT_BODY)
    async def embed_text(request: Request) -> JSONResponse:
        """Normalised embeddings of texts in the joint space."""
        state.need("embed-text")
        return JSONResponse(await state.admitted(lambda stage: text_embeddings_of(request, stage)))
