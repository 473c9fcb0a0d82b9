"""`eva02 export`: write a model as ONNX, TorchScript or a torch.export program, then check it against eager.

`--out` is checked before the model loads: never the checkpoint (nor a link to it), never an existing
file without `--force`, in a folder that can be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eva02.cli import CliError
from eva02.fileio import check_output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX / TorchScript / torch.export and verify it",
        description="Export a zoo model (or a checkpoint) for deployment; the file is checked against the "
        "eager model on random images and the largest difference is printed.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="zoo model name (see `eva02 list`)")
    p.add_argument("--checkpoint", metavar="FILE", help="weights to load (without NAME: an eva02 checkpoint)")
    p.add_argument("--random-init", action="store_true", help="no weights: export NAME's architecture as built")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"], dest="fmt")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="file to write (.onnx, .ts, .pt2)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (never the checkpoint)")
    p.add_argument("--img-size", type=int, metavar="N", help="input size of the exported graph (default: model's)")
    p.add_argument("--dynamic-batch", action="store_true", help="leave the batch dimension free")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical check against eager")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted difference to eager (1e-3)")
    p.set_defaults(func=run)


def load_model(args: argparse.Namespace):
    """The model to export: NAME with downloaded weights, NAME + --checkpoint, or an eva02 checkpoint alone."""
    from eva02.weights.load import get_model

    if args.name is None and args.checkpoint is None:
        raise CliError("give a zoo model NAME, or --checkpoint FILE of an eva02 checkpoint")
    if args.random_init and args.checkpoint:
        raise CliError("--random-init and --checkpoint exclude each other; drop one")
    if args.random_init and args.name is None:
        raise CliError("--random-init needs a zoo model NAME")
    pretrained = False if args.random_init else (args.checkpoint or True)
    return get_model(args.name, pretrained=pretrained)


def run(args: argparse.Namespace) -> int:
    import torch

    from eva02.export import SUFFIXES, example_input, export_model, verify_export

    if args.img_size is not None and args.img_size <= 0:
        raise CliError(f"--img-size must be positive, got {args.img_size}")
    if args.fmt == "exported-program" and Path(args.out).suffix != ".pt2":
        raise CliError(f"--out {args.out}: torch.export programs are saved as .pt2 files")
    check_output(args.out, inputs=[args.checkpoint], force=args.force, flag="--out")
    if args.fmt == "onnx":  # before the model is loaded: the exporter and the check both need them
        from eva02.extras import need

        for module in ("onnx", "onnxscript", "onnxruntime"):
            need(module, "export", "eva02 export --format onnx")
    model = load_model(args).float().cpu().eval()
    size = args.img_size or model.cfg.img_size
    if size % model.cfg.patch_size:
        raise CliError(f"--img-size {size} is not a multiple of the patch size {model.cfg.patch_size}")
    if args.fmt != "exported-program" and not args.out.lower().endswith(SUFFIXES[args.fmt]):
        print(f"note: {args.fmt} files usually end in {SUFFIXES[args.fmt]}", file=sys.stderr)
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
