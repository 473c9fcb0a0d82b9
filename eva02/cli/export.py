"""`eva02 export`: write a model as ONNX, TorchScript or a torch.export program, then check it against eager.

The model is `-m/--model NAME` (a bare NAME works too), `--checkpoint FILE`, or both. `--out` is
checked before the model loads: never the checkpoint (nor a link to it), never an existing file without
`--force`, in a folder that can be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import add_checkpoint, add_model, add_out, model_arg, zoo_entry
from eva02.extras import need
from eva02.fileio import check_output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX / TorchScript / torch.export and verify it",
        description="Export a zoo model (or a checkpoint) for deployment; the file is checked against the "
        "eager model on random images and the largest difference is printed.",
        epilog="example: eva02 export -m eva02-tiny-p14_in21k-pre_3rdparty_in1k --format onnx -o tiny.onnx",
    )
    add_model(p, "zoo model name (see `eva02 list`)", positional=True)
    add_checkpoint(p, "weights to load into --model's architecture (without --model: an eva02 checkpoint)")
    p.add_argument("--random-init", action="store_true", help="no weights: export --model's architecture as built")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"], dest="fmt")
    add_out(
        p,
        "FILE",
        "file to write (.onnx, .ts, .pt2)",
        "replace --out if it exists (never the checkpoint)",
        required=True,
    )
    p.add_argument("--img-size", type=int, metavar="N", help="input size of the exported graph (default: model's)")
    p.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension free")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check against eager")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted difference to eager (1e-3)")
    p.set_defaults(func=run)


def check_model(args: argparse.Namespace) -> str | None:
    """The zoo name to export (None: an eva02 checkpoint alone), checked before anything is loaded."""
    name = model_arg(args)
    if name is None and args.checkpoint is None:
        raise CliError("give -m/--model NAME (see `eva02 list`), or --checkpoint FILE of an eva02 checkpoint")
    if args.random_init and args.checkpoint:
        raise CliError("--random-init and --checkpoint exclude each other; drop one")
    if args.random_init and name is None:
        raise CliError("--random-init needs -m/--model NAME")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CliError(f"--checkpoint file '{args.checkpoint}' does not exist")
    if name is not None:
        entry = zoo_entry(name)
        if args.img_size is not None and args.img_size % entry.cfg.patch_size:
            raise CliError(f"--img-size {args.img_size} must be a multiple of the patch size {entry.cfg.patch_size}")
    return name


def load_model(args: argparse.Namespace, name: str | None):
    """The model to export: NAME with downloaded weights, NAME + --checkpoint, or an eva02 checkpoint alone."""
    from eva02.weights.load import get_model

    pretrained = False if args.random_init else (args.checkpoint or True)
    return get_model(name, pretrained=pretrained)


def run(args: argparse.Namespace) -> int:
    import torch

    from eva02.export import SUFFIXES, example_input, export_model, verify_export

    if args.img_size is not None and args.img_size <= 0:
        raise CliError(f"--img-size must be a positive multiple of the patch size, got {args.img_size}")
    if args.fmt == "exported-program" and Path(args.out).suffix != ".pt2":
        raise CliError(f"--out {args.out}: --format exported-program files end in .pt2")
    check_output(args.out, inputs=[args.checkpoint], force=args.force, flag="--out")
    name = check_model(args)
    if args.fmt == "onnx":  # before the model is loaded: the exporter and the check both need them
        for module in ("onnx", "onnxscript", "onnxruntime"):
            need(module, "export", "eva02 export --format onnx")
    model = load_model(args, name).float().cpu().eval()
    size = args.img_size or model.cfg.img_size
    if size % model.cfg.patch_size:
        raise CliError(f"--img-size {size} must be a multiple of the patch size {model.cfg.patch_size}")
    if args.fmt != "exported-program" and not args.out.lower().endswith(SUFFIXES[args.fmt]):
        print(f"note: --format {args.fmt} files usually end in {SUFFIXES[args.fmt]}", file=sys.stderr)
    try:
        path = export_model(model, args.fmt, args.out, img_size=size, dynamic_batch=args.dynamic_batch)
    except ImportError as e:
        raise CliError(str(e)) from e
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.fmt}, {size}x{size} px)")
    if args.no_verify:
        return 0
    torch.manual_seed(0)
    batches = (1, 3) if args.dynamic_batch else (2,)  # 2 is the batch the graph was exported at
    worst = 0.0
    for b in batches:
        diff = verify_export(path, model, example_input(model, size, b), args.fmt)
        print(f"verified batch {b}: max |exported - eager| = {diff:.3g}")
        worst = max(worst, diff)
    if worst > args.atol:
        print(f"eva02 export: error: difference {worst:.3g} exceeds --atol {args.atol}", file=sys.stderr)
        return 1
    return 0
