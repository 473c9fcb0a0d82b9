"""Building an index: embedding a folder's images into parts, resuming an unfinished build, updating an
index, and merging the parts into the index file.

A build writes its progress as parts (`INDEX.parts/part-NNNNNN.safetensors`, the layout of the index file,
each written atomically every `save_every` images or `SAVE_SECONDS`) and merges them into INDEX at the end,
streaming, so that neither step holds all embeddings in memory. A killed build leaves its parts; building
again with the same model embeds only the files that no part holds (same relative path, size and
modification time). A different model never joins: models are compared by config, preprocessing and probe
embedding (`eva02.retrieval.embed`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from eva02.data.transforms import eval_transform
from eva02.fileio import DirLock, LockedError, OutputError, PathLike, atomic_write, clean_stale_temps
from eva02.model.clip import Eva02Clip
from eva02.retrieval.embed import IndexMismatch, check_same_model, clip_preprocess, embed_batch, model_info
from eva02.retrieval.index import (
    FileRow,
    ImageIndex,
    _index_meta,
    _read_rows,
    _row_tensors,
    _write_safetensors,
    list_images,
)
from eva02.weights.zoo import Preprocess

PART_FORMAT = "eva02-image-index-part"
SAVE_SECONDS = 60.0  # a part is written at least this often while embedding


def parts_dir(index_path: PathLike) -> Path:
    """Where a build of `index_path` keeps its progress until the merge."""
    return Path(str(index_path) + ".parts")


def stored_model(path: PathLike) -> dict[str, Any] | None:
    """The model record of an index, or of the unfinished build in a parts folder; None if neither is there."""
    path = Path(path)
    if path.is_dir():
        manifest = path / "manifest.json"
        return json.loads(manifest.read_text(encoding="utf-8"))["model"] if manifest.is_file() else None
    return ImageIndex(path).model if path.is_file() else None


class _Parts:
    """The parts folder of one build: locked while in use, its model checked, its parts read and written."""

    def __init__(self, out: Path, info: dict[str, Any], force: bool, log: Callable[[str], None]) -> None:
        self.dir, self.info, self.force, self.log = parts_dir(out), info, force, log
        self.files: list[tuple[Path, list[FileRow]]] = []

    def __enter__(self) -> _Parts:
        try:
            self.lock = DirLock(self.dir).acquire()
        except LockedError:
            raise LockedError(f"{self.dir} is in use by another build of this index; wait for it to end") from None
        clean_stale_temps(self.dir)
        try:
            stored = stored_model(self.dir)
            if stored is not None:
                check_same_model(stored, self.info, str(self.dir), "finish it with that model, or discard it (force)")
        except (IndexMismatch, ValueError, KeyError):
            if not self.force:
                self.lock.release()
                raise
            stored = None
        if stored is None:  # a fresh start: nothing of another model may stay
            for f in self.dir.glob("part-*.safetensors"):
                f.unlink()
            manifest = json.dumps({"format": PART_FORMAT, "model": self.info})
            atomic_write(self.dir / "manifest.json", lambda tmp: Path(tmp).write_text(manifest, encoding="utf-8"))
        self.files = [(f, rows) for f in sorted(self.dir.glob("part-*.safetensors")) if (rows := self._read(f))]
        return self

    def _read(self, f: Path) -> list[FileRow]:
        try:
            with safe_open(str(f), framework="pt") as h:
                if (h.metadata() or {}).get("format") != PART_FORMAT:
                    raise ValueError("not a part of an image index")
                rows = _read_rows(h)
                if h.get_slice("embeddings").get_shape()[0] != len(rows):
                    raise ValueError("embeddings and paths disagree")
                return rows
        except Exception as e:  # damaged (a disk fault: parts are written atomically); its images are embedded again
            self.log(f"warning: {f} cannot be read ({e}); embedding its images again")
            f.unlink()
            return []

    def keys(self) -> set[tuple[str, int, int]]:
        return {r.key for _, rows in self.files for r in rows}

    def write(self, emb: torch.Tensor, rows: list[FileRow]) -> None:
        number = 1 + max((int(f.stem.split("-")[1]) for f, _ in self.files), default=0)
        path = self.dir / f"part-{number:06d}.safetensors"
        tensors = [("embeddings", torch.float16, tuple(emb.shape), [emb]), *_row_tensors(rows)]
        atomic_write(path, lambda tmp: _write_safetensors(tmp, tensors, {"format": PART_FORMAT}))
        self.files.append((path, list(rows)))

    def remove(self) -> None:
        self.lock.release()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.lock.release()


@dataclass
class BuildReport:
    index: ImageIndex | None  # None when no image could be read
    total: int  # images in the folder
    embedded: int  # embedded by this call
    reused: int  # taken from the parts of an unfinished build or from the index being updated
    failed: list[tuple[str, str]]  # (relative path, error)
    written: bool  # False when an update found nothing to change


def build_index(
    folder: PathLike,
    clip: Eva02Clip,
    out: PathLike,
    *,
    preprocess: Preprocess | None = None,
    name: str | None = None,
    checkpoint: PathLike | None = None,
    update: bool = False,
    force: bool = False,
    batch_size: int = 32,
    save_every: int = 4096,
    workers: int = 0,
    dtype: str | None = None,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    listing: Sequence[FileRow] | None = None,
) -> BuildReport:
    """Embed every image below `folder` into the index `out`, continuing an unfinished build of the same
    model. An existing `out` needs `update=True` (add new and changed images, drop vanished ones) or
    `force=True` (rebuild). `name`/`checkpoint` are recorded so that `eva02 search` can load the model;
    `listing` is `list_images(folder)` when the caller has it already."""
    from tqdm import tqdm

    folder, out = Path(folder), Path(out)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    if out.exists() and not (update or force):
        raise OutputError(f"{out} already exists; update=True adds new images to it, force=True rebuilds it")
    pre = preprocess or clip_preprocess(clip)
    info = model_info(clip, pre, name, checkpoint)
    listing = list_images(folder) if listing is None else listing
    if not listing:
        raise ValueError(f"no image files found in {folder} (looked for .jpg, .png, .webp, ...)")
    base = ImageIndex(out) if update and out.exists() else None
    if base is not None:
        check_same_model(base.model, info, str(out), "rebuild it (force) to change the model")
    with _Parts(out, info, force, log) as parts:
        done = parts.keys() | ({r.key for r in base.rows} if base else set())
        todo = [r for r in listing if r.key not in done]
        reused = len(listing) - len(todo)
        if parts.files:
            log(f"continuing the unfinished build in {parts.dir}: {reused} of {len(listing)} images are done")
        bar = tqdm(
            total=len(listing),
            initial=reused,
            desc="index",
            unit="img",
            file=sys.stderr,
            disable=None if progress and len(todo) > batch_size else True,
            leave=False,
        )
        try:
            failed = _embed(clip, folder, todo, parts, pre, batch_size, save_every, workers, dtype, bar, on_error)
        finally:
            bar.close()
        current = {r.key for r in listing}
        unchanged = base is not None and not parts.files and all(r.key in current for r in base.rows)
        if unchanged or (base is None and not parts.files):
            parts.remove()
            return BuildReport(base, len(listing), 0, reused, failed, False)
        index = _merge(out, folder, info, base, parts.files, current)
        parts.remove()
    return BuildReport(index, len(listing), len(todo) - len(failed), reused, failed, True)


def _embed(clip, folder, todo, parts, pre, batch_size, save_every, workers, dtype, bar, on_error):
    """Embed `todo` in batches, a part written every `save_every` images or SAVE_SECONDS; returns failures."""
    from eva02.inference import iter_file_batches

    device = next(clip.parameters()).device
    failed: list[tuple[str, str]] = []
    embs: list[torch.Tensor] = []
    rows: list[FileRow] = []
    last = time.monotonic()

    def flush() -> None:
        nonlocal embs, rows, last
        if rows:
            parts.write(torch.cat(embs).half(), rows)
        embs, rows, last = [], [], time.monotonic()

    files = [folder / r.rel for r in todo]
    try:
        for indices, batch, errors in iter_file_batches(
            files, eval_transform(pre), batch_size, workers, device.type == "cuda"
        ):
            for i, err in errors:
                failed.append((todo[i].rel, err))
                if on_error is not None:
                    on_error(err)
            if batch is not None:
                embs.append(embed_batch(clip, batch, dtype))
                rows.extend(todo[i] for i in indices)
            bar.update(len(indices) + len(errors))
            if len(rows) >= save_every or (rows and time.monotonic() - last >= SAVE_SECONDS):
                flush()
    except BaseException:
        with contextlib.suppress(Exception):
            flush()  # an interrupted build keeps what it has embedded
        raise
    flush()
    return failed


def _merge(
    out: Path,
    root: Path,
    info: dict[str, Any],
    base: ImageIndex | None,
    parts: list[tuple[Path, list[FileRow]]],
    current: set[tuple[str, int, int]],
) -> ImageIndex:
    """Write the index of the rows still current (parts win over the base), streaming, atomically."""
    seen: set[str] = set()
    chosen: list[tuple[Path, list[int]]] = []
    for path, rows in parts:
        take = [i for i, r in enumerate(rows) if r.key in current and r.rel not in seen]
        seen.update(rows[i].rel for i in take)
        chosen.append((path, take))
    keep = np.array([i for i, r in enumerate(base.rows) if r.key in current and r.rel not in seen] if base else [])
    rows = [base.rows[i] for i in keep] if base else []
    rows += [parts_rows[i] for (_, parts_rows), (_, take) in zip(parts, chosen, strict=True) for i in take]
    dim = int(info["config"]["embed_dim"])

    def chunks() -> Iterator[torch.Tensor]:
        if base is not None and len(keep):
            yield base.take(keep)
        for path, take in chosen:
            with safe_open(str(path), framework="pt") as f:
                yield f.get_tensor("embeddings")[take]

    tensors = [("embeddings", torch.float16, (len(rows), dim), chunks()), *_row_tensors(rows)]
    atomic_write(out, lambda tmp: _write_safetensors(tmp, tensors, _index_meta(root, info)))
    return ImageIndex(out)
