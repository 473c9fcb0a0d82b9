"""WebDataset tar shards (as `shard_writer.py` writes them, or any `wids` shard list) read as an indexable
dataset (`shard_dataset`), and the shard manifest.

Reading goes through `wids` (webdataset's indexed reader: a tar's members indexed once, then read by
offset), so sample `i` of the dataset is a fixed (shard, offset) and the engine's samplers apply as to
image folders: order and augmentation from (seed, epoch, index), exact resume with any number of
processes. Shards named by URL or `pipe:` command (anything `webdataset.gopen` opens) are fetched whole
into a local cache first, which keeps that guarantee. With `stream` the shards are read front to back
instead, without a local copy (`shard_stream.py`: order from (seed, epoch), exact resume with the same
number of processes and workers).
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import io
import json
import os
import re
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from eva02.data.datasets import RecordDataset, read_names
from eva02.data.images import ImageError, decode_image
from eva02.extras import need
from eva02.fileio import check_writable_dir, temp_path

if TYPE_CHECKING:
    from eva02.data.shard_stream import ShardStream

MANIFEST = "manifest.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


# ------------------------------------------------------------------------------------ manifest, samples
def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A shard manifest (ours, or any wids description with a `shardlist`), checked for its shape."""
    p = Path(path)
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read shard manifest {p}: {e}") from None
    return check_manifest(m, str(p))


def check_manifest(m: Any, where: str) -> dict[str, Any]:
    ok = isinstance(m, dict) and isinstance(m.get("shardlist"), list) and m["shardlist"]
    ok = ok and all(isinstance(e, dict) and isinstance(e.get("url"), str) and isinstance(e.get("nsamples"), int)
                    for e in m["shardlist"])  # fmt: skip
    if not ok:
        raise ValueError(f"{where} is not a shard manifest (a 'shardlist' of {{'url', 'nsamples'}} entries)")
    return m


class HashingFile(io.RawIOBase):
    """A write-only file that keeps the sha256 and size of what passes through it."""

    def __init__(self, path: Path) -> None:
        self.path, self.f, self.sha, self.size = path, open(path, "wb"), hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self.f.closed:  # a discarded shard: tarfile's finalizer may still flush into it
            return len(b)
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def image_bytes(sample: dict[str, Any], name: str) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext].getvalue()
    raise ImageError(f"cannot load image '{name}': the sample has no image ({', '.join(IMAGE_EXTS)})")


def sample_label(sample: dict[str, Any]) -> int | None:
    return int(sample[".cls"].getvalue()) if ".cls" in sample else None


# ------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class Shard:
    name: str  # as given: a path or URL (for messages)
    path: str  # the local file read
    count: int
    class_counts: dict[str, int] | None = None


