"""Downloads against a local HTTP server: only verified files are cached (pinned sha256, the hub's stated
sha256, size, checkpoint format), bad cached files are reported, stalled transfers end, temporaries of
killed downloads are cleaned, offline errors say what to do, and `eva02 info` shows what is verified."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from eva02.cli import main
from eva02.fileio import clean_stale_temps, temp_path
from eva02.weights.download import (
    BadFileError,
    ChecksumError,
    DownloadError,
    download,
    format_problem,
    get_cache_dir,
    resolve_url,
    verification,
)
from eva02.weights.zoo import ZOO, WeightSource


def _torch_bytes(n: int, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(n, dtype=torch.float32)}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


PAYLOAD = _torch_bytes(1 << 18)  # a 1 MiB torch checkpoint
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
ST = save_safetensors({"w": torch.arange(1 << 16, dtype=torch.float32)})
ST_DIGEST = hashlib.sha256(ST).hexdigest()
HTML = b"<!DOCTYPE html>\n<html><body>Too many requests, try again later</body></html>\n"


@dataclass
class Route:
    """What the test server answers on one path."""

    body: bytes = PAYLOAD
    mode: str = "full"  # full | cut | trickle | silent | pause
    length: bool = True  # send Content-Length
    head: dict = field(default_factory=dict)  # extra HEAD headers: the hub's file metadata


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}
    hits: list[str] = []
    release = threading.Event()

    def _route(self) -> Route | None:
        route = type(self).routes.get(self.path)
        if route is None:
            self.send_error(404)
        return route

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits.append("HEAD " + self.path)
        if route := self._route():
            self.send_response(200)
            self.send_header("Content-Length", str(len(route.body)))
            for k, v in route.head.items():
                self.send_header(k, v)
            self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append("GET " + self.path)
        route = self._route()
        if route is None:
            return
        body = route.body
        self.send_response(200)
        if route.length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if route.mode == "full":
                self.wfile.write(body)
            elif route.mode == "cut":  # then close: a transfer cut short
                self.wfile.write(body[: len(body) // 3])
            elif route.mode == "trickle":  # one byte at a time, for 3 s at most
                for i in range(60):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif route.mode == "silent":
                type(self).release.wait(3)
            elif route.mode == "pause":  # half, then wait for the test to look at the cache folder
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                type(self).release.wait(5)
                self.wfile.write(body[len(body) // 2 :])
        except OSError:  # the client gave up
            pass
        self.close_connection = True

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _fresh_routes():
    _Handler.routes.clear()
    _Handler.hits.clear()
    _Handler.release.clear()
    yield
    _Handler.release.set()


def _serve(server: str, path: str, **kw) -> str:
    _Handler.routes[path] = Route(**kw)
    return server + path


def _src(url: str, name: str = "w.pt", **kw) -> WeightSource:
    return WeightSource("official", url, name, **kw)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------ verified downloads
def test_good_file_is_cached_verified_and_reused(server, tmp_path) -> None:
    src = _src(_serve(server, "/good"), sha256=DIGEST)
    path = download(src, tmp_path, progress=False)
    assert path == tmp_path / "w.pt" and path.read_bytes() == PAYLOAD
    assert _files(tmp_path) == ["w.pt"]
    assert download(src, tmp_path, progress=False) == path
    assert _Handler.hits == ["GET /good"]  # the second call used the cache
    prefix = download(_src(server + "/good", "p.pt", sha256_prefix=DIGEST[:8]), tmp_path, progress=False)
    assert prefix.read_bytes() == PAYLOAD


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_cached_file_gets_normal_permissions(server, tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        path = download(_src(_serve(server, "/perm"), sha256=DIGEST), tmp_path, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_checksum_mismatch_leaves_nothing(server, tmp_path) -> None:
    url, wrong = _serve(server, "/good"), "0" * 64
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {url}: expected sha256 {wrong}, got {DIGEST}"):
        download(_src(url, sha256=wrong), tmp_path, progress=False)
    assert _files(tmp_path) == []
    with pytest.raises(ChecksumError, match="expected sha256 ffff"):
        download(_src(url, sha256_prefix="ffff"), tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_html_page_with_status_200_is_not_cached(server, tmp_path) -> None:
    url = _serve(server, "/page", body=HTML)
    with pytest.raises(BadFileError, match=f"download of {url} is not a usable checkpoint: .*HTML.*nothing was cached"):
        download(_src(url), tmp_path, progress=False)
    assert _files(tmp_path) == []
    with pytest.raises(BadFileError, match="not a usable checkpoint"):
        download(_src(url, "m.safetensors"), tmp_path, progress=False)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(("name", "body"), [("w.pt", PAYLOAD), ("m.safetensors", ST)])
def test_transfer_cut_short_without_content_length_is_not_cached(server, tmp_path, name, body) -> None:
    url = _serve(server, "/nolength-" + name, body=body, mode="cut", length=False)
    with pytest.raises(BadFileError, match=f"download of {re.escape(url)} is not a usable checkpoint"):
        download(_src(url, name), tmp_path, progress=False)
    assert _files(tmp_path) == []
    _Handler.routes[url[len(server) :]].mode = "full"  # the whole file, still without Content-Length, is fine
    assert download(_src(url, name), tmp_path, progress=False).read_bytes() == body


def test_interrupted_transfer_leaves_nothing(server, tmp_path) -> None:
    url = _serve(server, "/cut", mode="cut")
    with pytest.raises(DownloadError, match=f"download of {url} was interrupted.*nothing was cached"):
        download(_src(url, sha256=DIGEST), tmp_path, progress=False)
    assert _files(tmp_path) == []  # neither the file nor a temporary part


# ----------------------------------------------------------------------- the hub's stated sha256 and size
def _hub(server: str, monkeypatch, repo: str, body: bytes = ST, **head) -> tuple[str, str]:
    """Serve `body` as the hub file timm/{repo}/.../model.safetensors through a mirror; (hub URL, mirror URL)."""
    monkeypatch.setenv("EVA02_HF_ENDPOINT", server)
    path = f"/timm/{repo}/resolve/main/model.safetensors"
    sha = hashlib.sha256(body).hexdigest()
    meta = {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(body)), "X-Repo-Commit": "a" * 40, **head}
    _serve(server, path, body=body, head=meta)
    return "https://huggingface.co" + path, server + path


def test_hub_file_is_checked_against_the_stated_sha256(server, tmp_path, monkeypatch) -> None:
    hub, mirror = _hub(server, monkeypatch, "good")
    path = download(WeightSource("timm", hub, "good.safetensors"), tmp_path, progress=False)
    assert path.read_bytes() == ST
    head = "HEAD /timm/good/resolve/main/model.safetensors"
    assert _Handler.hits == [head, head.replace("HEAD", "GET")]  # metadata through huggingface_hub, then the file
    hub, mirror = _hub(server, monkeypatch, "changed", **{"X-Linked-Etag": '"' + "1" * 64 + '"'})
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {mirror}: the server states sha256 1111"):
        download(WeightSource("timm", hub, "changed.safetensors"), tmp_path, progress=False)
    assert _files(tmp_path) == ["good.safetensors"]


def test_hub_stated_size_catches_a_short_body(server, tmp_path, monkeypatch) -> None:
    hub, mirror = _hub(server, monkeypatch, "short", **{"X-Linked-Size": str(len(ST) + 100)})
    _Handler.routes["/timm/short/resolve/main/model.safetensors"].length = False
    with pytest.raises(DownloadError, match=f"download of {mirror} was interrupted: got {len(ST)} of {len(ST) + 100}"):
        download(WeightSource("timm", hub, "short.safetensors"), tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_pinned_sha256_differing_from_the_hub_stops_before_download(server, tmp_path, monkeypatch) -> None:
    hub, mirror = _hub(server, monkeypatch, "pinned")
    with pytest.raises(ChecksumError, match=f"{mirror} is now a different file .*the zoo pins {'2' * 64}"):
        download(WeightSource("timm", hub, "p.safetensors", sha256="2" * 64), tmp_path, progress=False)
    assert all(h.startswith("HEAD") for h in _Handler.hits) and _files(tmp_path) == []


def test_hub_offline_mode_is_an_offline_error(server, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    hub, _ = _hub(server, monkeypatch, "offline")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match=r"cannot download .*offline.* \(HF_HUB_OFFLINE is set\).*put it at"):
        download(WeightSource("timm", hub, "o.safetensors"), tmp_path, progress=False)
    assert _Handler.hits == [] and _files(tmp_path) == []


def test_eva02_home_and_hf_mirror(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVA02_HOME", str(tmp_path / "home"))
    hub, mirror = _hub(server, monkeypatch, "home")
    monkeypatch.setenv("EVA02_HF_ENDPOINT", server + "/")
    assert get_cache_dir() == tmp_path / "home"
    assert resolve_url("https://huggingface.co/Yuxin-CV/EVA-02/x.pt") == f"{server}/Yuxin-CV/EVA-02/x.pt"
    assert resolve_url("https://huggingface.co.evil/x") == "https://huggingface.co.evil/x"
    assert resolve_url(hub) == mirror
    path = download(WeightSource("timm", hub, "m.safetensors", sha256=ST_DIGEST), progress=False)
    assert path == tmp_path / "home" / "m.safetensors" and path.read_bytes() == ST
    monkeypatch.delenv("EVA02_HOME")
    assert get_cache_dir().name == "eva02"


# ------------------------------------------------------------------------------------ cached files
def test_cached_file_with_wrong_content_is_reported(tmp_path) -> None:
    (tmp_path / "w.pt").write_bytes(_torch_bytes(10))  # a checkpoint, but not the pinned one
    with pytest.raises(ChecksumError, match=r"cached file .*w\.pt has sha256 .*delete it"):
        download(_src("http://127.0.0.1:9/never", sha256=DIGEST), tmp_path, progress=False)


@pytest.mark.parametrize(("name", "body"), [("w.pt", HTML), ("w.pt", PAYLOAD[:5000]), ("m.safetensors", ST[:-4])])
def test_bad_cached_file_is_reported_with_its_path_and_the_fix(tmp_path, name, body) -> None:
    bad = tmp_path / name
    bad.write_bytes(body)
    url = "http://127.0.0.1:9/never"
    with pytest.raises(BadFileError) as info:
        download(_src(url, name), tmp_path, progress=False)  # no digest known: the format check still runs
    msg = str(info.value)
    assert f"cached file {bad} is not a usable checkpoint" in msg and f"delete it (rm '{bad}')" in msg
    assert f"to download {url} again" in msg and "\n" not in msg
    assert bad.read_bytes() == body  # reported, not silently replaced


def test_format_problem(tmp_path) -> None:
    def check(name: str, body: bytes) -> str | None:
        path = tmp_path / name
        path.write_bytes(body)
        return format_problem(path)

    assert check("a.pt", PAYLOAD) is None and check("a.pth", _torch_bytes(8, legacy=True)) is None
    assert check("a.safetensors", ST) is None and check("a.data", ST) is None and check("b.data", PAYLOAD) is None
    assert "HTML" in check("b.pt", HTML) and "HTML" in check("b.safetensors", HTML)
    assert "Git LFS pointer" in check("c.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    assert "damaged zip" in check("d.pt", PAYLOAD[:-100]) and check("e.pt", b"") == "the file is empty"
    assert "header describes" in check("f.safetensors", ST + b"\0")
    assert "header does not parse" in check("g.safetensors", (4).to_bytes(8, "little") + b"{x: " + b"\0" * 8)


# --------------------------------------------------------------------------- stalls and temporaries
@pytest.mark.parametrize("mode", ["trickle", "silent"])
def test_stalled_transfer_is_abandoned(server, tmp_path, mode) -> None:
    url = _serve(server, "/" + mode, mode=mode)
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download(_src(url), tmp_path, progress=False, stall_window=0.4, stall_bytes=1024)
    assert time.monotonic() - start < 2.5
    msg = str(info.value)
    assert msg.startswith(f"download of {url} stalled: fewer than 1024 bytes in 0.4 s") and "\n" not in msg
    assert "nothing was cached" in msg and f"put it at {tmp_path / 'w.pt'}" in msg
    assert _files(tmp_path) == []


def test_partial_file_is_a_temporary_of_this_process(server, tmp_path) -> None:
    url = _serve(server, "/pause", mode="pause")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(path=download(_src(url, sha256=DIGEST), tmp_path, False)))
    worker.start()
    try:
        for _ in range(200):
            parts = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
            if parts:
                break
            time.sleep(0.02)
        mine = temp_path(tmp_path / "w.pt", ".part").name.rsplit(".", 2)[0]  # .w.pt.HOST.PID
        assert len(parts) == 1 and re.fullmatch(re.escape(mine) + r"\.[0-9a-f]{8}\.part", parts[0].name)
        assert clean_stale_temps(tmp_path) == [] and parts[0].exists()  # a live download is left alone
    finally:
        _Handler.release.set()
        worker.join(10)
    assert result["path"].read_bytes() == PAYLOAD and _files(tmp_path) == ["w.pt"]


def test_download_removes_temporaries_of_dead_downloads(server, tmp_path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    live = temp_path(tmp_path / "w.pt", ".part")  # this process: alive
    dead = live.with_name(live.name.replace(f".{os.getpid()}.", f".{child.pid}."))
    other_host = tmp_path / f".w.pt.otherhost.{child.pid}.0123abcd.part"
    for p in (live, dead, other_host):
        p.write_bytes(b"partial")
    download(_src(_serve(server, "/clean"), "other.pt"), tmp_path, progress=False)
    assert not dead.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "other.pt").read_bytes() == PAYLOAD


# ------------------------------------------------------------------------------------- offline errors
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
    assert "pretrained='FILE'" in msg and "--checkpoint" not in msg  # Python callers get Python words
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)  # one-line CLI error
    assert _files(tmp_path) == []


def test_http_error_is_reported(server, tmp_path) -> None:
    with pytest.raises(DownloadError, match=r"cannot download .*/missing \(HTTP 404"):
        download(_src(f"{server}/missing"), tmp_path, progress=False)
    assert _files(tmp_path) == []


# ------------------------------------------------------------------------------ what the zoo verifies
def test_zoo_digests_and_info_show_what_is_verified(capsys, monkeypatch) -> None:
    import eva02.cli.zoo as cli_zoo

    for counter in ("count_flops", "mmpretrain_macs", "count_params", "mmpretrain_params"):  # not tested here
        monkeypatch.setattr(cli_zoo, counter, lambda cfg, size=None: 0)
    digests = [s.sha256 for e in ZOO.values() for s in e.sources if s.sha256]
    digests += [e.extra["official_p14to16_sha256"] for e in ZOO.values() if e.extra.get("official_p14to16_sha256")]
    assert digests and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests)
    assert main(["info", "eva02-base-p14_in21k-pre_3rdparty_in21k"]) == 0
    out = capsys.readouterr().out
    assert "verified by: sha256 pinned (e5950aad2b26...) + format and size check" in out  # official, LFS page
    assert "verified by: sha256 stated by the Hugging Face server + format and size check" in out  # timm
    assert "verified by: sha256 prefix pinned (2f2d4d3c) + format and size check" in out  # mmpretrain
    assert main(["info", "eva02-tiny-p14_in21k-pre_3rdparty_in1k", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["verified_by"].split(" + ")[0] for s in info["sources"]] == [
        "sha256 stated by the Hugging Face server",
        "sha256 stated by the Hugging Face server",
        "sha256 prefix pinned (a4e8708a)",
    ]
    assert verification(_src("https://example.org/x.pt")) == "format and size check only (no digest known)"


def test_bad_cached_file_of_one_source_is_named_before_the_next_source(server, tmp_path, monkeypatch, capsys):
    """fetch_weights passes over a damaged cached file only with a warning that names it and the fix."""
    from eva02.weights.load import fetch_weights
    from eva02.weights.zoo import ZooEntry

    monkeypatch.setenv("EVA02_HOME", str(tmp_path))
    bad = _src("http://127.0.0.1:9/never", "first.pt")
    good = _src(_serve(server, "/second.pt", body=PAYLOAD), "second.pt")
    (tmp_path / "first.pt").write_bytes(HTML)
    from eva02.model import VARIANTS
    from eva02.weights.zoo import Preprocess

    entry = ZooEntry(name="x", cfg=VARIANTS["test"], preprocess=Preprocess(56), sources=(bad, good))
    path, _ = fetch_weights(entry, progress=False)
    assert path == tmp_path / "second.pt"
    err = capsys.readouterr().err
    assert f"warning: cached file {tmp_path / 'first.pt'} is not a usable checkpoint" in err and "rm '" in err
