"""Checkpoint downloads into a local cache, verified by sha256 while streaming.

Cache directory: $EVA02_HOME if set, else `torch.hub.get_dir()/eva02`. A file only appears in the cache
once it is complete and its checksum matches; partial downloads live under a temporary name and are
removed on any failure. `EVA02_HF_ENDPOINT` replaces `https://huggingface.co` in URLs (for mirrors).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from eva02.weights.zoo import WeightSource

HF_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
TIMEOUT_S = 30.0
LOCAL_FILE_HINT = "--checkpoint FILE (CLI) or pretrained='FILE' (Python)"

# Cached files already verified in this process: (path, size, mtime_ns); hashing a large file once is enough.
_VERIFIED: set[tuple[str, int, int]] = set()


class DownloadError(OSError, ValueError):
    """A download that failed or could not start; the message says what to do instead.

    For an unreachable URL, `url`, `dest` (the cache path to drop the file into) and `reason` are set.
    """

    url: str | None = None
    dest: Path | None = None
    reason: str | None = None


class ChecksumError(DownloadError):
    """Downloaded or cached bytes whose sha256 differs from the published one."""


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


def cached_path(source: WeightSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `source` lives in the cache (whether or not it is there yet)."""
    return (Path(cache_dir) if cache_dir is not None else get_cache_dir()) / source.filename


def _expected(source: WeightSource) -> str | None:
    return (source.sha256 or source.sha256_prefix or "").lower() or None


def _matches(source: WeightSource, digest: str) -> bool:
    if source.sha256:
        return digest == source.sha256.lower()
    if source.sha256_prefix:
        return digest.startswith(source.sha256_prefix.lower())
    return True  # nothing published to compare with


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify_cached(path: Path, source: WeightSource) -> Path:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED or _expected(source) is None:
        return path
    digest = sha256_file(path)
    if not _matches(source, digest):
        raise ChecksumError(
            f"cached file {path} has sha256 {digest}, expected {_expected(source)}: delete it to download "
            f"{source.url} again, or replace it with the right file"
        )
    _VERIFIED.add(key)
    return path


def _offline_error(url: str, dest: Path, reason: object) -> DownloadError:
    err = DownloadError(
        f"cannot download {url} ({reason}); if this machine is offline, fetch that file elsewhere and put it "
        f"at {dest}, or load a local file directly with {LOCAL_FILE_HINT}"
    )
    err.url, err.dest, err.reason = url, dest, str(reason)
    return err


def _stream(resp, out, url: str, dest: Path, progress: bool) -> str:
    """Copy the response body to `out`, hashing as it goes; return the hex digest."""
    length = resp.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    h = hashlib.sha256()
    done = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False) as bar:
        try:
            while chunk := resp.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        except (http.client.IncompleteRead, OSError) as e:  # connection reset, timeout, short body
            raise DownloadError(
                f"download of {url} was interrupted after {done} bytes ({type(e).__name__}); nothing was "
                "cached, run the command again"
            ) from e
    if total is not None and done != total:
        raise DownloadError(
            f"download of {url} was interrupted: got {done} of {total} bytes; nothing was cached, run it again"
        )
    return h.hexdigest()


def download(
    source: WeightSource, cache_dir: str | os.PathLike | None = None, progress: bool = True, timeout: float = TIMEOUT_S
) -> Path:
    """Return the local path of `source`, downloading and verifying it first if it is not cached."""
    dest = cached_path(source, cache_dir)
    folder = dest.parent
    if dest.is_file():
        return _verify_cached(dest, source)
    url = resolve_url(source.url)
    folder.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "eva02"})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise _offline_error(url, dest, f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise _offline_error(url, dest, getattr(e, "reason", e)) from e
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{source.filename}.", suffix=".part")
    try:
        with resp, os.fdopen(fd, "wb") as out:
            digest = _stream(resp, out, url, dest, progress)
        if not _matches(source, digest):
            raise ChecksumError(f"checksum mismatch for {url}: expected sha256 {_expected(source)}, got {digest}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    st = dest.stat()
    _VERIFIED.add((str(dest.resolve()), st.st_size, st.st_mtime_ns))
    return dest
