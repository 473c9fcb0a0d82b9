"""WebDataset tar shards: written from class folders, list files or plain folders (`write_shards`), checked
(`verify_shards`) and read as an indexable dataset (`shard_dataset`).

A shard holds samples `{key}.jpg|png` (the image file's own bytes when it is a JPEG or PNG, else a
lossless PNG of the decoded RGB image), `{key}.cls` (the label, absent for plain folders) and
`{key}.json` (source path and class name). Tars are written by `webdataset`'s TarWriter with a fixed
mtime (the same input gives the same bytes), a new one when the current tar reaches the shard size,
under temporary names, renamed into place when all of them are complete; `manifest.json` comes last.
It is also a `wids` dataset description (`shardlist` of `url` / `nsamples`) and adds the sha256, byte
size and per-class counts of each shard, the class names and the images left out as unreadable.

Reading goes through `wids` (webdataset's indexed reader: a tar's members indexed once, then read by
offset), so sample `i` of the dataset is a fixed (shard, offset) and the engine's samplers apply as to
image folders: order and augmentation from (seed, epoch, index), exact resume with any number of
processes. Shards named by URL or `pipe:` command (anything `webdataset.gopen` opens) are fetched whole
into a local cache first, which keeps that guarantee; streaming them is not offered by the loop.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import resource
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from eva02.data.datasets import BadSample, read_list, read_names, scan_folders
from eva02.data.images import ImageError, iter_image_paths, to_rgb
from eva02.extras import need
from eva02.fileio import (
    OutputError,
    atomic_write_text,
    check_writable_dir,
    clean_stale_temps,
    current_umask,
    temp_path,
)
from eva02.hints import count

MANIFEST = "manifest.json"
FORMAT = "eva02-shards"
SHARD_NAME = "shard-%06d.tar"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")


# ------------------------------------------------------------------------------------ images
def decode_image(data: bytes, name: str) -> Image.Image:
    """Image bytes -> upright RGB, decoded as `load_image` decodes a file (fully; bombs refused)."""

    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load image '{name}': {reason}")

    if not data:
        raise fail("no image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise fail(f"too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise fail("not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise fail(f"truncated or corrupt image data ({' '.join(str(e).split()) or type(e).__name__})") from None


def encode_file(path: str) -> tuple[str, bytes]:
    """(key, bytes) to store for an image file: 'jpg'/'png' with the file's bytes, else 'png' of the
    decoded RGB image; ImageError (one line) when the file cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot load image '{path}': {e.strerror or e}") from None
    img = decode_image(data, path)
    with Image.open(io.BytesIO(data)) as probe:
        fmt = probe.format
    if fmt in ("JPEG", "PNG"):
        return ("jpg" if fmt == "JPEG" else "png"), data
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def _encode_or_reason(path: str) -> tuple[str, bytes] | tuple[None, str]:
    try:
        return encode_file(path)
    except ImageError as e:
        return None, str(e)


# ------------------------------------------------------------------------------------ sources
@dataclass
class Source:
    """What to shard: (path, label) items in dataset order, class names ([] for a plain folder)."""

    root: Path
    items: list[tuple[str, int]]
    classes: list[str]
    kind: str  # 'folders' | 'list' | 'plain'


def scan_source(src: str | os.PathLike, list_file: str = "", names_file: str = "", labels: bool = True) -> Source:
    """Class folders (`src/<class>/...`), a list file of `relative/path label` lines (paths under `src`),
    or, without labels or class folders, every image below `src`; in the order training reads them."""
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {str(root)!r} does not exist")
    if list_file:
        items = read_list(list_file, root)
        n = max((lab for _, lab in items), default=-1) + 1
        classes = read_names(names_file) if names_file else [f"class_{i}" for i in range(n)]
        return Source(root, items, classes, "list")
    has_classes = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if labels and has_classes:
        items, classes = scan_folders(root)
        if names_file:
            names = read_names(names_file)
            if len(names) != len(classes):
                raise ValueError(f"{names_file!r} has {len(names)} names but {str(root)!r} has {len(classes)} folders")
            classes = names
        return Source(root, items, classes, "folders")
    return Source(root, [(str(p), -1) for p in iter_image_paths(root)], [], "plain")


# ------------------------------------------------------------------------------------ writing
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'1GB' -> 10**9 bytes ('GiB' for 2**30); a plain number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not m or float(m[1]) <= 0:
        raise ValueError(f"shard size {text!r} is not a size like 1GB, 500MB or 2GiB")
    return max(1, int(float(m[1]) * _UNITS[m[2] or ""]))


