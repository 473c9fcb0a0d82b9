"""Streamed WebDataset shards (`data.streaming`): the train split read front to back through webdataset's
`gopen` (paths, `file://`, `http(s)://`, `pipe:` commands, ...) instead of being fetched and indexed.

How an epoch is dealt out, so that order and augmentation follow the run seed and resume is exact:

- The epoch stream is the shards in an order drawn from (seed, epoch), each passed through a shuffle
  buffer seeded by (seed, epoch, shard). It depends on (seed, epoch) alone.
- Its first `steps x global batch` samples are trained (the rest, fewer than one global batch, is left
  out of that epoch). Process `rank` reads a contiguous part of them, every process the same number.
- A process's micro-batches are cut into contiguous runs, one per DataLoader worker; the loader takes a
  batch from each worker in turn. The order therefore also depends on the number of processes and
  workers; the set of samples of an epoch and each sample's augmentation do not.
- A sample's augmentation seed is `sample_seed(seed, epoch, index)`, with `index` its number in the shard
  list as the indexed reader (`shards.ShardDataset`) counts: the same augmentation in both modes.
- Resuming at step s of an epoch, each worker skips the micro-batches of its run that the first
  s x accumulation micro-batches of its process held (read, not decoded), and the workers' turns start at
  the one whose turn was next: the rest of the epoch comes in the uninterrupted order.

A piece that starts inside a shard reads the shard from its beginning (a stream cannot seek), so an
epoch reads at most one extra shard per worker of every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from eva02.data.datasets import BadSample, RecordDataset, sample_seed
from eva02.data.images import ImageError, decode_image
from eva02.data.shards import Shard, image_bytes, is_url, sample_label
from eva02.extras import need

# curl's exit codes (webdataset opens http(s) URLs with curl) that say more than the number
CURL_CODES = {6: "host not found", 7: "connection refused", 22: "the server answered with an HTTP error such as 404",
              28: "timed out", 35: "TLS handshake failed", 56: "connection broken"}  # fmt: skip


class StreamError(ValueError):
    """A shard that cannot be streamed. Re-raised by the DataLoader from a worker, the message is cut back
    to its own line (the loader puts the worker's traceback into it)."""

    def __init__(self, msg: str) -> None:
        if msg.startswith("Caught ") and "Original Traceback" in msg:
            msg = msg.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(msg)


# ------------------------------------------------------------------------------------ one shard
def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of tar shard `url` in stored order, shaped as `wids` gives them ('__key__', '.jpg':
    BytesIO, ...); StreamError naming the shard when it cannot be opened or read to its end. Closing the
    generator early stops the transfer (a command is killed)."""
    need("webdataset", "data", "streaming shards (data.streaming)")
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream, finished = None, False
    try:
        stream = gopen(url, "rb")
        for s in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            yield {"__key__": s["__key__"], **{f".{k}": io.BytesIO(v) for k, v in s.items() if not k.startswith("__")}}
        while stream.read(1 << 16):  # the tar's padding: a command's exit status comes at its very end
            pass
        stream.close()  # a pipe: waits for the command and raises on a failed exit
        finished = True
    except Exception as e:
        raise StreamError(f"cannot read shard {url}: {_reason(e, stream)}; check data.train_shards") from None
    finally:
        if not finished:
            _stop(stream)


def _reason(e: Exception, stream: Any) -> str:
    """Why reading failed: a command's exit status when it failed (curl's in words), else the error."""
    proc = getattr(stream, "proc", None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.wait(timeout=2)
            if code not in (0, 141):
                cmd = stream.args[0][0]
                who = "curl" if isinstance(cmd, list) else "the command"
                hint = f" ({CURL_CODES[code]})" if who == "curl" and code in CURL_CODES else ""
                return f"{who} exited with status {code}{hint}"
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e.args[0]) if e.args else ""
    return f"{type(e).__name__}: {text.split(' @ ')[0]}" if text else type(e).__name__


def _stop(stream: Any) -> None:
    """Close a stream read only in part: a command still writing is killed, and its status is no news."""
    if stream is None:
        return
    proc = getattr(stream, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):
        stream.close()


def numbered(shard: Shard) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position in the shard, sample) for the `shard.count` samples of a shard; StreamError when it holds
    another number (it changed since it was listed)."""
    changed = "expected: it changed since it was listed; rewrite its manifest or check the shards"
    samples = read_shard(shard.path)
    n = 0
    try:
        for raw in samples:
            if n == shard.count:
                raise StreamError(f"shard {shard.name} holds more than {n} samples, {shard.count} {changed}")
            yield n, raw
            n += 1
    finally:
        samples.close()
    if n != shard.count:
        raise StreamError(f"shard {shard.name} holds {n} samples, {shard.count} {changed}")


