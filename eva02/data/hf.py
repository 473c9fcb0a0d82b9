"""Hugging Face datasets (the `datasets` library) as classification and pre-training data.

`hf_dataset(name, split, ...)` opens a split of a `save_to_disk` folder, of a local data folder the
library reads (parquet, arrow, ...), or of a hub dataset, and reads row i as sample i: the engine's
samplers apply unchanged (order and augmentation from (seed, epoch, index), exact resume with any number
of processes). Images are taken as stored bytes and decoded as image files are (`decode_image`), so a
dataset made from a folder of PNG or JPEG files trains exactly as the folder does. Class names come
from the label column's ClassLabel feature.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from eva02.data.datasets import RecordDataset, read_names
from eva02.data.images import decode_image, read_bytes
from eva02.extras import need


class HfDataset(RecordDataset):
    """Rows of a `datasets.Dataset`: (image column, optional label column)."""

    def __init__(self, table: Any, where: str, image: str, label: str, classes: list[str], transform: Callable) -> None:
        self.table, self.where, self.image, self.label = table, where, image, label
        self.classes, self.transform, self.labelled = list(classes), transform, bool(label)

    def __len__(self) -> int:
        return len(self.table)

    def name(self, index: int) -> str:
        return f"{self.where}[{index}]"

    def read(self, index: int) -> tuple[Image.Image, int]:
        row = self.table[index]
        value, name = row[self.image], self.name(index)
        if isinstance(value, dict):  # an Image feature, undecoded: {'bytes', 'path'}
            data = value.get("bytes")
            if data is None and value.get("path"):
                name = f"{name} ({value['path']})"
                data = read_bytes(value["path"], name)
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):  # a column of file paths
            name = f"{name} ({value})"
            data = read_bytes(value, name)
        else:
            data = b""
        return decode_image(data or b"", name), int(row[self.label]) if self.label else 0

    def labels(self) -> set[int]:
        return {-1 if v is None else int(v) for v in self.table.unique(self.label)} if self.label else {0}


def _load(name: str, split: str, cache_dir: str | None) -> Any:
    """The `datasets.Dataset` of `split`: a save_to_disk folder, another local folder or file the library
    reads, or a hub name; one-line errors naming the dataset, the split and the fix."""
    datasets = need("datasets", "data", "data.format='hf'")
    p = Path(name)
    saved = p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json"))
    where = f"Hugging Face dataset {name!r}"
    if saved:
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{where} has no split {split!r}; its splits: {', '.join(ds)} (set data.*_split)")
            return ds[split]
        own = str(ds.split) if ds.split is not None else "train"
        if split != own:
            raise ValueError(f"{where} is one dataset (split {own!r}), not {split!r}; save a DatasetDict with that "
                             "split, or set data.val_split='' for no validation")  # fmt: skip
        return ds
    try:
        return datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except (ValueError, KeyError) as e:  # an unknown split
        raise ValueError(f"{where}, split {split!r}: {' '.join(str(e).split())}; set data.*_split") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        local = "" if p.exists() else "no such local folder, and "
        raise ValueError(f"cannot load {where} (split {split!r}): {local}{' '.join(str(e).split())}; give a "
                         "save_to_disk folder, a folder of parquet files or a hub dataset name") from None  # fmt: skip


def hf_dataset(
    name: str,
    split: str,
    transform: Callable,
    image: str = "image",
    label: str = "label",
    names_file: str = "",
    cache_dir: str | None = None,
) -> HfDataset:
    """Split `split` of dataset `name` with its `image` column and `label` column ('' for none)."""
    datasets = need("datasets", "data", "data.format='hf'")
    table = _load(name, split, cache_dir)
    columns = list(table.features)
    for what, col in (("image", image), ("label", label)):
        if col and col not in columns:
            raise ValueError(f"Hugging Face dataset {name!r} ({split}) has no {what} column {col!r}; its columns: "
                             f"{', '.join(columns)} (set data.hf_{what})")  # fmt: skip
    if isinstance(table.features[image], datasets.Image):
        table = table.cast_column(image, datasets.Image(decode=False))  # bytes: decoded as files are
    table = table.select_columns([c for c in (image, label) if c])
    feature = table.features.get(label) if label else None
    if names_file:
        classes = read_names(names_file)
    elif isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
    elif label:
        classes = [f"class_{i}" for i in range(max(table.unique(label), default=-1) + 1)]
    else:
        classes = ["image"]
    return HfDataset(table, f"{os.path.basename(name.rstrip('/')) or name}:{split}", image, label, classes, transform)