def previous_output(out: Path) -> list[Path]:
    """The files of an earlier `write_shards` in `out` (its manifest and shards); [] for a new or empty
    folder; OutputError when `out` holds anything else."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder; choose a folder for the shards")
    files = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not files:
        return []
    manifest = out / MANIFEST
    names = {e["url"] for e in load_manifest(manifest)["shardlist"]} if manifest.is_file() else set()
    foreign = [p.name for p in files if p.name != MANIFEST and p.name not in names]
    if foreign or not manifest.is_file():
        shown = ", ".join(sorted(foreign)[:3]) or "no manifest.json"
        raise OutputError(f"{out} holds files that are not shards of `eva02 shard` ({shown}); choose a new folder")
    return files


def check_out(out: str | os.PathLike, src: str | os.PathLike, force: bool) -> list[Path]:
    """Check before any work that shards may go to `out`; returns earlier shard files to replace."""
    out, src = Path(out), Path(src)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise OutputError(f"the output folder {out} is inside the source {src}; choose a folder outside it")
    old = previous_output(out)
    if old and not force:
        raise OutputError(f"{out} already holds shards; pass --force to replace them or choose another folder")
    check_writable_dir(out, "output folder")
    return old


class _HashingFile(io.RawIOBase):
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


def _tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member, data padded to 512-byte blocks."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")


@dataclass
class _Shards:
    """The shards of one `write_shards` call: webdataset TarWriters over temporary files, a new one when
    the current tar has reached `size` bytes; per-shard figures for the manifest."""

    out: Path
    size: int
    tar_writer: Callable
    files: list[_HashingFile] = field(default_factory=list)
    done: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None
    bytes: int = 0
    counts: Counter = field(default_factory=Counter)

    def write(self, sample: dict[str, Any], label: int) -> None:
        if self.writer is None or self.bytes >= self.size:
            self.finish()
            self.files.append(_HashingFile(temp_path(self.out / (SHARD_NAME % len(self.files)), ".part")))
            self.writer, self.bytes, self.counts = self.tar_writer(self.files[-1], mtime=0), 0, Counter()
        self.writer.write(sample)
        self.bytes += _tar_bytes(sample)
        self.counts[label] += 1

    def finish(self) -> None:
        """Close the current shard and note its figures."""
        if self.writer is None:
            return
        self.writer.close()
        self.writer, f = None, self.files[-1]
        f.finish()
        counts = {str(k): v for k, v in sorted(self.counts.items())}
        self.done.append({"url": SHARD_NAME % (len(self.files) - 1), "nsamples": sum(counts.values()),
                          "filesize": f.size, "sha256": f.sha.hexdigest(), "class_counts": counts})  # fmt: skip

    def discard(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                f.f.close()
                f.path.unlink()


def _encoded(items: Sequence[tuple[str, int]], workers: int) -> Iterator[tuple[str, bytes] | tuple[None, str]]:
    """Each item's (key, bytes) or (None, reason), in order; decoded by `workers` processes (0: here)."""
    paths = [p for p, _ in items]
    if workers <= 0:
        yield from map(_encode_or_reason, paths)
        return
    with _pool(workers) as pool:
        yield from pool.imap(_encode_or_reason, paths, chunksize=16)


def _pool(workers: int):
    """A pool of `workers` processes (forked where the platform allows: no re-import of the caller)."""
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ctx.Pool(workers)


def write_shards(
    source: Source,
    out: str | os.PathLike,
    shard_size: int = 10**9,
    force: bool = False,
    workers: int = 0,
    on_item: Callable[[str | None], None] | None = None,
) -> dict[str, Any]:
    """Write `source` as tar shards of about `shard_size` bytes into `out`, then `out/manifest.json`;
    returns the manifest. Unreadable images are left out (listed under 'skipped'; `on_item` gets each
    item's failure reason, None when it was written). Earlier shards are replaced only with `force`."""
    wds = need("webdataset", "data", "writing shards")
    out = Path(out)
    old = check_out(out, source.root, force)
    clean_stale_temps(out)
    shards, skipped = _Shards(out, shard_size, wds.TarWriter), []
    encoded = _encoded(source.items, workers)
    try:
        for i, ((path, label), (key, data)) in enumerate(zip(source.items, encoded, strict=True)):
            if key is None:
                skipped.append({"path": path, "reason": data})
                if on_item:
                    on_item(data)
                continue
            meta = {"path": os.path.relpath(path, source.root), "index": i}
            sample = {"__key__": f"{i:09d}", key: data}
            if source.kind != "plain":
                sample["cls"], meta["class"] = str(label).encode(), source.classes[label]
            sample["json"] = json.dumps(meta).encode()  # members as bytes: their tar size is known
            shards.write(sample, label)
            if on_item:
                on_item(None)
        if not shards.files:
            raise ValueError(f"no usable images in {source.root} ({count(len(skipped), 'unreadable image')})")
        shards.finish()
        manifest = {"format": FORMAT, "version": 1, "wids_version": 1, "name": out.name, "source": str(source.root),
                    "kind": source.kind, "classes": source.classes, "count": sum(e["nsamples"] for e in shards.done),
                    "shardlist": shards.done, "skipped": skipped}  # fmt: skip
        _commit(out, shards, old, manifest)
    except BaseException:
        shards.discard()
        raise
    finally:
        encoded.close()  # stops the decoding processes
    return manifest


