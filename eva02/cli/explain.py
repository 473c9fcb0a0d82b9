"""`eva02 explain`: heat maps of where a model looks (attention rollout or Grad-CAM), drawn over images.

Checks in the usual order, before any model loads: the flags, the inputs, the `--out` folder and every
drawing's name there (a drawing never lands on an input and never replaces a file without `--force`),
and then every image is decoded once, so that a bad image stops the command with one line (exit code
2) before anything is written. Drawings are PNG files `<name>_<method>.png`, written atomically.
See docs/explain.md; the maths is in eva02/explain.py.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import add_checkpoint, add_model, add_out, positive_int
from eva02.cli.predict import (
    check_model_args,
    collect_paths,
    emit,
    headless_message,
    load_model_from_args,
    output_names,
)
from eva02.fileio import check_output, check_writable_dir

METHODS = ("attention-rollout", "gradcam")  # eva02.explain.METHODS, without importing torch here
SUFFIXES = {"attention-rollout": "_rollout", "gradcam": "_gradcam"}
EXAMPLE = "eva02 explain cat.jpg -m eva02-tiny-p14_in21k-pre_3rdparty_in1k --method gradcam -o maps/"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="heat maps of where a model looks (attention rollout, Grad-CAM)",
        description="Draw an explanation heat map over each image: attention rollout (any model) or "
        "Grad-CAM of a class (classifiers). One PNG per image in --out (docs/explain.md).",
        epilog=f"example: {EXAMPLE}",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files and/or directories (searched recursively)")
    add_model(p, "zoo model name (see `eva02 list`)")
    add_checkpoint(
        p,
        "weights to load into --model's architecture (any known format); "
        "without --model, an eva02 checkpoint that embeds its config",
    )
    p.add_argument(
        "--method", choices=METHODS, default="attention-rollout", help="attention-rollout (default) or gradcam"
    )
    p.add_argument(
        "--target-class", type=int, metavar="K",
        help="gradcam: explain class K (default: each image's top class)",
    )  # fmt: skip
    add_out(p, "DIR", "write one PNG per image into DIR", "replace drawings that already exist in --out", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object per image (the map included)")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A", help="weight of the heat map in the blend (0.5)")
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--img-size", type=int, metavar="N", help="explain at this input size instead of the model's")
    p.add_argument(
        "--threads", type=positive_int, metavar="N", help="CPU threads for torch (default: the cores free now)"
    )
    p.set_defaults(func=run, dtype=None)


def check_args(args: argparse.Namespace) -> None:
    """The flags that need no file and no model."""
    if args.target_class is not None:
        if args.method != "gradcam":
            raise CliError("--target-class applies to --method gradcam only (attention rollout has no class)")
        if args.target_class < 0:
            raise CliError(f"--target-class must be 0 or more, got {args.target_class}")
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.img_size is not None and args.img_size < 1:
        raise CliError(f"--img-size must be a positive multiple of the model's patch size, got {args.img_size}")
    if args.method == "gradcam" and args.model is not None and args.checkpoint is None:
        from eva02.cli.options import zoo_entry

        entry = zoo_entry(args.model)
        if not entry.cfg.num_classes:  # a checkpoint may bring a head: that case is checked once it is loaded
            raise CliError(gradcam_needs_head(entry.name))


def gradcam_needs_head(what: str) -> str:
    return headless_message(what).split(";")[0] + "; Grad-CAM explains a class: use --method attention-rollout"


def drawing_paths(paths: Sequence[Path], out_dir: Path, suffix: str, force: bool) -> list[Path]:
    """One PNG name per image in `out_dir`: never an input (such a name is numbered instead), never an
    existing file unless `force` (OutputError before any work)."""
    inputs = {(st.st_dev, st.st_ino) for st in (_stat(p) for p in paths) if st is not None}
    out, used = [], set()
    for name in output_names(paths, suffix):
        stem = os.path.splitext(name)[0]
        cand, n = stem + ".png", 1
        while cand.lower() in used or _is_one_of(out_dir / cand, inputs):
            cand, n = f"{stem}-{n}.png", n + 1
        used.add(cand.lower())
        out.append(check_output(out_dir / cand, force=force, flag="--out", create_dir=False))
    return out


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _is_one_of(path: Path, inodes: set) -> bool:
    st = _stat(path)
    return st is not None and (st.st_dev, st.st_ino) in inodes


def run(args: argparse.Namespace) -> int:
    """The `explain` command."""
    check_args(args)
    paths = collect_paths(args)
    out_dir = check_writable_dir(args.out, "--out folder")
    drawings = drawing_paths(paths, out_dir, SUFFIXES[args.method], args.force)
    from eva02.data.images import ImageError, load_image, save_image_atomic  # torch: after the checks above

    check_model_args(args, need_head=False)
    for path in paths:  # every image is read before the model loads and before anything is written
        try:
            load_image(path)
        except ImageError as e:
            raise CliError(f"{e}; remove it from the inputs or replace it") from None
    model, pre = load_model_from_args(args, need_head=False)
    if args.method == "gradcam" and not model.is_classifier:
        raise CliError(gradcam_needs_head(f"the model of --checkpoint {args.checkpoint}"))
    if args.target_class is not None and args.target_class >= model.cfg.num_classes:
        last = model.cfg.num_classes - 1
        raise CliError(f"--target-class {args.target_class} is out of range: the model has classes 0 to {last}")
    from eva02.explain import explain_image
    from eva02.inference import class_names_for
    from eva02.threads import set_threads

    set_threads(args.threads)
    names = class_names_for(model.cfg.num_classes) if model.is_classifier else []
    for path, drawing in zip(paths, drawings, strict=True):
        res = explain_image(model, load_image(path), args.method, args.target_class, pre, alpha=args.alpha)
        try:
            save_image_atomic(res.image, drawing)
        except OSError as e:
            raise CliError(f"cannot write {drawing}: {e}") from None
        rec = record(path, drawing, res, names)
        emit(json.dumps(rec, ensure_ascii=False) if args.json else summary(rec))
    return 0


def record(path: Path, drawing: Path, res, names: Sequence[str]) -> dict:
    """The --json line of one image."""
    rec = {"file": str(path), "out": str(drawing), "method": res.method}
    if res.target is not None:
        rec.update(target_label=res.target, target_class=names[res.target])
    rec["grid"] = list(res.heat.shape)
    rec["map"] = [[round(float(v), 4) for v in row] for row in res.heat]
    return rec


def summary(rec: dict) -> str:
    """The plain line of one image: input -> drawing, and the class explained."""
    what = f" (class {rec['target_label']}: {rec['target_class']})" if "target_label" in rec else ""
    return f"{rec['file']} -> {rec['out']}{what}"