def scan_shard(url: str) -> tuple[int, dict[str, int]]:
    """(samples, samples per label) of a shard read through once (samples without a label are not in the
    second)."""
    counts: Counter[str] = Counter()
    n = 0
    for raw in read_shard(url):
        n += 1
        label = sample_label(raw)
        if label is not None:
            counts[str(label)] += 1
    return n, dict(counts)


def buffered_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """`items` in an order shuffled through a buffer of `size` (each new item takes the place of a random one
    that goes out; the last `size` come out in a random order); size 0 or 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


# ------------------------------------------------------------------------------------ dealing out an epoch
@dataclass(frozen=True)
class Piece:
    """Positions [start, stop) of shard `shard` in its shuffled order."""

    shard: int
    start: int
    stop: int


def shard_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of `n` shards in epoch `epoch` of a run seeded `seed`."""
    order = list(range(n))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)  # a str seed is hashed with sha512: stable
    return order


def cut(counts: list[int], order: list[int], begin: int, end: int) -> list[Piece]:
    """The pieces of shards that hold positions [begin, end) of the epoch stream (shards in `order`)."""
    pieces, pos = [], 0
    for s in order:
        lo, hi = max(begin, pos), min(end, pos + counts[s])
        if lo < hi:
            pieces.append(Piece(s, lo - pos, hi - pos))
        pos += counts[s]
        if pos >= end:
            break
    return pieces


def worker_span(batches: int, workers: int, worker: int, done: int) -> tuple[int, int]:
    """Micro-batches [first, stop) of a process's `batches` that DataLoader worker `worker` of `workers`
    (0: the process itself) still reads once the first `done` of them have been trained.

    Each worker has a contiguous run (the first `batches % workers` runs one longer) and the loader takes a
    batch from each worker in turn, so batch j of the process is run j % workers's (j // workers)-th. After
    `done`, the loader's first worker plays run `done % workers`: the turns continue where they stopped.
    """
    w = max(workers, 1)
    base, extra = divmod(batches, w)
    rounds, turn = divmod(done, w)
    run = (turn + worker) % w
    first, size = run * base + min(run, extra), base + (run < extra)
    return first + min(rounds + (run < turn), size), first + size


