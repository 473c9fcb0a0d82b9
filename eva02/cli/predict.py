"""`eva02 predict`: classify images or folders with a zoo model or a checkpoint; table, JSON lines or drawings.

Images are decoded in DataLoader workers while the model runs. A file that cannot be read gets a
one-line warning on stderr and is skipped; the exit code is then 1. The `--out` folder and the names of
the drawings are checked before the model loads: a drawing never takes the name of an input image (it
gets a numbered name instead) and never replaces an existing file without `--force`. Result lines are
flushed one by one; when the reader of stdout goes away (`| head`), the command stops quietly with
exit code 141, as a program ended by SIGPIPE. Also holds the argument, model-loading and output
helpers that `eva02 features` shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from eva02.assets import DEMO_IMAGE
from eva02.cli import CliError
from eva02.cli.options import (
    HIDDEN,
    add_batch_size,
    add_checkpoint,
    add_dtype,
    add_model,
    add_out,
    check_device,
    zoo_entry,
)
from eva02.fileio import check_output, check_writable_dir
from eva02.hints import count
from eva02.threads import default_threads

if TYPE_CHECKING:
    from tqdm import tqdm

DEMO_MODEL = "eva02-tiny-p14_in21k-pre_3rdparty_in1k"
PIPE_CLOSED = 141  # the exit status a shell shows for a program ended by SIGPIPE (128 + 13)


class StdoutClosed(Exception):
    """The reader of stdout went away (e.g. `| head`); the rest of the output is dropped."""


# ------------------------------------------------------------------------------- shared helpers
def add_common_args(p: argparse.ArgumentParser) -> None:
    """Inputs, model, checkpoint, device, batching and precision options of `predict` and `features`."""
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files and/or directories (searched recursively)")
    add_model(p, "zoo model name (see `eva02 list`)")
    add_checkpoint(
        p,
        "weights to load into --model's architecture (any known format); "
        "without --model, an eva02 checkpoint that embeds its config",
    )
    add_batch_size(p, 16, "images per forward pass (16)")
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--workers", type=int, metavar="N", help="image decoding processes (default: up to 4 when over one batch)"
    )
    p.add_argument("--img-size", type=int, metavar="N", help="evaluate at this size instead of the model's")
    add_dtype(p, "compute precision: fp32 (default), bf16 or fp16 autocast (fp16 needs --device cuda)")


def collect_paths(args: argparse.Namespace) -> list[Path]:
    """Expand the IMAGES arguments (and --demo) to files, refusing an empty selection or a missing path."""
    inputs = list(args.images)
    if getattr(args, "demo", False):
        inputs.append(DEMO_IMAGE)
    if not inputs:
        raise CliError("no images given: pass image files or directories" + (", or --demo" if "demo" in args else ""))
    missing = [str(p) for p in inputs if not os.path.lexists(p)]
    if missing:  # before any model is loaded
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CliError(f"no such file or folder: {shown}; check the path")
    from eva02.data.images import iter_image_paths

    paths = iter_image_paths(inputs)
    if not paths:
        raise CliError(f"no image files found in {', '.join(map(str, inputs))} (looked for .jpg, .png, .webp, ...)")
    return paths


def check_batching(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be 1 or more, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    if args.img_size is not None and args.img_size < 1:
        raise CliError(f"--img-size must be a positive multiple of the model's patch size, got {args.img_size}")


def check_model_args(args: argparse.Namespace, need_head: bool) -> None:
    """--model, --checkpoint, --device, --dtype and --img-size, checked before anything is read or loaded."""
    if args.model is None and args.checkpoint is None:
        raise CliError("give -m/--model NAME (see `eva02 list`) or --checkpoint FILE")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CliError(f"--checkpoint file '{args.checkpoint}' does not exist")
    if args.model is not None:
        entry = zoo_entry(args.model)
        if need_head and not entry.cfg.num_classes and args.checkpoint is None:  # a checkpoint may bring a head
            raise CliError(headless_message(entry.name))
        if args.img_size is not None:
            check_img_size(args.img_size, entry.cfg.patch_size)
    check_device(args.device, args.dtype)


def headless_message(what: str) -> str:
    return (
        f"{what} is a pre-trained backbone without a classifier, so it cannot predict classes; "
        f"`eva02 features` extracts its features, or choose an in1k model (`eva02 list in1k`)"
    )


def check_img_size(size: int, patch: int) -> None:
    if size % patch:
        near = max(patch, round(size / patch) * patch)
        raise CliError(f"--img-size {size} must be a multiple of the model's patch size {patch}, e.g. {near}")


def load_model_from_args(args: argparse.Namespace, need_head: bool):
    """(model, preprocess) from --model / --checkpoint / --device / --img-size, with one-line errors."""
    from eva02.inference import load_for_inference

    check_model_args(args, need_head)
    try:
        model, pre = load_for_inference(args.model, checkpoint=args.checkpoint, device=args.device)
    except (OSError, RuntimeError) as e:  # download, file or state-dict problems
        raise CliError(f"cannot load the model: {' '.join(str(e).split())}") from None
    if need_head and not model.is_classifier:
        raise CliError(headless_message(f"the model of --checkpoint {args.checkpoint}"))
    if args.img_size is not None:
        check_img_size(args.img_size, model.cfg.patch_size)
        pre = replace(pre, img_size=args.img_size)
    return model, pre


def worker_count(args: argparse.Namespace, num_images: int) -> int:
    from eva02.inference import auto_workers

    return args.workers if args.workers is not None else auto_workers(num_images, args.batch_size)


def progress(total: int, batch_size: int, desc: str) -> tqdm:
    """A stderr progress bar, shown only when there is more than one batch and stderr is a terminal
    (in logs, every result line written past the bar would repeat it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=True if total <= batch_size else None,
                leave=False)  # fmt: skip


