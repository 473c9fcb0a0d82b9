"""`eva02 features`: backbone features of images or folders (`Eva02.extract_feat`) into one .npy or .safetensors file.

The array is (N_images, ...) for one block, (N_images, K, ...) for K blocks of `--out-indices`; rows
follow the order in which files are listed (arguments in order, directories sorted recursively), with
unreadable files skipped. That order is saved with the array: in the safetensors metadata ('files', a
JSON list) or, for .npy, in FILE.npy.txt (one path per line). Both files are checked before the model
loads (never an input, never an existing file without `--force`) and written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from eva02.cli import CliError
from eva02.cli.options import add_out
from eva02.cli.predict import (
    PIPE_CLOSED,
    StdoutClosed,
    add_common_args,
    check_batching,
    collect_paths,
    emit,
    load_model_from_args,
    progress,
    warn,
    worker_count,
)
from eva02.dtypes import autocast, autocast_dtype, canonical
from eva02.fileio import atomic_write, check_output
from eva02.hints import count

if TYPE_CHECKING:
    import numpy as np
    import torch

OUT_TYPES = ("avg_featmap", "cls_token", "featmap", "raw", "embedding")
SUFFIXES = (".npy", ".safetensors")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features",
        help="extract image features to .npy/.safetensors",
        description="Extract backbone features (model.extract_feat) of images into one array file.",
    )
    add_common_args(p)
    add_out(
        p,
        "FILE",
        "output file, .npy or .safetensors",
        "replace --out (and its .txt listing) if it exists",
        required=True,
    )
    p.add_argument(
        "--out-type",
        default="avg_featmap",
        choices=OUT_TYPES,
        help="avg_featmap (N, D) pooled; cls_token (N, D); featmap (N, D, H, W); raw tokens (N, 1+HW, D); "
        "embedding (N, E): an EVA-02-CLIP model's joint-space image embedding (not normalised)",
    )
    p.add_argument(
        "--out-indices", type=int, nargs="+", default=[-1], metavar="I", help="blocks to read, negative from the end"
    )
    p.set_defaults(func=run)


def extract(
    model: torch.nn.Module, batch: torch.Tensor, out_type: str, out_indices: list[int], dtype: str | None = None
) -> np.ndarray:
    """One preprocessed batch -> float32 features (B, ...) or (B, K, ...) for several blocks; `dtype`
    'bf16' or 'fp16' computes under autocast."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode(), autocast(device.type, autocast_dtype(dtype)):
        feats = model.extract_feat(batch.to(device), out_type=out_type, out_indices=out_indices)
    t = feats[0] if len(feats) == 1 else torch.stack(feats, dim=1)
    return t.float().cpu().numpy()


def listing_path(path: Path) -> Path:
    """The file listing the rows of a .npy output."""
    return path.with_name(path.name + ".txt")


def check_outputs(args: argparse.Namespace, paths: list[Path]) -> Path:
    """--out (and the listing of a .npy) may be written: checked before any work; returns --out."""
    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        raise CliError(f"--out {out} must end in .npy or .safetensors")
    inputs = [*paths, args.checkpoint]
    check_output(out, inputs=inputs, force=args.force, flag="--out")
    if out.suffix == ".npy":
        check_output(listing_path(out), inputs=inputs, force=args.force, flag="--out's listing")
    return out


def save_features(path: Path, array: np.ndarray, files: list[str], meta: dict[str, str]) -> list[Path]:
    """Write the array and its file order atomically; returns the files written."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":

        def write_npy(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array)

        listing = listing_path(path)
        atomic_write(listing, lambda tmp: Path(tmp).write_text("".join(f + "\n" for f in files), encoding="utf-8"))
        atomic_write(path, write_npy)
        return [path, listing]
    from safetensors.numpy import save_file

    metadata = {**meta, "files": json.dumps(files, ensure_ascii=False)}
    atomic_write(path, lambda tmp: save_file({"features": np.ascontiguousarray(array)}, tmp, metadata=metadata))
    return [path]


def run(args: argparse.Namespace) -> int:
    """`eva02 features`, ending quietly (exit code 141) when the reader of stdout goes away."""
    try:
        return features(args)
    except StdoutClosed:
        return PIPE_CLOSED


def clip_entry(args: argparse.Namespace):
    """The EVA-02-CLIP zoo entry --model names, or None for the classifiers' names."""
    from eva02.weights.zoo import find_clip

    return find_clip(args.model) if args.model else None


