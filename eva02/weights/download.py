"""Checkpoint downloads into a local cache; no file reaches the cache unverified.

Before a download is renamed into the cache it passes three checks:
- content: the sha256 pinned in the zoo (full digest, or the 8-digit prefix mmpretrain puts in its file
  names); else, for Hugging Face files, the sha256 the hub states for the file (the ETag of an LFS file,
  read with `huggingface_hub.get_hf_file_metadata`); hashed while streaming;
- size: the byte count the server announced (Content-Length, and the hub's stated size);
- format: the bytes are a checkpoint of the kind the file name says (a safetensors header whose tensors
  fill the file exactly; a torch zip archive holding a data.pkl, or a legacy torch pickle), so an HTML
  error page or a transfer cut short without Content-Length is refused.
A cached file is checked again (format, and the pinned sha256 where there is one) once per process; a bad
one is reported with its path and the fix, never used and never silently replaced.

A transfer that stalls is abandoned: besides the per-read socket timeout, fewer than `STALL_MIN_BYTES`
arriving within `STALL_WINDOW_S` seconds ends it. Partial files are `eva02.fileio` temporaries beside the
cache file (`.NAME.host.pid.random.part`); each download first removes those of dead processes.

Cache directory: $EVA02_HOME if set, else `torch.hub.get_dir()/eva02`. `EVA02_HF_ENDPOINT` replaces
`https://huggingface.co` in URLs (for mirrors).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from eva02.fileio import atomic_write, check_writable_dir, clean_stale_temps
from eva02.hints import hint
from eva02.weights.zoo import WeightSource

HF_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
TIMEOUT_S = 30.0  # connection and per-read socket timeout
STALL_WINDOW_S = 60.0  # a transfer must bring at least STALL_MIN_BYTES in every window of this length
STALL_MIN_BYTES = 64 << 10
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 << 20  # a larger safetensors header is a corrupt length field, not a real header

# Cached files already verified in this process: (path, size, mtime_ns); checking a large file once is enough.
_VERIFIED: set[tuple[str, int, int]] = set()


class DownloadError(OSError, ValueError):
    """A download that failed or could not start; the message says what to do instead.

    For a transfer problem (unreachable, stalled, cut or not a checkpoint), `url`, `dest` (the cache path
    to drop the file into) and `reason` are set.
    """

    url: str | None = None
    dest: Path | None = None
    reason: str | None = None


class ChecksumError(DownloadError):
    """Downloaded or cached bytes whose sha256 differs from the pinned or server-stated one."""


class BadFileError(DownloadError):
    """Downloaded or cached bytes that are not a checkpoint of the expected format or size."""


def get_cache_dir() -> Path:
    """The checkpoint cache: $EVA02_HOME, else torch.hub.get_dir()/eva02."""
    home = os.environ.get("EVA02_HOME")
    if home:
        return Path(home).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / "eva02"


def resolve_url(url: str) -> str:
    """Apply the EVA02_HF_ENDPOINT mirror (e.g. https://hf-mirror.com) to Hugging Face URLs."""
    mirror = os.environ.get("EVA02_HF_ENDPOINT", "").rstrip("/")
    if mirror and (url == HF_ENDPOINT or url.startswith(HF_ENDPOINT + "/")):
        return mirror + url[len(HF_ENDPOINT) :]
    return url


def is_hub_url(url: str) -> bool:
    """True for a file URL of the Hugging Face hub (`https://huggingface.co/REPO/resolve/REV/PATH`)."""
    return url.startswith(HF_ENDPOINT + "/") and "/resolve/" in url


def cached_path(source: WeightSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `source` lives in the cache (whether or not it is there yet)."""
    return (Path(cache_dir) if cache_dir is not None else get_cache_dir()) / source.filename


def verification(source: WeightSource) -> str:
    """How a download of `source` is verified before it enters the cache, in words (`eva02 info`)."""
    if source.sha256:
        digest = f"sha256 pinned ({source.sha256[:12]}...)"
    elif source.sha256_prefix:
        digest = f"sha256 prefix pinned ({source.sha256_prefix})"
    elif is_hub_url(source.url):
        digest = "sha256 stated by the Hugging Face server"
    else:
        return "format and size check only (no digest known)"
    return digest + " + format and size check"


def _expected(source: WeightSource) -> str | None:
    return (source.sha256 or source.sha256_prefix or "").lower() or None


def _matches(source: WeightSource, digest: str) -> bool:
    if source.sha256:
        return digest == source.sha256.lower()
    if source.sha256_prefix:
        return digest.startswith(source.sha256_prefix.lower())
    return True  # nothing pinned to compare with


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ format checks
def _looks_like(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith(b"<"):
        return "; it looks like an HTML or XML page (an error or login page, or a proxy's answer)"
    if text.startswith((b"{", b"[")):
        return "; it looks like a JSON document (an error message from the server?)"
    if text.startswith(b"version https://git-lfs"):
        return "; it is a Git LFS pointer, not the file it points to"
    return ""


def _safetensors_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"only {size} bytes, too short for a safetensors file"
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            return f"its first bytes are not a safetensors header{_looks_like(head + f.read(64))}"
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its safetensors header does not parse"
    need = 8 + n + max(ends, default=0)
    if need != size:
        return f"its header describes {need} bytes but the file has {size} (cut short or damaged)"
    return None


def _torch_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip container
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"a damaged zip archive, cut short? ({e})"
        if not any(name.rsplit("/", 1)[-1] == "data.pkl" for name in names):
            return "a zip archive without data.pkl, not a torch checkpoint"
        return None
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle: torch's legacy format
        return None
    return f"not a torch checkpoint (neither a zip archive nor a pickle){_looks_like(head)}"


def format_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a checkpoint of the kind its name says (None when it is one). Reads only headers."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_problem(path)
    # An unknown suffix: either checkpoint format will do.
    torch_why = _torch_problem(path)
    return None if torch_why is None or _safetensors_problem(path, size) is None else torch_why


# ------------------------------------------------------------------------------------- cached files
def verify_cached(path: Path, source: WeightSource) -> Path:
    """Check a cached file (format; pinned sha256 where known) once per process; BadFileError / ChecksumError."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return path
    fix = f"delete it (rm '{path}') to download {source.url} again, or replace it with the right file"
    why = format_problem(path)
    if why is not None:
        raise BadFileError(f"cached file {path} is not a usable checkpoint: {why}; {fix}")
    if _expected(source) is not None:
        digest = sha256_file(path)
        if not _matches(source, digest):
            raise ChecksumError(f"cached file {path} has sha256 {digest}, expected {_expected(source)}: {fix}")
    _VERIFIED.add(key)
    return path


# ---------------------------------------------------------------------------------------- transfers
@dataclass
class _Plan:
    """What one transfer fetches and what its bytes must match."""

    url: str  # the URL the user knows (after the mirror)
    get_url: str  # where the bytes come from (the hub may redirect to a CDN)
    dest: Path
    server_sha256: str | None = None  # the hub's statement of the file's sha256
    size: int | None = None  # the hub's statement of the file's size


def _transfer_error(cls: type[DownloadError], url: str, dest: Path, reason: str, message: str) -> DownloadError:
    err = cls(message)
    err.url, err.dest, err.reason = url, dest, reason
    return err


def _offline_error(url: str, dest: Path, reason: object) -> DownloadError:
    return _transfer_error(
        DownloadError,
        url,
        dest,
        str(reason),
        f"cannot download {url} ({reason}); if this machine is offline, fetch that file elsewhere and put it "
        f"at {dest}, or load a local file directly with {hint('local_file')}",
    )


def _hub_reason(e: Exception) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    if type(e).__name__ == "OfflineModeIsEnabled":
        return "HF_HUB_OFFLINE is set"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _hub_plan(source: WeightSource, url: str, dest: Path, timeout: float) -> _Plan:
    """Ask the hub (or its mirror) what it serves for `url`: where, how large, and with which sha256."""
    from huggingface_hub import get_hf_file_metadata

    try:
        meta = get_hf_file_metadata(url, timeout=timeout)
    except Exception as e:  # network, HTTP and offline-mode errors of the hub client all mean "cannot download"
        raise _offline_error(url, dest, _hub_reason(e)) from e
    etag = (meta.etag or "").lower()
    server = etag if _SHA256_RE.fullmatch(etag) else None  # an LFS file's ETag is its sha256
    if source.sha256 and server and server != source.sha256.lower():
        raise ChecksumError(
            f"{url} is now a different file (the server states sha256 {server}, the zoo pins {source.sha256}); "
            "nothing was downloaded; if you trust the new file, fetch it yourself and load it with "
            f"{hint('local_file')}"
        )
    return _Plan(url, meta.location or url, dest, server, meta.size)


def _stalled(url: str, dest: Path, done: int, total: int | None, window: float, min_bytes: int) -> DownloadError:
    got = f"{done} of {total}" if total else f"{done}"
    reason = f"stalled: fewer than {min_bytes} bytes in {window:g} s"
    return _transfer_error(
        DownloadError,
        url,
        dest,
        reason,
        f"download of {url} {reason} ({got} bytes received); nothing was cached; check the network or the mirror "
        f"(EVA02_HF_ENDPOINT) and run again, or fetch the file elsewhere and put it at {dest}",
    )


def _copy(resp, out, plan: _Plan, total: int | None, progress: bool, window: float, min_bytes: int) -> str:
    """Stream the body to `out`, hashing it; abort a stalled transfer. Returns the hex sha256."""
    read = getattr(resp, "read1", None) or resp.read  # read1: return what has arrived, do not wait for CHUNK
    h, done = hashlib.sha256(), 0
    mark_t, mark_n = time.monotonic(), 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=plan.dest.name, disable=not progress, leave=False) as bar:
        while True:
            try:
                chunk = read(CHUNK)
            except TimeoutError as e:  # nothing at all arrived within the socket timeout
                raise _stalled(plan.url, plan.dest, done, total, window, min_bytes) from e
            except (http.client.IncompleteRead, OSError) as e:  # connection reset, short body
                raise _transfer_error(
                    DownloadError,
                    plan.url,
                    plan.dest,
                    f"interrupted after {done} bytes",
                    f"download of {plan.url} was interrupted after {done} bytes ({type(e).__name__}); nothing "
                    "was cached, run the command again",
                ) from e
            if not chunk:
                break
            h.update(chunk)
            out.write(chunk)
            done += len(chunk)
            bar.update(len(chunk))
            now = time.monotonic()
            if now - mark_t >= window:
                if done - mark_n < min_bytes:
                    raise _stalled(plan.url, plan.dest, done, total, window, min_bytes)
                mark_t, mark_n = now, done
    if total is not None and done != total:
        raise _transfer_error(
            DownloadError,
            plan.url,
            plan.dest,
            f"got {done} of {total} bytes",
            f"download of {plan.url} was interrupted: got {done} of {total} bytes; nothing was cached, run it again",
        )
    return h.hexdigest()


def _check_download(tmp: Path, source: WeightSource, plan: _Plan, digest: str) -> None:
    """The checks a finished transfer must pass before its rename into the cache."""
    url = plan.url
    if not _matches(source, digest):
        raise ChecksumError(f"checksum mismatch for {url}: expected sha256 {_expected(source)}, got {digest}")
    if plan.server_sha256 and digest != plan.server_sha256:
        raise ChecksumError(
            f"checksum mismatch for {url}: the server states sha256 {plan.server_sha256}, got {digest}; "
            "nothing was cached, run it again"
        )
    why = format_problem(tmp)
    if why is not None:
        raise _transfer_error(
            BadFileError,
            url,
            plan.dest,
            f"not a checkpoint: {why}",
            f"download of {url} is not a usable checkpoint: {why}; nothing was cached; run it again later, or "
            f"fetch the file elsewhere and put it at {plan.dest}",
        )


def download(
    source: WeightSource,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
    stall_window: float | None = None,
    stall_bytes: int | None = None,
) -> Path:
    """Return the local path of `source`, downloading and verifying it first if it is not cached.

    Args:
        timeout: seconds to connect, and for any single read.
        stall_window, stall_bytes: abandon a transfer that brings fewer than `stall_bytes` bytes in
            `stall_window` seconds (default `STALL_WINDOW_S`, `STALL_MIN_BYTES`).
    """
    dest = cached_path(source, cache_dir)
    if dest.is_file():
        return verify_cached(dest, source)
    window = STALL_WINDOW_S if stall_window is None else stall_window
    min_bytes = STALL_MIN_BYTES if stall_bytes is None else stall_bytes
    folder = check_writable_dir(dest.parent, "checkpoint cache")
    clean_stale_temps(folder)  # the partial files of killed downloads; live ones are left alone
    url = resolve_url(source.url)
    read_timeout = min(timeout, window)
    plan = _hub_plan(source, url, dest, read_timeout) if is_hub_url(source.url) else _Plan(url, url, dest)
    request = urllib.request.Request(plan.get_url, headers={"User-Agent": "eva02", "Accept-Encoding": "identity"})
    try:
        resp = urllib.request.urlopen(request, timeout=read_timeout)
    except urllib.error.HTTPError as e:
        raise _offline_error(url, dest, f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise _offline_error(url, dest, getattr(e, "reason", e)) from e
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    if plan.size is not None and total is not None and plan.size != total:
        resp.close()
        raise _transfer_error(
            BadFileError,
            url,
            dest,
            f"size {total} differs from the stated {plan.size}",
            f"download of {url} would bring {total} bytes but the server states {plan.size}; nothing was cached, "
            "run it again",
        )
    total = total if total is not None else plan.size

    def write(tmp: str) -> None:
        with resp, open(tmp, "wb") as out:
            digest = _copy(resp, out, plan, total, progress, window, min_bytes)
        _check_download(Path(tmp), source, plan, digest)

    atomic_write(dest, write, suffix=".part")
    st = dest.stat()
    _VERIFIED.add((str(dest.resolve()), st.st_size, st.st_mtime_ns))
    return dest