def warn(cmd: str, msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"eva02 {cmd}: warning: {msg} (skipped)", file=sys.stderr)


def emit(text: str) -> None:
    """Print one result to stdout at once (past any progress bar); StdoutClosed when its reader is gone."""
    from tqdm import tqdm

    try:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the flush at interpreter exit cannot fail a second time.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor (captured in tests)
            pass
        raise StdoutClosed from None


def output_names(paths: Sequence[Path], suffix: str = "_topk") -> list[str]:
    """Unique output file names: the path below the inputs' common folder, with '/' -> '__'."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in resolved])) if resolved else Path("/")
    names, used = [], set()
    for p in resolved:
        ext = ".jpg" if p.suffix.lower() in (".jpg", ".jpeg") else ".png"
        base = "__".join(p.relative_to(root).with_suffix("").parts) + suffix
        name, n = base + ext, 1
        while name.lower() in used:  # e.g. 'a__b/c.png' vs 'a/b__c.png', or a.PNG vs a.png
            name, n = f"{base}-{n}{ext}", n + 1
        used.add(name.lower())
        names.append(name)
    return names


def drawing_paths(paths: Sequence[Path], out_dir: Path, force: bool) -> list[Path]:
    """Where each image's drawing goes in `out_dir`: never onto an input (that name is numbered instead),
    never over another existing file unless `force` (OutputError, before any work)."""
    inputs = set()
    for p in paths:
        try:
            st = p.stat()
            inputs.add((st.st_dev, st.st_ino))
        except OSError:  # missing inputs are reported later, one warning each
            pass

    def is_input(path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in inputs

    out, used = [], set()
    for name in output_names(paths):
        stem, ext = os.path.splitext(name)
        cand, n = name, 1
        while cand.lower() in used or is_input(out_dir / cand):
            cand, n = f"{stem}-{n}{ext}", n + 1
        used.add(cand.lower())
        out.append(check_output(out_dir / cand, force=force, flag="--out", create_dir=False))
    return out


# ----------------------------------------------------------------------------------- predict
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images",
        description="Classify images with an EVA-02 model: top-k classes per image.",
        epilog=f"example: eva02 predict --demo -m {DEMO_MODEL}",
    )
    add_common_args(p)
    p.add_argument("--demo", action="store_true", help="also classify the bundled demo photo (a cat)")
    p.add_argument("--topk", "-k", type=int, default=5, metavar="K", help="classes to show per image (5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    add_out(
        p,
        "DIR",
        "write each image with its top-k bars drawn under it into DIR",
        "replace drawings that already exist in --out",
    )
    p.add_argument("--amp", dest="dtype", action="store_const", const="bf16", help=HIDDEN)  # older --dtype bf16
    p.add_argument(
        "--compile", action="store_true", help="run the model through torch.compile (pays off on many images)"
    )
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: the cores free now)")
    p.set_defaults(func=run)


def format_table(path: Path, result: dict) -> str:
    lines = [str(path)]
    for rank, (label, name, score) in enumerate(result["topk"], start=1):
        lines.append(f"  {rank:>2}. {score:7.4f}  {name}  ({label})")
    return "\n".join(lines)


def format_json(path: Path, result: dict) -> str:
    rec = {
        "file": str(path),
        "pred_label": result["pred_label"],
        "pred_class": result["pred_class"],
        "pred_score": round(result["pred_score"], 6),
        "topk": [{"label": lab, "class": name, "score": round(s, 6)} for lab, name, s in result["topk"]],
    }
    return json.dumps(rec, ensure_ascii=False)


def run(args: argparse.Namespace) -> int:
    """`eva02 predict`, ending quietly (exit code 141) when the reader of stdout goes away."""
    try:
        return predict(args)
    except StdoutClosed:
        return PIPE_CLOSED


def predict(args: argparse.Namespace) -> int:
    """The `predict` command; result lines go through `emit`."""
    if args.topk < 1:
        raise CliError(f"--topk must be 1 or more, got {args.topk}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be 1 or more, got {args.threads}")
    check_batching(args)
    paths = collect_paths(args)
    drawings = drawing_paths(paths, check_writable_dir(args.out, "--out folder"), args.force) if args.out else []
    from eva02.data.images import ImageError, load_image, save_image_atomic  # torch: after the input checks
    from eva02.inference import Predictor, draw_topk, iter_file_batches

    model, pre = load_model_from_args(args, need_head=True)
    threads = args.threads or default_threads()  # torch's one per core crawls on a busy machine (eva02/threads.py)
    predictor = Predictor(
        model, preprocess=pre, batch_size=args.batch_size, dtype=args.dtype, compile=args.compile, threads=threads
    )
    failed = 0
    bar = progress(len(paths), args.batch_size, "predict")
    batches = iter_file_batches(
        paths, predictor.transform, args.batch_size, worker_count(args, len(paths)), predictor.device.type == "cuda"
    )
    for indices, batch, errors in batches:
        for _, err in errors:
            warn("predict", err)
        failed += len(errors)
        probs = predictor.probabilities(batch) if batch is not None else []
        for i, row in zip(indices, probs, strict=True):
            res = predictor.result(row, args.topk)
            emit(format_json(paths[i], res) if args.json else format_table(paths[i], res))
            if drawings:
                try:
                    save_image_atomic(draw_topk(load_image(paths[i]), res), drawings[i], quality=92)
                except (ImageError, OSError) as e:
                    warn("predict", f"cannot write the drawing of '{paths[i]}': {e}")
                    failed += 1
        bar.update(len(indices) + len(errors))
    bar.close()
    if failed:
        print(f"eva02 predict: {failed} of {count(len(paths), 'image')} failed", file=sys.stderr)
    return 1 if failed else 0