def is_clip(args: argparse.Namespace) -> bool:
    """Whether the model is an EVA-02-CLIP one: named by --model, or, without it, a CLIP file written by
    eva02 (which stores its config) given by --checkpoint."""
    if args.model:
        return clip_entry(args) is not None
    if args.checkpoint is None or not Path(args.checkpoint).is_file():
        return False
    from eva02.weights.files import read_metadata

    try:
        return read_metadata(args.checkpoint).get("format") == "eva02-clip"
    except ValueError:  # not a checkpoint at all: the classifiers' loader says so
        return False


def load_clip_tower(args: argparse.Namespace):
    """(image tower, preprocess) of the EVA-02-CLIP model --model names, or of the CLIP file --checkpoint
    gives without a name (weights: --checkpoint or the zoo's)."""
    from eva02.cli.options import check_device
    from eva02.weights.clip import get_clip
    from eva02.weights.zoo import Preprocess

    entry = clip_entry(args)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CliError(f"--checkpoint file '{args.checkpoint}' does not exist")
    device = check_device(args.device, args.dtype)
    try:
        clip = get_clip(entry, pretrained=args.checkpoint or True, device=device)
    except (OSError, RuntimeError, ValueError) as e:
        raise CliError(f"cannot load the model: {' '.join(str(e).split())}") from None
    pre = entry.preprocess if entry is not None else Preprocess(img_size=clip.cfg.vision.img_size)
    return clip.visual, pre if args.img_size is None else replace(pre, img_size=args.img_size)


def features(args: argparse.Namespace) -> int:
    """The `features` command."""
    check_batching(args)
    clip = is_clip(args)
    if args.out_type == "embedding" and not clip:
        raise CliError(
            "--out-type embedding is the joint-space embedding of EVA-02-CLIP models: give -m CLIP-NAME or a CLIP "
            "file written by eva02"
        )
    paths = collect_paths(args)
    out = check_outputs(args, paths)
    import numpy as np  # torch and friends: after the input and output checks

    from eva02.data.transforms import eval_transform
    from eva02.inference import iter_file_batches

    model, pre = load_clip_tower(args) if clip else load_model_from_args(args, need_head=False)
    depth = len(model.blocks)
    bad = [i for i in args.out_indices if not -depth <= i < depth]
    if bad:
        raise CliError(
            f"--out-indices {' '.join(map(str, bad))}: out of range for a {depth}-block model "
            f"(use -{depth} to {depth - 1})"
        )
    transform = eval_transform(pre)
    device = next(model.parameters()).device
    chunks, files, failed = [], [], 0
    bar = progress(len(paths), args.batch_size, "features")
    for indices, batch, errors in iter_file_batches(
        paths, transform, args.batch_size, worker_count(args, len(paths)), device.type == "cuda"
    ):
        for _, err in errors:
            warn("features", err)
        failed += len(errors)
        if batch is not None:
            chunks.append(extract(model, batch, args.out_type, args.out_indices, args.dtype))
            files.extend(str(paths[i]) for i in indices)
        bar.update(len(indices) + len(errors))
    bar.close()
    if not files:
        what = "the image" if len(paths) == 1 else f"none of the {len(paths)} images"
        print(f"eva02 features: {what} could be read; nothing written", file=sys.stderr)
        return 1
    array = np.concatenate(chunks)
    meta = {
        "model": args.model or str(args.checkpoint),
        "out_type": args.out_type,
        "out_indices": json.dumps(args.out_indices),
        "img_size": str(pre.img_size),
        "dtype": canonical(args.dtype),
    }
    written = save_features(out, array, files, meta)
    shape, n = tuple(array.shape), count(len(files), "image")
    emit(f"wrote {' and '.join(map(str, written))}: features {shape} float32 for {n}")
    if failed:
        print(f"eva02 features: {failed} of {count(len(paths), 'image')} failed", file=sys.stderr)
    return 1 if failed else 0