class ShardDataset(RecordDataset):
    """Samples of local tar shards, indexed in order: sample i is the (i - start)-th of its shard."""

    def __init__(self, shards: list[Shard], classes: list[str], transform: Callable, labelled: bool) -> None:
        self.shards, self.classes, self.transform, self.labelled = shards, list(classes), transform, labelled
        self.ends = [0]
        for s in shards:
            self.ends.append(self.ends[-1] + s.count)
        self._tars: dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self.ends[-1]

    def __getstate__(self) -> dict[str, Any]:  # open tars stay in the process that opened them
        return {**self.__dict__, "_tars": {}, "_pid": -1}

    def _tar(self, s: int):
        if self._pid != os.getpid():  # a DataLoader worker: its own handles
            self._tars, self._pid = {}, os.getpid()
            _raise_open_files_limit(2 * len(self.shards) + 256)  # a tar holds its file and its mmap open
        tar = self._tars.get(s)
        if tar is None:
            shard = self.shards[s]
            tar = self._tars[s] = need("wids.wids", "data", "reading shards").IndexedTarSamples(path=shard.path)
            if len(tar) != shard.count:
                raise ValueError(f"shard {shard.name} holds {len(tar)} samples, {shard.count} expected: it "
                                 "changed since it was listed; check it with `eva02 shard --verify`")  # fmt: skip
        return tar

    def sample(self, index: int) -> dict[str, Any]:
        """The raw sample (wids dict of member bytes, '__key__') at dataset index `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        s = bisect.bisect_right(self.ends, index) - 1
        return self._tar(s)[index - self.ends[s]]

    def first_sample(self) -> dict[str, Any]:
        return self.sample(0)

    def name(self, index: int) -> str:
        s = bisect.bisect_right(self.ends, index) - 1
        return f"{self.shards[s].name}#{index - self.ends[s]}"

    def read(self, index: int) -> tuple[Image.Image, int]:
        sample = self.sample(index)
        name = f"{self.name(index)} ({sample['__key__']})"
        label = sample_label(sample)
        return decode_image(image_bytes(sample, name), name), 0 if label is None else label

    def labels(self) -> set[int]:
        if all(s.class_counts is not None for s in self.shards):
            return {int(k) for s in self.shards for k in s.class_counts}
        return {sample_label(self.sample(i)) or 0 for i in range(len(self))}


def _raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))  # fmt: skip


# ------------------------------------------------------------------------------------ shard specs
def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec) is not None


def _fetch(url: str, cache: Path, sha256: str | None) -> Path:
    """A local copy of shard `url` in `cache` (fetched once, whole, under a lock; checked against `sha256`)."""
    need("webdataset", "data", "fetching shards")
    from webdataset.gopen import gopen

    base = (re.findall(r"[\w.-]+\.tar", url) or ["shard.tar"])[-1]
    dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"
    check_writable_dir(cache, "shard cache (data.shard_cache)")
    with open(cache / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks on this machine wait for the one fetching
        if dest.is_file():
            return dest
        tmp = temp_path(dest, ".part")
        try:
            h = HashingFile(tmp)
            try:
                with gopen(url, "rb") as stream:
                    for chunk in iter(lambda: stream.read(1 << 20), b""):
                        h.write(chunk)
            finally:
                h.finish()
            if sha256 and h.sha.hexdigest() != sha256:
                raise ValueError(f"shard {url}: sha256 {h.sha.hexdigest()} differs from the manifest's {sha256}")
            os.replace(tmp, dest)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"cannot fetch shard {url}: {type(e).__name__}: {e}") from None
    return dest


def _read_spec(spec: str) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any] | None]:
    """[(url or path, manifest entry or {})], manifest: from a folder, a manifest (path or URL) or a brace
    pattern / '::'-separated list of tars (webdataset's `expand_urls`)."""
    need("webdataset", "data", "data.format='wds'")
    from webdataset.shardlists import expand_urls

    if not is_url(spec) and Path(spec).is_dir():
        if not (Path(spec) / MANIFEST).is_file():
            raise FileNotFoundError(f"shard folder {spec!r} has no {MANIFEST} (`eva02 shard` writes it last): "
                                    "incomplete or foreign shards; name the tars by a brace pattern")  # fmt: skip
        spec = str(Path(spec) / MANIFEST)
    if spec.endswith(".json"):
        if is_url(spec):
            from webdataset.gopen import gopen

            with gopen(spec, "rb") as f:
                m = check_manifest(json.loads(f.read()), spec)
            base = spec.rsplit("/", 1)[0]
            return [(e["url"] if is_url(e["url"]) else f"{base}/{e['url']}", e) for e in m["shardlist"]], m
        if not Path(spec).is_file():
            raise FileNotFoundError(f"shard manifest {spec!r} does not exist")
        m = load_manifest(spec)
        return [(e["url"] if is_url(e["url"]) else str(Path(spec).parent / e["url"]), e) for e in m["shardlist"]], m
    urls = expand_urls(spec)
    if not urls or not all(u.strip() for u in urls):
        raise ValueError(f"shard pattern {spec!r} names no tar files")
    return [(u, {}) for u in urls], None


def shard_dataset(
    spec: str,
    transform: Callable,
    cache_dir: str = "",
    names_file: str = "",
    stream: bool = False,
    shuffle_buffer: int = 1000,
) -> ShardDataset | ShardStream:
    """The dataset of shard `spec`: a folder with manifest.json, a manifest (path or URL), or a brace
    pattern of tars (paths, URLs, `pipe:` commands). URLs are fetched into `cache_dir` first; with `stream`,
    nothing is fetched or indexed: a `shard_stream.ShardStream` reads the shards in order (through a
    shuffle buffer of `shuffle_buffer` samples), counted once where no manifest gives their sizes."""
    entries, manifest = _read_spec(spec)
    if stream:
        from eva02.data.shard_stream import stream_dataset

        ds = stream_dataset(entries, transform, shuffle_buffer)
    else:
        ds = _indexed(entries, transform, cache_dir)
    if manifest is not None and "classes" in manifest:
        ds.classes, ds.labelled = list(manifest["classes"]), bool(manifest["classes"])
    elif len(ds):
        ds.labelled = sample_label(ds.first_sample()) is not None
        ds.classes = [f"class_{i}" for i in range(max(ds.labels()) + 1)] if ds.labelled else []
    if names_file:
        names = read_names(names_file)
        if ds.classes and len(names) != len(ds.classes):
            raise ValueError(f"{names_file!r} has {len(names)} names but the shards {spec!r} have {len(ds.classes)}")
        ds.classes = names
    if not ds.labelled:
        ds.classes = ["image"]
    return ds


def _indexed(entries: list[tuple[str, dict[str, Any]]], transform: Callable, cache_dir: str) -> ShardDataset:
    IndexedTarSamples = need("wids.wids", "data", "data.format='wds'").IndexedTarSamples

    cache = Path(cache_dir) if cache_dir else _default_cache()
    shards = []
    for url, e in entries:
        path = _fetch(url, cache, e.get("sha256")) if is_url(url) else Path(url)
        if not path.is_file():
            raise FileNotFoundError(f"shard {url} does not exist; check data.train_shards / data.val_shards")
        n = e.get("nsamples")
        if n is None or ("filesize" in e and path.stat().st_size != e["filesize"]):
            tar = IndexedTarSamples(path=str(path))
            n = len(tar)
            tar.close()
            if e and n != e["nsamples"]:
                raise ValueError(f"shard {url} holds {n} samples, its manifest says {e['nsamples']}; rewrite it")
        shards.append(Shard(url, str(path), n, e.get("class_counts")))
    return ShardDataset(shards, [], transform, labelled=False)


def _default_cache() -> Path:
    from eva02.weights.download import get_cache_dir

    return get_cache_dir() / "shards"
