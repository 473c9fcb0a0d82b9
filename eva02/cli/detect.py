"""`eva02 detect`: boxes, classes, scores and instance masks of a trained detector on images or folders.

The detector is the config's (`train.task='detect'`, configs/eva02_det/) with the weights of a
training checkpoint or of a run's final.safetensors. Per image it prints the detections scored at
least `--score-thr` (a table, or one JSON object a line with `--json`); `--out DIR` gets each image with
its masks, boxes and labels drawn, and `results.json`, the detections in the COCO results format (with
`image_id` the image's position in the run, from 1, and its `file_name`). Outputs are checked before
the model loads and never replace a file without `--force`; an image that cannot be read is named in
a warning and skipped (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from eva02.cli import CliError
from eva02.cli.options import add_checkpoint, add_out
from eva02.cli.predict import PIPE_CLOSED, StdoutClosed, collect_paths, emit, output_names, progress, warn
from eva02.fileio import check_output, check_writable_dir
from eva02.hints import count
from eva02.threads import default_threads

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detect",
        help="detect objects (boxes and masks) with a trained detector",
        description="Detect objects in images with an EVA-02 Mask R-CNN: boxes, classes, scores and masks.",
        epilog="example: eva02 detect photos/ --config configs/eva02_det/eva02_base_mask_rcnn_coco_1024.py "
        "--checkpoint work_dirs/det/final.safetensors -o drawn/",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files and/or directories (searched recursively)")
    p.add_argument(
        "--config", required=True, help="the detector's config (configs/eva02_det/*.py or a run's config.json)"
    )
    add_checkpoint(p, "the detector's weights: a training checkpoint (.pt) or a run's final.safetensors")
    p.add_argument("--score-thr", type=float, default=0.5, metavar="S", help="show detections scored >= S (0.5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    add_out(p, "DIR", "write the images with their detections drawn, and results.json (COCO results format), "
            "into DIR", "replace drawings or results.json that already exist in --out")  # fmt: skip
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: the cores free now)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return detect(args)
    except StdoutClosed:
        return PIPE_CLOSED


def _check_args(args: argparse.Namespace):
    """The config (a detection config) and the checkpoint, checked before anything is read or loaded."""
    from eva02.engine.config import load_config

    if not 0 <= args.score_thr <= 1:
        raise CliError(f"--score-thr must be in [0, 1], got {args.score_thr}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be 1 or more, got {args.threads}")
    if args.checkpoint is None:
        raise CliError("give --checkpoint FILE: the detector's weights (a run's final.safetensors or a .pt)")
    if not Path(args.checkpoint).is_file():
        raise CliError(f"--checkpoint file '{args.checkpoint}' does not exist")
    cfg = load_config(args.config)
    if cfg.train.task != "detect":
        raise CliError(f"--config {args.config} is a train.task={cfg.train.task!r} config, not a detector's "
                       "(see configs/eva02_det/)")  # fmt: skip
    return cfg


def class_names(cfg) -> list[str]:
    """The categories' names from the config's annotation file (validation, else training), in label
    order; 'class_<k>' when no file is at hand."""
    from eva02.engine.tasks.detect import annotation_file

    d = cfg.data
    for split, given in ((d.val_split, cfg.det.val_ann), (d.train_split, cfg.det.train_ann)):
        path = annotation_file(cfg, split, given) if split or given else ""
        if path and os.path.isfile(path):
            try:
                cats = json.loads(Path(path).read_text()).get("categories", [])
                names = [str(c.get("name", c["id"])) for c in sorted(cats, key=lambda c: c["id"])]
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if len(names) == cfg.model.num_classes:
                return names
    return [f"class_{k}" for k in range(1, cfg.model.num_classes + 1)]


def drawing_paths(paths: list[Path], out_dir: Path, force: bool) -> list[Path]:
    """Where each drawing goes: `<name>_det.png|jpg` in `out_dir`, checked before any work."""
    return [check_output(out_dir / name, inputs=paths, force=force, flag="--out", create_dir=False)
            for name in output_names(paths, "_det")]  # fmt: skip


def draw(image, det: dict[str, Any], names: list[str]):
    """The image with each detection's mask tinted, box outlined and 'class score' written above it."""
    import numpy as np
    from PIL import Image, ImageDraw

    rgb = np.asarray(image, dtype=np.float32).copy()
    for mask, label in zip(det["masks"], det["labels"], strict=True):
        color = np.array(PALETTE[(label - 1) % len(PALETTE)], dtype=np.float32)
        rgb[mask] = rgb[mask] * 0.55 + color * 0.45
    out = Image.fromarray(rgb.astype(np.uint8))
    pen = ImageDraw.Draw(out)
    for (x1, y1, x2, y2), label, score in zip(det["boxes"], det["labels"], det["scores"], strict=True):
        color = PALETTE[(label - 1) % len(PALETTE)]
        pen.rectangle((x1, y1, x2, y2), outline=color, width=2)
        text = f"{names[label - 1]} {score:.2f}"
        tx, ty = x1, max(0, y1 - 12)
        pen.rectangle(pen.textbbox((tx, ty), text), fill=color)
        pen.text((tx, ty), text, fill=(255, 255, 255))
    return out


