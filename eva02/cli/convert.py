"""`eva02 convert`: any supported checkpoint (official, timm, mmpretrain) -> our safetensors format.

The output (`-o/--out DST`, or DST after SRC) is checked before SRC is read: never SRC itself (nor a
symlink or hard link to it), never an existing file without `--force`, in a folder that can be written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import HIDDEN, add_model, add_out, zoo_entry
from eva02.fileio import check_output, same_file

FMT_CHOICES = ("auto", "eva02", "official", "timm", "mmpretrain")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to eva02 safetensors",
        description="Convert an official BAAI .pt, timm or mmpretrain checkpoint of a zoo model into our "
        "safetensors format (weights plus config), loadable with eva02.load_model(DST).",
        epilog="example: eva02 convert eva02_Ti_pt_in21k_ft_in1k_p14.pt -m eva02-tiny-p14_in21k-pre_3rdparty_in1k "
        "-o tiny.safetensors",
    )
    p.add_argument("src", type=Path, metavar="SRC", help="checkpoint to convert (.pt, .pth, .bin or .safetensors)")
    p.add_argument("dst_arg", nargs="?", type=Path, metavar="DST", help=HIDDEN)  # older spelling of --out
    add_model(p, "zoo name of the model the checkpoint belongs to (see `eva02 list`)", required=True)
    add_out(p, "DST", "output file, ending in .safetensors", "replace --out if it exists (never SRC)")
    p.add_argument("--fmt", choices=FMT_CHOICES, default="auto", help="format of SRC (default: detected from keys)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=None, help="take the EMA weights")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the non-EMA weights")
    p.add_argument(
        "--img-size", type=int, default=None, metavar="N", help="resample the position embedding to this input size"
    )
    p.set_defaults(func=run)


def output_path(args: argparse.Namespace) -> Path:
    """-o/--out, or the DST written after SRC (the older spelling); exactly one of them."""
    out = Path(args.out) if args.out is not None else None
    if out is not None and args.dst_arg is not None and out != args.dst_arg:
        raise CliError(f"two outputs given ({args.dst_arg} and --out {out}); give one")
    if out is None and args.dst_arg is None:
        raise CliError("where to? give -o/--out FILE.safetensors")
    return out or args.dst_arg


def run(args: argparse.Namespace) -> int:
    from eva02.weights.load import get_model, save_checkpoint

    src, dst = args.src, output_path(args)
    if not src.is_file():
        raise CliError(f"source checkpoint {src} does not exist")
    if dst.suffix != ".safetensors":
        raise CliError(f"--out {dst} must end in .safetensors (the eva02 format)")
    if dst.exists() and same_file(dst, src):
        raise CliError(f"refusing to overwrite the source {src}; choose another --out")
    check_output(dst, force=args.force, flag="--out")
    if args.img_size is not None and args.img_size < 1:
        raise CliError(f"--img-size must be a positive multiple of the patch size, got {args.img_size}")
    entry = zoo_entry(args.model)
    if args.img_size is not None and args.img_size % entry.cfg.patch_size:
        ps = entry.cfg.patch_size
        raise CliError(f"--img-size {args.img_size} must be a multiple of {entry.name}'s patch size {ps}")
    model = get_model(entry, pretrained=src, img_size=args.img_size, use_ema=args.use_ema, fmt=args.fmt)
    save_checkpoint(model, dst, name=entry.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst} ({entry.name}, {n:,} parameters, {model.cfg.num_classes or 'no'} classes)")
    return 0
