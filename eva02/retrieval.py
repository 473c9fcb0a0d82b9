"""Image retrieval with EVA-02-CLIP: an on-disk index of image embeddings, searched by text or by image.

    clip = eva02.get_clip("EVA02-CLIP-B-16", pretrained=True)
    index = build_index("photos/", clip, "photos.safetensors", name="EVA02-CLIP-B-16")
    hits = index.search(embed_texts(clip, ["a red car"]), topk=10)[0]  # [Hit(row, path, score), ...]

The index is one safetensors file:
    embeddings (N, E) float16   unit-norm image embeddings, one row per image (fp32 maths when searching)
    paths      (B,)   uint8     paths relative to the indexed folder, NUL-separated bytes (os.fsencode)
    sizes      (N,)   int64     each file's size and
    mtimes     (N,)   int64     modification time (ns) when it was embedded: how `update` sees changed files
and its metadata holds the format, the folder, an `index_id` and the model as JSON (zoo name, checkpoint,
config, preprocessing, and the embedding of a fixed synthetic probe image). The paths are a tensor rather
than metadata because safetensors caps its JSON header at 100 MB, about a million paths.

A build writes its progress as parts (`INDEX.parts/part-NNNNNN.safetensors`, the same layout, each written
atomically every `save_every` images or `SAVE_SECONDS`) and merges them into INDEX at the end, streaming, so
that neither step holds all embeddings in memory. A killed build leaves its parts; building again with the
same model embeds only the files that no part holds (same relative path, size and modification time). A
different model never joins: models are compared by config, preprocessing and probe embedding.

Search is exact (a matrix product over chunks of rows, keeping a running top-k). With faiss installed (the
`ann` extra), `build_ann` makes an IVF index of fp16 vectors, saved beside the index as INDEX.ann.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from eva02.data.images import ImageSource, iter_image_paths, load_image
from eva02.data.transforms import eval_transform
from eva02.extras import need
from eva02.fileio import DirLock, LockedError, OutputError, atomic_write, clean_stale_temps
from eva02.model.clip import ClipConfig, Eva02Clip
from eva02.weights.zoo import Preprocess

PathLike = str | os.PathLike
FORMAT, PART_FORMAT, ANN_FORMAT = "eva02-image-index", "eva02-image-index-part", "eva02-image-index-ann"
SAVE_SECONDS = 60.0  # a part is written at least this often while embedding
PROBE_MIN_COSINE = 0.999  # the same weights agree far closer (fp32, any device); other weights far less
NPROBE, ANN_MIN_ROWS = 32, 1000  # IVF lists visited per query; below ANN_MIN_ROWS rows the faiss index is flat
CHUNK_ROWS = 16384  # rows per step of an exact search: 64 MB of fp32 at E = 1024
_DTYPES = {torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}


class IndexMismatch(ValueError):
    """An index (or an unfinished build) at `where` holds embeddings of `stored`, not of the `current` model,
    whose `why` ('config', 'preprocessing' or 'weights') differs."""

    def __init__(self, where: str, stored: dict[str, Any], current: dict[str, Any], why: str, fix: str) -> None:
        super().__init__(
            f"{where} holds embeddings of {describe_model(stored)}, not of {describe_model(current)} (other {why}; "
            f"models are never mixed in one index); {fix}"
        )
        self.where, self.stored, self.current, self.why = where, stored, current, why


@dataclass(frozen=True)
class Hit:
    row: int
    path: str  # relative to the index's folder
    score: float  # cosine similarity


# ------------------------------------------------------------------------------------ the model
def clip_preprocess(clip: Eva02Clip) -> Preprocess:
    """The CLIP models' eval preprocessing at the model's size (every zoo entry uses it)."""
    return Preprocess(img_size=clip.cfg.vision.img_size)


def _probe_image() -> Image.Image:
    """A fixed synthetic picture (gradients and a ripple) whose embedding identifies a model's weights."""
    y, x = np.mgrid[0:256, 0:256] / 255.0
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * np.pi * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@torch.inference_mode()
def embed_batch(clip: Eva02Clip, batch: torch.Tensor, dtype: str | None = None) -> torch.Tensor:
    """Preprocessed images (B, 3, S, S) -> unit-norm embeddings (B, E), fp32 on the CPU; `dtype` 'bf16' or
    'fp16' runs the tower under autocast."""
    device = next(clip.parameters()).device
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype or "fp32")
    with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
        x = clip.encode_image(batch.to(device))
    return F.normalize(x.float(), dim=-1).cpu()


