"""Writing WebDataset tar shards from class folders, list files or plain folders (`write_shards`), and
checking them against their manifest (`verify_shards`); `shards.py` reads them.

A shard holds samples `{key}.jpg|png` (the image file's own bytes when it is a JPEG or PNG, else a
lossless PNG of the decoded RGB image), `{key}.cls` (the label, absent for plain folders) and
`{key}.json` (source path and class name). Tars are written by `webdataset`'s TarWriter with a fixed
mtime (the same input gives the same bytes), a new one when the current tar reaches the shard size,
under temporary names, renamed into place when all of them are complete; `manifest.json` comes last.
It is also a `wids` dataset description (`shardlist` of `url` / `nsamples`) and adds the sha256, byte
size and per-class counts of each shard, the class names and the images left out as unreadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from eva02.data.datasets import read_list, read_names, scan_folders
from eva02.data.images import ImageError, decode_image, iter_image_paths, read_bytes
from eva02.data.shards import MANIFEST, HashingFile, image_bytes, load_manifest, sample_label
from eva02.extras import need
from eva02.fileio import OutputError, atomic_write_text, check_writable_dir, clean_stale_temps, current_umask, temp_path
from eva02.hints import count

FORMAT = "eva02-shards"
SHARD_NAME = "shard-%06d.tar"


# ------------------------------------------------------------------------------------ images
def encode_file(path: str) -> tuple[str, bytes]:
    """(key, bytes) to store for an image file: 'jpg'/'png' with the file's bytes, else 'png' of the
    decoded RGB image; ImageError (one line) when the file cannot be used."""
    data = read_bytes(path)
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
    files: list[HashingFile] = field(default_factory=list)
    done: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None
    bytes: int = 0
    counts: Counter = field(default_factory=Counter)

    def write(self, sample: dict[str, Any], label: int) -> None:
        if self.writer is None or self.bytes >= self.size:
            self.finish()
            self.files.append(HashingFile(temp_path(self.out / (SHARD_NAME % len(self.files)), ".part")))
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


# ------------------------------------------------------------------------------------ verify
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
            label = sample_label(s)
            counts[-1 if label is None else label] += 1
            if label is not None and not 0 <= label < max(num_classes, 1):
                problems.append(f"{name}: sample {s['__key__']} has label {label}, outside [0, {num_classes})")
            try:
                decode_image(image_bytes(s, f"{name}:{s['__key__']}"), f"{name}:{s['__key__']}")
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
