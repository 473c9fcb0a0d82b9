"""`eva02 convert`: any supported checkpoint (official, timm, mmpretrain) -> our safetensors format.

DST is checked before SRC is read: never SRC itself (nor a symlink or hard link to it), never an
existing file without `--force`, in a folder that can be written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eva02.cli import CliError
from eva02.fileio import check_output, same_file

FMT_CHOICES = ("auto", "eva02", "official", "timm", "mmpretrain")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to eva02 safetensors",
        description="Convert an official BAAI .pt, timm or mmpretrain checkpoint of a zoo model into our "
        "safetensors format (weights plus config), loadable with eva02.load_model(DST).",
    )
    p.add_argument("src", type=Path, help="checkpoint to convert (.pt, .pth, .bin or .safetensors)")
    p.add_argument("dst", type=Path, help="output file, ending in .safetensors")
    p.add_argument("--model", required=True, help="zoo name of the model the checkpoint belongs to (see `eva02 list`)")
    p.add_argument("--fmt", choices=FMT_CHOICES, default="auto", help="format of SRC (default: detected from keys)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="take the EMA weights")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the non-EMA weights")
    p.add_argument("--img-size", type=int, default=None, help="resample the position embedding to this input size")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists (never SRC)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eva02.weights.load import get_model, save_checkpoint
    from eva02.weights.zoo import resolve

    src, dst = args.src, args.dst
    if not src.is_file():
        raise CliError(f"source checkpoint {src} does not exist")
    if dst.suffix != ".safetensors":
        raise CliError(f"output {dst} must end in .safetensors (the eva02 format)")
    if dst.exists() and same_file(dst, src):
        raise CliError(f"refusing to overwrite the source {src}; choose another output name")
    check_output(dst, force=args.force, flag="output")
    entry = resolve(args.model)
    model = get_model(entry, pretrained=src, img_size=args.img_size, use_ema=args.use_ema, fmt=args.fmt)
    save_checkpoint(model, dst, name=entry.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst} ({entry.name}, {n:,} parameters, {model.cfg.num_classes or 'no'} classes)")
    return 0