def detections(output: dict, score_thr: float) -> dict[str, Any]:
    """One image's model output, kept at `score_thr` and above: lists, masks as (H, W) bool arrays."""
    keep = output["scores"] >= score_thr
    masks = output.get("masks")
    return {
        "boxes": [[round(v, 2) for v in b] for b in output["boxes"][keep].tolist()],
        "labels": output["labels"][keep].tolist(),
        "scores": output["scores"][keep].tolist(),
        "masks": (masks[keep, 0] >= 0.5).numpy() if masks is not None else [],
    }


def format_table(path: Path, det: dict[str, Any], names: list[str]) -> str:
    lines = [f"{path}  ({count(len(det['labels']), 'detection')})"]
    for box, label, score in zip(det["boxes"], det["labels"], det["scores"], strict=True):
        lines.append(f"  {score:7.4f}  {names[label - 1]}  ({label})  box {box}")
    return "\n".join(lines)


def format_json(path: Path, det: dict[str, Any], names: list[str]) -> str:
    rows = [{"label": lab, "class": names[lab - 1], "score": round(s, 6), "box": b}
            for b, lab, s in zip(det["boxes"], det["labels"], det["scores"], strict=True)]  # fmt: skip
    return json.dumps({"file": str(path), "detections": rows}, ensure_ascii=False)


def detect(args: argparse.Namespace) -> int:
    """The `detect` command; result lines go through `emit`."""
    cfg = _check_args(args)
    paths = collect_paths(args)
    out_dir = check_writable_dir(args.out, "--out folder") if args.out else None
    drawings = drawing_paths(paths, out_dir, args.force) if out_dir else []
    results_file = check_output(out_dir / "results.json", force=args.force) if out_dir else None
    import torch  # after the input checks

    from eva02.data.coco import image_tensor
    from eva02.data.images import ImageError, load_image, save_image_atomic
    from eva02.engine.coco_eval import encode_mask, write_results
    from eva02.engine.tasks.detect import load_detector
    from eva02.inference import resolve_device

    torch.set_num_threads(args.threads or default_threads())
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise CliError(f"--device {args.device}: {e}") from None
    try:
        model = load_detector(cfg, args.checkpoint).to(device).eval()
    except (OSError, RuntimeError) as e:
        raise CliError(f"cannot load the detector: {' '.join(str(e).split())}") from None
    names, cat_ids = class_names(cfg), list(range(1, cfg.model.num_classes + 1))
    failed, results = 0, []
    bar = progress(len(paths), 1, "detect")
    for i, path in enumerate(paths):
        try:
            image = load_image(path)
        except (ImageError, OSError) as e:
            warn("detect", str(e))
            failed += 1
            bar.update(1)
            continue
        with torch.no_grad():
            (output,) = model([image_tensor(image).to(device).float().div_(255)])
        det = detections({k: v.cpu() for k, v in output.items()}, args.score_thr)
        emit(format_json(path, det, names) if args.json else format_table(path, det, names))
        for j, (b, lab, s) in enumerate(zip(det["boxes"], det["labels"], det["scores"], strict=True)):
            xywh = [b[0], b[1], round(b[2] - b[0], 2), round(b[3] - b[1], 2)]
            entry = {"image_id": i + 1, "file_name": str(path), "category_id": cat_ids[lab - 1], "bbox": xywh,
                     "score": round(s, 5)}  # fmt: skip
            if len(det["masks"]):
                entry["segmentation"] = encode_mask(det["masks"][j])
            results.append(entry)
        if drawings:
            try:
                save_image_atomic(draw(image, det, names), drawings[i], quality=92)
            except (ImageError, OSError) as e:
                warn("detect", f"cannot write the drawing of '{path}': {e}")
                failed += 1
        bar.update(1)
    bar.close()
    if results_file is not None:
        write_results(results_file, results)
        print(f"results: {results_file}", file=sys.stderr)
    if failed:
        print(f"eva02 detect: {failed} of {count(len(paths), 'image')} failed", file=sys.stderr)
    return 1 if failed else 0
