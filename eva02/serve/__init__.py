"""`eva02 serve`: an HTTP inference server (FastAPI on uvicorn) with dynamic micro-batching.

`create_app(ModelRunner(model, preprocess, name=...), ServeSettings(...))` builds the ASGI app
(`ClipRunner(clip, preprocess, name=...)` for an EVA-02-CLIP model: zero-shot and embeddings);
`server.run(app, bind_socket(host, port))` serves it until SIGTERM. See docs/serve.md.
Needs the `serve` extra (fastapi, uvicorn, python-multipart, prometheus_client).
"""

from eva02.serve.app import ServeSettings, create_app
from eva02.serve.clip import ClipRunner
from eva02.serve.runner import ModelRunner

__all__ = ["ClipRunner", "ModelRunner", "ServeSettings", "create_app"]