class ShardStream(RecordDataset, IterableDataset):
    """Tar shards streamed in an order from (seed, epoch), dealt out to processes and workers (see the module
    docstring). Items are those of the indexed reader: (image tensor, label, index) or BadSample.

    `plan` (once) and `set_epoch` (each epoch) say what to read; the loop uses the stream as its sampler.
    """

    def __init__(self, shards: list[Shard], transform: Callable, buffer: int) -> None:
        self.shards, self.transform, self.buffer = shards, transform, buffer
        self.classes: list[str] = []
        self.labelled = False
        self.starts = [0]
        for s in shards:
            self.starts.append(self.starts[-1] + s.count)
        self.global_batch, self.micro_batch, self.rank, self.world, self.seed = 1, 1, 0, 1, 0
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: Any) -> Any:
        raise TypeError("streamed shards are read in order (iterate over them), not by index")

    def plan(self, global_batch: int, micro_batch: int, rank: int, world: int, seed: int) -> ShardStream:
        """Deal epochs out to process `rank` of `world` in micro-batches of `micro_batch`, `global_batch` =
        micro_batch x world x accumulation, from the run seed `seed`; returns the stream itself."""
        if global_batch % (micro_batch * world):
            raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batch} x {world} processes")
        self.global_batch, self.micro_batch, self.seed = global_batch, micro_batch, seed
        self.rank, self.world = rank, world
        return self

    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Read epoch `epoch` from its optimizer step `start_step` on (the steps before are skipped)."""
        self.epoch, self.start_step = epoch, start_step

    def pieces(self, worker: int, workers: int) -> list[Piece]:
        """What DataLoader worker `worker` of `workers` (0: no workers) of this process reads this epoch."""
        accum = self.global_batch // (self.micro_batch * self.world)
        batches = self.steps_per_epoch() * accum
        first, stop = worker_span(batches, workers, worker, self.start_step * accum)
        base = self.rank * batches * self.micro_batch
        order = shard_order(len(self.shards), self.seed, self.epoch)
        b = self.micro_batch
        return cut([s.count for s in self.shards], order, base + first * b, base + stop * b)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        pieces = self.pieces(info.id, info.num_workers) if info is not None else self.pieces(0, 0)
        return self._read_all(pieces, self.epoch)  # the epoch is taken now, not when reading starts

    def _read_all(self, pieces: list[Piece], epoch: int) -> Iterator[Any]:
        for p in pieces:
            yield from self._read(p, epoch)

    def _read(self, piece: Piece, epoch: int) -> Iterator[Any]:
        rng = random.Random(f"buffer/{self.seed}/{epoch}/{piece.shard}")
        samples = numbered(self.shards[piece.shard])
        shuffled = buffered_shuffle(samples, self.buffer, rng)
        try:
            for pos, (offset, raw) in enumerate(shuffled):
                if pos >= piece.stop:
                    break
                if pos >= piece.start:  # earlier ones belong to another worker or were trained before a resume
                    yield self._item(piece.shard, offset, raw, epoch)
        finally:
            shuffled.close()
            samples.close()

    def _item(self, s: int, offset: int, raw: dict[str, Any], epoch: int) -> Any:
        index = self.starts[s] + offset
        name = f"{self.shards[s].name}#{offset}"
        full = f"{name} ({raw['__key__']})"
        try:
            with self.decoding():  # as the indexed reader: JPEGs left to a transform that decodes them itself
                img = decode_image(image_bytes(raw, full), full)
            out = self.apply(img, sample_seed(self.seed, epoch, index))  # a deferred JPEG's data errors come here
        except ImageError as e:
            return BadSample(name, str(e))
        label = sample_label(raw)
        label = 0 if label is None else label
        if self.label_map is not None:
            label = self.label_map[label]
        return out, label, index

    def first_sample(self) -> dict[str, Any]:
        """The first sample of the first shard that holds one (read, then the transfer stops)."""
        shard = next(s for s in self.shards if s.count)
        samples = read_shard(shard.path)
        try:
            return next(samples)
        finally:
            samples.close()

    def labels(self) -> set[int]:
        missing = [i for i, s in enumerate(self.shards) if s.class_counts is None]
        for i, (_, counts) in zip(missing, _scan([self.shards[i].path for i in missing]), strict=True):
            self.shards[i] = dataclasses.replace(self.shards[i], class_counts=counts)
        return {int(k) for s in self.shards for k in s.class_counts}


def _scan(urls: list[str]) -> list[tuple[int, dict[str, int]]]:
    if not urls:
        return []
    with ThreadPoolExecutor(min(8, len(urls))) as pool:  # waiting on transfers, not on the CPU
        return list(pool.map(scan_shard, urls))


def stream_dataset(entries: list[tuple[str, dict[str, Any]]], transform: Callable, buffer: int) -> ShardStream:
    """The stream of shards `entries` ([(path or URL, manifest entry or {})]): counts from the manifest, or
    from reading each shard through once where there is none. Local files are checked for presence and size."""
    for url, e in entries:
        if is_url(url):
            continue
        if not Path(url).is_file():
            raise FileNotFoundError(f"shard {url} does not exist; check data.train_shards")
        size = Path(url).stat().st_size
        if "filesize" in e and size != e["filesize"]:
            raise ValueError(f"shard {url} has {size} bytes, its manifest says {e['filesize']}: it changed since it "
                             "was written; check it with `eva02 shard --verify`")  # fmt: skip
    todo = [i for i, (_, e) in enumerate(entries) if "nsamples" not in e]
    scanned = dict(zip(todo, _scan([entries[i][0] for i in todo]), strict=True))
    shards = []
    for i, (url, e) in enumerate(entries):
        count, counts = (e["nsamples"], e.get("class_counts")) if i not in scanned else scanned[i]
        shards.append(Shard(url, url, count, counts))
    return ShardStream(shards, transform, buffer)
