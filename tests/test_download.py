"""Downloads against a local HTTP server: verified caching, checksum mismatch, cut transfers, offline errors."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from eva02.weights.download import ChecksumError, DownloadError, download, get_cache_dir, resolve_url
from eva02.weights.zoo import WeightSource

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        if self.path.endswith("/missing"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path.endswith("/cut"):
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])  # then close: a transfer cut short
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _src(url: str, name: str = "w.pt", **kw) -> WeightSource:
    return WeightSource("official", url, name, **kw)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_is_cached_verified_and_reused(server, tmp_path) -> None:
    _Handler.hits.clear()
    src = _src(f"{server}/good", sha256=DIGEST)
    path = download(src, tmp_path, progress=False)
    assert path == tmp_path / "w.pt" and path.read_bytes() == PAYLOAD
    assert _files(tmp_path) == ["w.pt"]
    assert download(src, tmp_path, progress=False) == path
    assert _Handler.hits == ["/good"]  # the second call used the cache
    prefix = download(_src(f"{server}/good", "p.pt", sha256_prefix=DIGEST[:8]), tmp_path, progress=False)
    assert prefix.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server, tmp_path) -> None:
    wrong = "0" * 64
    with pytest.raises(
        ChecksumError, match=f"checksum mismatch for {server}/good: expected sha256 {wrong}, got {DIGEST}"
    ):
        download(_src(f"{server}/good", sha256=wrong), tmp_path, progress=False)
    assert _files(tmp_path) == []
    with pytest.raises(ChecksumError, match="expected sha256 ffff"):
        download(_src(f"{server}/good", sha256_prefix="ffff"), tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_cached_file_with_wrong_content_is_reported(tmp_path) -> None:
    (tmp_path / "w.pt").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match=r"cached file .*w\.pt has sha256 .*delete it"):
        download(_src("http://127.0.0.1:9/never", sha256=DIGEST), tmp_path, progress=False)


def test_interrupted_transfer_leaves_nothing(server, tmp_path) -> None:
    with pytest.raises(DownloadError, match=f"download of {server}/cut was interrupted.*nothing was cached"):
        download(_src(f"{server}/cut", sha256=DIGEST), tmp_path, progress=False)
    assert _files(tmp_path) == []  # neither the file nor a temporary part


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_explains_offline_use(tmp_path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/eva02_Ti.pt"
    with pytest.raises(DownloadError) as info:
        download(_src(url, "eva02_Ti.pt"), tmp_path, progress=False)
    msg = str(info.value)
    assert f"cannot download {url}" in msg
    assert f"put it at {tmp_path / 'eva02_Ti.pt'}" in msg
    assert "--checkpoint FILE" in msg and "pretrained='FILE'" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)  # one-line CLI error
    assert _files(tmp_path) == []


def test_http_error_is_reported(server, tmp_path) -> None:
    with pytest.raises(DownloadError, match=r"cannot download .*/missing \(HTTP 404"):
        download(_src(f"{server}/missing"), tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_eva02_home_and_hf_mirror(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVA02_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVA02_HF_ENDPOINT", server + "/")
    assert get_cache_dir() == tmp_path / "home"
    assert resolve_url("https://huggingface.co/Yuxin-CV/EVA-02/x.pt") == f"{server}/Yuxin-CV/EVA-02/x.pt"
    assert resolve_url("https://huggingface.co.evil/x") == "https://huggingface.co.evil/x"
    path = download(_src("https://huggingface.co/timm/good", "m.safetensors", sha256=DIGEST), progress=False)
    assert path == tmp_path / "home" / "m.safetensors" and path.read_bytes() == PAYLOAD
    monkeypatch.delenv("EVA02_HOME")
    assert get_cache_dir().name == "eva02"
