"""Running the app under uvicorn: the listening socket and a graceful stop.

The socket is bound before the model loads, so a taken port is an error at once, and `--port 0`
gets a free port whose number is known before the server starts. On SIGTERM or Ctrl-C uvicorn stops
accepting connections, lets the requests in flight finish (each within the request timeout), then
runs the app's shutdown, which drains the batch queue; /readyz answers 503 from the signal on.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; OSError if the address cannot be used."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a stop signal arrives (so /readyz turns 503 at once)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        self.app.state.serve.draining = True
        super().handle_exit(sig, frame)


def run(app: FastAPI, sock: socket.socket, *, access_log: bool = False, log_level: str = "info") -> None:
    """Serve `app` on `sock` until SIGTERM / SIGINT, then stop gracefully (see the module docstring)."""
    settings = app.state.serve.settings
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=access_log,
        log_level=log_level,
        # Requests in flight end within their timeout; past that (and a margin) the stop goes on anyway.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
    )
    _Server(config, app).run(sockets=[sock])
