"""Reading request bodies within the upload limit: an image (multipart file or raw body) or JSON.

An image is the first file of a multipart form, with the form's text fields beside it (the zero-shot
labels), or the whole body whatever its content type says (curl --data-binary calls it a urlencoded
form); a JSON body is no image (415). A JSON body is read only as application/json. Every read stops
with 413 as soon as the body passes the limit (at once when Content-Length says so).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

SEND_IMAGE = "send the image as a multipart file field (curl -F file=@x.jpg) or as the raw body (--data-binary @x.jpg)"
# Bodies that cannot be an image. (A urlencoded type is taken as raw bytes: curl --data-binary sends that.)
NOT_IMAGES = ("application/json",)


class UploadTooLarge(Exception):
    """The request body passed the upload limit."""


@dataclass
class Upload:
    """An uploaded image: its bytes, the name messages call it by, and the text fields of its form."""

    data: bytes
    name: str
    fields: dict[str, str] = field(default_factory=dict)


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


def content_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_image(request: Request, limit: int) -> Upload:
    """The image in the body: the first file of a multipart form (with the form's text fields), else
    the raw body. 413 once more than `limit` bytes arrive (at once when Content-Length says so)."""
    content_type = content_type_of(request)
    if content_type in NOT_IMAGES:
        raise HTTPException(415, f"a body of type {content_type} is not an image: {SEND_IMAGE}")
    if content_type == "multipart/form-data":
        return await read_within(request, limit, _form_upload)
    return Upload(await read_within(request, limit, _whole_body), "request body")


async def read_within(request: Request, limit: int, read: Callable[[Request], Awaitable[Any]]) -> Any:
    """`read(request)` with a body that may not pass `limit` bytes: 413 as soon as it does (at once
    when Content-Length says so), 400 if the client goes away first."""
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

    try:
        return await read(Request(request.scope, receive_within_limit))
    except UploadTooLarge:
        raise too_large from None
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before the upload ended") from None


async def _whole_body(request: Request) -> bytes:
    return b"".join([chunk async for chunk in request.stream()])


async def _form_upload(request: Request) -> Upload:
    form = await request.form(max_files=1, max_fields=16)
    try:
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        for value in form.values():
            if isinstance(value, UploadFile):
                name = " ".join((value.filename or "").split())[:200]  # one line in messages, bounded
                return Upload(await value.read(), name or "upload", fields)
    finally:
        await form.close()
    raise HTTPException(400, f"the multipart form has no file: {SEND_IMAGE}")


async def read_json(request: Request, limit: int, what: str) -> Any:
    """The JSON value of the body (415 unless it is application/json, 400 if it does not parse)."""
    content_type = content_type_of(request)
    if content_type != "application/json":
        raise HTTPException(415, f"send {what} as a JSON body (Content-Type: application/json), "
                            f"not {content_type or 'a body without a type'}")  # fmt: skip
    body = await read_within(request, limit, _whole_body)
    try:
        return json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise HTTPException(400, f"the body is not valid JSON: {e}") from None