def _commit(out: Path, shards: _Shards, old: list[Path], manifest: dict[str, Any]) -> None:
    """Rename the finished temporaries into place; the manifest goes last (first gone: `old` ones)."""
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST).unlink()  # no manifest describes the folder while it changes
    for f, e in zip(shards.files, shards.done, strict=True):
        os.chmod(f.path, 0o666 & ~current_umask())
        os.replace(f.path, out / e["url"])
    kept = {e["url"] for e in manifest["shardlist"]}
    for p in old:
        if p.name not in kept and p.name != MANIFEST:
            p.unlink(missing_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


# ------------------------------------------------------------------------------------ manifest, verify
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


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_one(args: tuple[str, dict[str, Any], int]) -> list[str]:
    """Problems of one shard: missing, size, sha256, sample count, class counts, undecodable images."""
    IndexedTarSamples = need("wids.wids", "data", "reading shards").IndexedTarSamples
    path, entry, num_classes = args
    name = entry["url"]
    if not os.path.isfile(path):
        return [f"{name}: missing"]
    problems = []
    if "filesize" in entry and os.path.getsize(path) != entry["filesize"]:
        problems.append(f"{name}: {os.path.getsize(path)} bytes, the manifest says {entry['filesize']}")
    if "sha256" in entry and sha256_file(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest's")
    try:
        tar = IndexedTarSamples(path=path)
    except Exception as e:  # wids reports a damaged tar with whatever its parser meets
        return [*problems, f"{name}: not a readable tar ({type(e).__name__}: {e})"]
    counts: Counter = Counter()
    try:
        for j in range(len(tar)):
            s = tar[j]
            label = _label(s)
            counts[-1 if label is None else label] += 1
            if label is not None and not 0 <= label < max(num_classes, 1):
                problems.append(f"{name}: sample {s['__key__']} has label {label}, outside [0, {num_classes})")
            try:
                decode_image(_image_bytes(s, f"{name}:{s['__key__']}"), f"{name}:{s['__key__']}")
            except ImageError as e:
                problems.append(f"{name}: {e}")
    finally:
        tar.close()
    if len(tar) != entry["nsamples"]:
        problems.append(f"{name}: {len(tar)} samples, the manifest says {entry['nsamples']}")
    if "class_counts" in entry and {str(k): v for k, v in sorted(counts.items())} != entry["class_counts"]:
        problems.append(f"{name}: the samples per class differ from the manifest's")
    return problems


def verify_shards(folder: str | os.PathLike, workers: int = 0) -> tuple[dict[str, Any], list[str]]:
    """(manifest, problems): every shard of `folder` re-read against its manifest entry."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a finished `eva02 shard` output")
    m = load_manifest(folder / MANIFEST)
    n = len(m.get("classes", []))
    jobs = [(str(folder / e["url"]), e, n) for e in m["shardlist"]]
    if workers > 0 and len(jobs) > 1:
        with _pool(min(workers, len(jobs))) as pool:
            results = pool.map(_verify_one, jobs, chunksize=1)
    else:
        results = list(map(_verify_one, jobs))
    problems = [p for r in results for p in r]
    total = sum(e["nsamples"] for e in m["shardlist"])
    if "count" in m and m["count"] != total:
        problems.append(f"{MANIFEST}: count {m['count']} differs from the shards' sum {total}")
    return m, problems


# ------------------------------------------------------------------------------------ reading
def _image_bytes(sample: dict[str, Any], name: str) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext].getvalue()
    raise ImageError(f"cannot load image '{name}': the sample has no image ({', '.join(IMAGE_EXTS)})")


def _label(sample: dict[str, Any]) -> int | None:
    return int(sample[".cls"].getvalue()) if ".cls" in sample else None


class RecordDataset(Dataset):
    """Records -> (image tensor, label, index), or BadSample when the image is unusable; the transform is
    seeded by the sampler's key exactly as `ImageDataset` does. Subclasses implement `read` and `labels`."""

    classes: list[str]
    labelled: bool
    transform: Callable
    label_map: list[int] | None = None  # validation labels renamed to train labels (`align_classes`)

    def read(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of record `index`; ImageError for an unusable image."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        return f"record {index}"

    def labels(self) -> set[int]:
        """The labels that occur (before `align_classes`)."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            img, label = self.read(index)
        except ImageError as e:
            return BadSample(self.name(index), str(e))
        if self.label_map is not None:
            label = self.label_map[label]
        if seed is None:
            return self.transform(img), label, index
        py_state = random.getstate()  # as ImageDataset: the caller's random streams stay as they were
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            out = self.transform(img)
        random.setstate(py_state)
        return out, label, index

    def check_not_empty(self, what: str) -> None:
        if len(self) == 0:
            raise ValueError(f"the {what} dataset is empty")

    def check(self, num_classes: int, what: str) -> None:
        """Errors before training: empty, unlabelled, or labels outside [0, num_classes)."""
        self.check_not_empty(what)
        if not self.labelled:
            raise ValueError(f"the {what} dataset has no labels (a plain folder's images); classifying needs "
                             "class folders or a list file behind it")  # fmt: skip
        labels = self.labels()
        if self.label_map is not None:
            labels = {self.label_map[lab] for lab in labels}
        bad = [lab for lab in labels if not 0 <= lab < num_classes]
        if bad:
            raise ValueError(f"the {what} dataset has label {min(bad)} outside [0, {num_classes}); "
                             "fix the dataset's labels or set model.num_classes")  # fmt: skip

    def align_classes(self, classes: list[str]) -> None:
        """Give each class the label of the same name in `classes` (validation against train)."""
        unknown = sorted(set(self.classes) - set(classes))
        if unknown:
            raise ValueError(f"validation classes {unknown[:5]} are not train classes; both need the same names")
        index = {c: i for i, c in enumerate(classes)}
        self.label_map = [index[c] for c in self.classes]
        self.classes = list(classes)


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

    def name(self, index: int) -> str:
        s = bisect.bisect_right(self.ends, index) - 1
        return f"{self.shards[s].name}#{index - self.ends[s]}"

    def read(self, index: int) -> tuple[Image.Image, int]:
        sample = self.sample(index)
        name = f"{self.name(index)} ({sample['__key__']})"
        label = _label(sample)
        return decode_image(_image_bytes(sample, name), name), 0 if label is None else label

    def labels(self) -> set[int]:
        if all(s.class_counts is not None for s in self.shards):
            return {int(k) for s in self.shards for k in s.class_counts}
        return {_label(self.sample(i)) or 0 for i in range(len(self))}


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
            h = _HashingFile(tmp)
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


def shard_dataset(spec: str, transform: Callable, cache_dir: str = "", names_file: str = "") -> ShardDataset:
    """The dataset of shard `spec`: a folder with manifest.json, a manifest (path or URL), or a brace
    pattern of tars (paths, URLs, `pipe:` commands). URLs are fetched into `cache_dir` first."""
    IndexedTarSamples = need("wids.wids", "data", "data.format='wds'").IndexedTarSamples

    entries, manifest = _read_spec(spec)
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
    ds = ShardDataset(shards, [], transform, labelled=False)
    if manifest is not None and "classes" in manifest:
        ds.classes, ds.labelled = list(manifest["classes"]), bool(manifest["classes"])
    elif len(ds):
        ds.labelled = _label(ds.sample(0)) is not None
        ds.classes = [f"class_{i}" for i in range(max(ds.labels()) + 1)] if ds.labelled else []
    if names_file:
        names = read_names(names_file)
        if ds.classes and len(names) != len(ds.classes):
            raise ValueError(f"{names_file!r} has {len(names)} names but the shards {spec!r} have {len(ds.classes)}")
        ds.classes = names
    if not ds.labelled:
        ds.classes = ["image"]
    return ds


def _default_cache() -> Path:
    from eva02.weights.download import get_cache_dir

    return get_cache_dir() / "shards"
