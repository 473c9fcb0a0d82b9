"""Image retrieval with EVA-02-CLIP: an on-disk index of image embeddings, searched by text or by image.

    clip = eva02.get_clip("EVA02-CLIP-B-16", pretrained=True)
    index = build_index("photos/", clip, "photos.safetensors", name="EVA02-CLIP-B-16")
    hits = index.search(embed_texts(clip, ["a red car"]), topk=10)[0]  # [Hit(row, path, score), ...]

The modules, each importing only those above it:
    embed   the model: images and texts to unit-norm embeddings, the record that identifies a model
    index   the index file (one safetensors file; its format is described there), ImageIndex, exact search
    ann     approximate search with faiss (the `ann` extra), an IVF index saved beside the index as INDEX.ann
    build   building, resuming (parts beside the index) and updating an index, merging parts into it
`_Parts`, `_faiss`, `_row_tensors` and `_write_safetensors` are here too, for the tests.
"""

from eva02.fileio import PathLike
from eva02.retrieval.ann import ANN_FORMAT, ANN_MIN_ROWS, ann_path, build_ann, load_ann, save_ann
from eva02.retrieval.build import (
    PART_FORMAT,
    SAVE_SECONDS,
    BuildReport,
    build_index,
    parts_dir,
    stored_model,
)
from eva02.retrieval.build import _Parts as _Parts
from eva02.retrieval.embed import (
    PROBE_MIN_COSINE,
    IndexMismatch,
    check_same_model,
    clip_preprocess,
    describe_model,
    embed_batch,
    embed_images,
    embed_texts,
    model_info,
)
from eva02.retrieval.index import (
    CHUNK_ROWS,
    FORMAT,
    NPROBE,
    FileRow,
    Hit,
    ImageIndex,
    list_images,
    load_index,
    write_index,
)
from eva02.retrieval.index import _faiss as _faiss
from eva02.retrieval.index import _row_tensors as _row_tensors
from eva02.retrieval.index import _write_safetensors as _write_safetensors

__all__ = [
    "ANN_FORMAT",
    "ANN_MIN_ROWS",
    "CHUNK_ROWS",
    "FORMAT",
    "NPROBE",
    "PART_FORMAT",
    "PROBE_MIN_COSINE",
    "SAVE_SECONDS",
    "BuildReport",
    "FileRow",
    "Hit",
    "ImageIndex",
    "IndexMismatch",
    "PathLike",
    "ann_path",
    "build_ann",
    "build_index",
    "check_same_model",
    "clip_preprocess",
    "describe_model",
    "embed_batch",
    "embed_images",
    "embed_texts",
    "list_images",
    "load_ann",
    "load_index",
    "model_info",
    "parts_dir",
    "save_ann",
    "stored_model",
    "write_index",
]
