"""The index file of image embeddings: its format, reading and writing it, and exact search over it.

The index is one safetensors file:
    embeddings (N, E) float16   unit-norm image embeddings, one row per image (fp32 maths when searching)
    paths      (B,)   uint8     paths relative to the indexed folder, NUL-separated bytes (os.fsencode)
    sizes      (N,)   int64     each file's size and
    mtimes     (N,)   int64     modification time (ns) when it was embedded: how `update` sees changed files
and its metadata holds the format, the folder, an `index_id` and the model as JSON (zoo name, checkpoint,
config, preprocessing, and the embedding of a fixed synthetic probe image). The paths are a tensor rather
than metadata because safetensors caps its JSON header at 100 MB, about a million paths.

Search is exact (a matrix product over chunks of rows, keeping a running top-k), or through a faiss index
of `eva02.retrieval.ann`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from eva02.data.images import iter_image_paths
from eva02.extras import need
from eva02.fileio import PathLike, atomic_write

FORMAT = "eva02-image-index"
NPROBE = 32  # IVF lists visited per query
CHUNK_ROWS = 16384  # rows per step of an exact search: 64 MB of fp32 at E = 1024
_DTYPES = {torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}


@dataclass(frozen=True)
class Hit:
    row: int
    path: str  # relative to the index's folder
    score: float  # cosine similarity


@dataclass(frozen=True)
class FileRow:
    rel: str  # path relative to the folder
    size: int
    mtime: int  # ns

    @property
    def key(self) -> tuple[str, int, int]:
        return self.rel, self.size, self.mtime


def list_images(folder: PathLike) -> list[FileRow]:
    """The images below `folder` (sorted, recursive, hidden files skipped) with their size and mtime."""
    root = Path(folder)
    rows = []
    for f in iter_image_paths(root):
        with contextlib.suppress(OSError):  # vanished since the listing: not part of this index
            st = f.stat()
            rows.append(FileRow(f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return rows


def _write_safetensors(
    tmp: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...], Iterable[torch.Tensor]]], metadata: dict[str, str]
) -> None:
    """Write a safetensors file whose tensors arrive in chunks (the format: little-endian u64 header size,
    the JSON header padded with spaces to 8 bytes, then each tensor's bytes in header order)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in tensors:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    assert sys.byteorder == "little", "safetensors files are little-endian"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, _, chunks in tensors:
            start, end = header[name]["data_offsets"]
            written = 0
            for t in chunks:
                data = t.to(dtype).contiguous().numpy().tobytes()
                f.write(data)
                written += len(data)
            if written != end - start:
                raise RuntimeError(f"{name}: wrote {written} bytes, expected {end - start}")


def _row_tensors(rows: Sequence[FileRow]) -> list[tuple[str, torch.dtype, tuple[int, ...], list[torch.Tensor]]]:
    names = b"\0".join(os.fsencode(r.rel) for r in rows)
    return [
        ("paths", torch.uint8, (len(names),), [torch.from_numpy(np.frombuffer(names, dtype=np.uint8).copy())]),
        ("sizes", torch.int64, (len(rows),), [torch.tensor([r.size for r in rows], dtype=torch.int64)]),
        ("mtimes", torch.int64, (len(rows),), [torch.tensor([r.mtime for r in rows], dtype=torch.int64)]),
    ]


def _read_rows(f) -> list[FileRow]:
    names = bytes(f.get_tensor("paths").numpy()).split(b"\0")
    sizes, mtimes = f.get_tensor("sizes").tolist(), f.get_tensor("mtimes").tolist()
    if names == [b""] and not sizes:
        names = []
    if not len(names) == len(sizes) == len(mtimes):
        raise ValueError("its paths, sizes and mtimes disagree in length")
    return [FileRow(os.fsdecode(n), s, m) for n, s, m in zip(names, sizes, mtimes, strict=True)]


def _faiss():
    """The faiss module (the `ann` extra), or MissingExtra saying how to install it."""
    return need("faiss", "ann", "approximate search")


class ImageIndex:
    """An index file opened for search: `paths` (relative), `root`, `model` (its record), rows read lazily."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
            meta = self._file.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("it is not an image index")
            self.rows = _read_rows(self._file)
            self.model: dict[str, Any] = json.loads(meta["model"])
            shape = self._file.get_slice("embeddings").get_shape()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such index: {self.path}") from None
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"cannot read {self.path}: not an index written by eva02 ({e})") from None
        if len(shape) != 2 or shape[0] != len(self.rows):
            raise ValueError(f"cannot read {self.path}: {shape[0]} embeddings for {len(self.rows)} paths")
        self.dim = int(shape[1])
        self.root = Path(meta.get("root", "."))
        self.index_id = meta.get("index_id", "")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def paths(self) -> list[str]:
        return [r.rel for r in self.rows]

    def file(self, row: int) -> Path:
        """The image file of a row (under the folder the index was built from)."""
        return self.root / self.rows[row].rel

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, embeddings (n, E) as fp32) over the whole index, `rows` at a time."""
        sl = self._file.get_slice("embeddings")
        for start in range(0, len(self), rows):
            yield start, sl[start : start + rows].float()

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """Embeddings (len(rows), E) fp32 of sorted row numbers."""
        out = [emb[rows[(rows >= s) & (rows < s + len(emb))] - s] for s, emb in self.chunks()]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def search(
        self,
        queries: torch.Tensor,
        topk: int = 10,
        ann: Any = None,
        nprobe: int | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> list[list[Hit]]:
        """The `topk` rows of highest cosine similarity for each query embedding (Q, E): exact, or through
        a faiss index from `build_ann`/`load_ann` (`nprobe`: IVF lists visited per query)."""
        q = F.normalize(queries.float().reshape(-1, self.dim), dim=-1)  # (Q, E)
        k = min(topk, len(self))
        if ann is not None:
            ivf = _faiss().try_extract_index_ivf(ann)
            if ivf is not None:
                ivf.nprobe = min(nprobe or NPROBE, ivf.nlist)
            scores, rows = (torch.from_numpy(a) for a in ann.search(np.ascontiguousarray(q.numpy()), k))
        else:
            scores, rows = torch.zeros(len(q), 0), torch.zeros(len(q), 0, dtype=torch.long)
            for start, emb in self.chunks(chunk_rows):
                s, i = (q @ emb.T).topk(min(k, len(emb)), dim=1)  # (Q, k) in this chunk
                scores, rows = torch.cat([scores, s], 1), torch.cat([rows, i + start], 1)
                scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
                rows = rows.gather(1, order)
        scores = scores.clamp(-1.0, 1.0)  # fp16 rows are unit-norm to about 1e-3
        return [
            [Hit(int(r), self.rows[int(r)].rel, float(s)) for s, r in zip(ss, rr, strict=True) if r >= 0]
            for ss, rr in zip(scores, rows, strict=True)
        ]


def load_index(path: PathLike) -> ImageIndex:
    """Open an index written by `build_index` (or `eva02 index`)."""
    return ImageIndex(path)


def write_index(
    path: PathLike, embeddings: torch.Tensor, rows: Sequence[FileRow], root: PathLike, model: dict[str, Any]
) -> ImageIndex:
    """Write an index from embeddings (N, E) in memory (normalised here, stored fp16), atomically."""
    emb = F.normalize(embeddings.float(), dim=-1).half()
    tensors = [("embeddings", torch.float16, tuple(emb.shape), [emb]), *_row_tensors(rows)]
    atomic_write(path, lambda tmp: _write_safetensors(tmp, tensors, _index_meta(root, model)))
    return ImageIndex(path)


def _index_meta(root: PathLike, model: dict[str, Any]) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": "1",
        "root": str(Path(root).resolve()),
        "model": json.dumps(model),
        "index_id": uuid.uuid4().hex,
        "embedding_dtype": "float16",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
