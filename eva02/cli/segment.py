"""`eva02 segment`: semantic segmentation of images with a trained segmentor; label maps and overlays.

The model is the one a segmentation config builds (`--config`, train.task 'segment') with the weights
of `--checkpoint` (a training checkpoint .pt or a run's final .safetensors). Each image goes through the
config's test: resized within `seg.scale`, sliding windows of `model.img_size` `seg.stride` apart (and
`seg.test_scales` / `seg.test_flip`), the scores taken back to the image's own size.
With `-o DIR`, each image gets `<name>_labels.png` (class indices, a palette PNG that viewers show in
colour) and `<name>_overlay.png` (the colours over the image). Inputs and outputs are checked before the
model loads: an output never replaces an input, nor an existing file without `--force`. An image that
cannot be read gets a one-line warning and is skipped; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import add_dtype, add_out
from eva02.cli.predict import PIPE_CLOSED, StdoutClosed, collect_paths, emit, output_names, progress, warn
from eva02.fileio import check_output, check_writable_dir
from eva02.hints import count


def register(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="semantic segmentation of images: label maps and colour overlays",
        description="Segment images with a trained segmentor (a segmentation config and its checkpoint).",
        epilog="example: eva02 segment photos/ --config configs/eva02_seg/eva02_base_upernet_ade20k_512.py "
        "--checkpoint work_dirs/seg/final.safetensors -o out/",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files and/or directories (searched recursively)")
    p.add_argument("--config", required=True, metavar="FILE", help="the segmentation config (train.task 'segment')")
    p.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="training checkpoint (.pt) or final .safetensors"
    )
    add_out(p, "DIR", "write <name>_labels.png and <name>_overlay.png per image into DIR", "replace existing outputs")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a text line")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A", help="opacity of the colours in overlays (0.5)")
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_dtype(p, "compute precision: fp32 (default), bf16 or fp16 autocast (fp16 needs --device cuda)")
    p.add_argument("--set", dest="options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set seg.test_flip=true")  # fmt: skip
    p.set_defaults(func=run)


def output_paths(paths: list[Path], out_dir: Path, force: bool) -> list[tuple[Path, Path]]:
    """(labels, overlay) file of each image in `out_dir`, checked: never an input, never an existing file
    unless `force`."""
    out = []
    for name in output_names(paths, suffix=""):
        base = Path(name).stem
        pair = tuple(
            check_output(out_dir / f"{base}_{kind}.png", inputs=paths, force=force, flag="--out", create_dir=False)
            for kind in ("labels", "overlay")
        )
        out.append(pair)
    return out


def run(args: argparse.Namespace) -> int:
    """`eva02 segment`, ending quietly (exit code 141) when the reader of stdout goes away."""
    try:
        return segment(args)
    except StdoutClosed:
        return PIPE_CLOSED


def _load_config(args: argparse.Namespace):
    from eva02.engine.config import load_run, override, parse_options

    cfg, _ = load_run(args.config)
    cfg = override(cfg, parse_options(args.options))
    if cfg.train.task != "segment":
        raise CliError(
            f"--config {args.config} is a train.task={cfg.train.task!r} config; give a segmentation config "
            "(configs/eva02_seg/)"
        )
    return cfg


def segment(args: argparse.Namespace) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha must be in [0, 1], got {args.alpha}")
    cfg = _load_config(args)
    if not Path(args.checkpoint).is_file():
        raise CliError(f"--checkpoint file '{args.checkpoint}' does not exist")
    paths = collect_paths(args)
    outputs = output_paths(paths, check_writable_dir(args.out, "--out folder"), args.force) if args.out else []

    import torch  # after the checks: a mistyped argument answers at once

    from eva02.data.images import ImageError, load_image
    from eva02.data.segmentation import SegEvalTransform
    from eva02.dtypes import autocast, autocast_dtype
    from eva02.engine.tasks.segment import class_names, load_segmentor
    from eva02.inference import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise CliError(f"--device {args.device}: {e}") from None
    if args.dtype == "fp16" and device.type != "cuda":
        raise CliError("--dtype fp16 needs a CUDA device (--device cuda); on CPU use --dtype bf16 or fp32")
    try:
        model = load_segmentor(cfg, args.checkpoint).to(device).eval()
    except (OSError, RuntimeError) as e:
        raise CliError(f"cannot load the segmentor: {' '.join(str(e).split())}") from None
    names = class_names(cfg)
    s = cfg.seg
    transform = SegEvalTransform(s.scale, cfg.data.mean, cfg.data.std)
    amp = autocast_dtype(args.dtype or "fp32")
    failed = 0
    bar = progress(len(paths), 1, "segment")
    for i, path in enumerate(paths):
        bar.update(1)
        try:
            img = load_image(path)
        except (ImageError, OSError) as e:
            warn("segment", str(e))
            failed += 1
            continue
        x = transform.image(img)[None].to(device)
        min_side = cfg.model.img_size if len(s.test_scales) > 1 else 0
        with autocast(device.type, amp):
            scores = model.predict(x, (img.height, img.width), cfg.model.img_size, s.stride, s.test_scales,
                                   s.test_flip, min_side)  # fmt: skip
        labels = scores.argmax(dim=1)[0].to(torch.int64).cpu().numpy()
        files = outputs[i] if outputs else None
        if files is not None:
            try:
                write_outputs(img, labels, len(names), files, args.alpha)
            except (ImageError, OSError) as e:
                warn("segment", f"cannot write the outputs of '{path}': {e}")
                failed += 1
                files = None
        emit(describe(path, labels, names, files, args.json))
    bar.close()
    if failed:
        print(f"eva02 segment: {failed} of {count(len(paths), 'image')} failed", file=sys.stderr)
    return 1 if failed else 0


def write_outputs(img, labels, num_classes: int, files: tuple[Path, Path], alpha: float) -> None:
    """The label map (palette PNG of class indices; 16-bit gray past 256 classes) and the overlay."""
    import numpy as np
    from PIL import Image

    from eva02.data.images import save_image_atomic
    from eva02.data.segmentation import palette

    colours = palette(num_classes)
    if num_classes <= 256:
        label_img = Image.fromarray(labels.astype(np.uint8), "P")
        label_img.putpalette(colours.ravel().tolist())
    else:
        label_img = Image.fromarray(labels.astype(np.uint16))
    save_image_atomic(label_img, files[0])
    blend = np.asarray(img, dtype=np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha
    save_image_atomic(Image.fromarray(blend.round().astype(np.uint8)), files[1])


def describe(path: Path, labels, names: list[str], files: tuple[Path, Path] | None, as_json: bool) -> str:
    """One result: the classes found with their share of the pixels, largest first (and the files written)."""
    import numpy as np

    counts = np.bincount(labels.ravel(), minlength=len(names))
    order = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0]
    shares = [(k, names[k], float(counts[k] / labels.size)) for k in order]
    if as_json:
        rec = {
            "file": str(path),
            "size": [int(labels.shape[1]), int(labels.shape[0])],
            "classes": [{"label": k, "class": n, "fraction": round(f, 6)} for k, n, f in shares],
            "labels": str(files[0]) if files else None,
            "overlay": str(files[1]) if files else None,
        }
        return json.dumps(rec, ensure_ascii=False)
    shown = ", ".join(f"{n} {f * 100:.1f}%" for _, n, f in shares[:5])
    more = f" (+{len(shares) - 5} more)" if len(shares) > 5 else ""
    return f"{path}: {shown}{more}"