def embed_images(clip: Eva02Clip, images: Sequence[ImageSource], preprocess: Preprocess | None = None) -> torch.Tensor:
    """Image files, PIL images, arrays or tensors -> unit-norm embeddings (N, E), fp32."""
    tf = eval_transform(preprocess or clip_preprocess(clip))
    return embed_batch(clip, torch.stack([tf(load_image(im)) for im in images]))


@torch.inference_mode()
def embed_texts(clip: Eva02Clip, texts: Sequence[str]) -> torch.Tensor:
    """Texts -> unit-norm embeddings (N, E), fp32 (tokenized by `eva02.clip.tokenize`, the `clip` extra)."""
    ids = clip.tokenize(list(texts)).to(next(clip.parameters()).device)
    return clip.encode_text(ids, normalize=True).float().cpu()


def model_info(
    clip: Eva02Clip, preprocess: Preprocess | None = None, name: str | None = None, checkpoint: PathLike | None = None
) -> dict[str, Any]:
    """What an index records of its model: how to load it again, and what identifies it."""
    pre = preprocess or clip_preprocess(clip)
    probe = embed_batch(clip, eval_transform(pre)(_probe_image())[None])[0]  # (E,), always fp32
    info = {
        "name": name,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "config": clip.cfg.to_dict(),
        "preprocess": asdict(pre),
        "probe": [round(v, 6) for v in probe.tolist()],
    }
    return json.loads(json.dumps(info))  # tuples as lists: what a reloaded index holds


def describe_model(info: dict[str, Any]) -> str:
    if info.get("name") and info.get("checkpoint"):
        return f"{info['name']} with {info['checkpoint']}"
    return info.get("name") or info.get("checkpoint") or "a CLIP model without a name"


def _canonical(d: dict[str, Any], cls: Any) -> str:
    """A record's config or preprocessing as sorted JSON, with the fields added since it was written
    filled in with their defaults (so an older index still matches its model)."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        d = cls.from_dict(d).to_dict() if cls is ClipConfig else asdict(cls(**d))
    return json.dumps(d, sort_keys=True)


def check_same_model(stored: dict[str, Any], current: dict[str, Any], where: str, fix: str) -> None:
    """IndexMismatch (one line naming `where`, both models and `fix`) unless both are the same model:
    same config, same preprocessing and, where both records have one, the same probe embedding."""
    why = ""
    if _canonical(stored["config"], ClipConfig) != _canonical(current["config"], ClipConfig):
        why = "config"
    elif _canonical(stored["preprocess"], Preprocess) != _canonical(current["preprocess"], Preprocess):
        why = "preprocessing"
    elif "probe" in stored and "probe" in current:
        a, b = torch.tensor(stored["probe"]), torch.tensor(current["probe"])
        why = "weights" if F.cosine_similarity(a, b, dim=0).item() < PROBE_MIN_COSINE else ""
    if why:
        raise IndexMismatch(where, stored, current, why, fix)


# ------------------------------------------------------------------------------------ file format
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


# ------------------------------------------------------------------------------------ building
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


# ------------------------------------------------------------------------------------ faiss
def ann_path(index_path: PathLike) -> Path:
    """The faiss index kept beside an index."""
    return Path(str(index_path) + ".ann")


def _faiss():
    return need("faiss", "ann", "approximate search")


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
