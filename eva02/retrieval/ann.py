"""Approximate search with faiss (the `ann` extra): an IVF index of fp16 vectors over an index's rows,
saved beside it as INDEX.ann (safetensors, tied to that version of the index by its `index_id`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from eva02.fileio import PathLike, atomic_write
from eva02.retrieval.index import ImageIndex, _faiss, _write_safetensors

ANN_FORMAT = "eva02-image-index-ann"
ANN_MIN_ROWS = 1000  # below this many rows the faiss index is flat


def ann_path(index_path: PathLike) -> Path:
    """The faiss index kept beside an index."""
    return Path(str(index_path) + ".ann")


def build_ann(index: ImageIndex, nlist: int | None = None):
    """A faiss index of every row (inner product, fp16 vectors): IVF with `nlist` lists (about 4 sqrt(N)),
    or a flat one below ANN_MIN_ROWS rows, where lists would save nothing."""
    faiss = _faiss()
    n = len(index)
    if nlist is None and n < ANN_MIN_ROWS:
        ann = faiss.index_factory(index.dim, "SQfp16", faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = nlist or min(round(4 * math.sqrt(n)), n // 39)  # faiss's k-means wants >= 39 points per list
        ann = faiss.index_factory(index.dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False))
        ann.train(np.ascontiguousarray(index.take(sample).numpy()))
    for _, emb in index.chunks():
        ann.add(np.ascontiguousarray(emb.numpy()))
    return ann


def save_ann(index: ImageIndex, ann) -> Path:
    """Write `ann` beside the index (INDEX.ann, safetensors), tied to this version of the index."""
    data = torch.from_numpy(_faiss().serialize_index(ann))
    tensors = [("faiss", torch.uint8, (len(data),), [data])]
    meta = {"format": ANN_FORMAT, "index_id": index.index_id}
    return atomic_write(ann_path(index.path), lambda tmp: _write_safetensors(tmp, tensors, meta))


def load_ann(index: ImageIndex):
    """The faiss index saved beside `index`; FileNotFoundError if none, ValueError if it is out of date."""
    faiss, path = _faiss(), ann_path(index.path)
    if not path.is_file():
        raise FileNotFoundError(f"{index.path} has no ANN index beside it ({path.name})")
    with safe_open(str(path), framework="numpy") as f:
        if (f.metadata() or {}).get("index_id") != index.index_id:
            raise ValueError(f"{path} was built for an earlier version of {index.path}")
        data = f.get_tensor("faiss")
    return faiss.deserialize_index(data)
