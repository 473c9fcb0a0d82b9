"""`eva02 zero-shot`: EVA-02-CLIP classifies images among text labels, and the CLIP options it shares with
`eva02 index` and `eva02 search` (`eva02.cli.retrieval`).

`zero-shot` classifies images among text labels (softmax of CLIP's scaled cosine similarities to the
labels' prompt embeddings). It follows `predict`: inputs, outputs and the model name are checked before the
model loads; an unreadable image is a one-line warning and exit code 1; result lines are flushed one by one
and a closed stdout ends with exit code 141. Nothing here imports torch until the checks are done, so
`--help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eva02.cli import CliError
from eva02.cli.options import add_batch_size, add_checkpoint, add_dtype, add_model, check_device, positive_int
from eva02.cli.predict import PIPE_CLOSED, StdoutClosed, collect_paths, emit, progress, warn, worker_count
from eva02.hints import count

DEFAULT_TEMPLATE = "a photo of a {}."
PROMPTS_PER_STEP = 1024  # text prompts embedded per step of building a zero-shot head


# ------------------------------------------- CLIP options, shared with index and search (cli/retrieval.py)
def add_clip_args(p: argparse.ArgumentParser, what: str) -> None:
    add_model(p, f"EVA-02-CLIP model name or alias (EVA02-CLIP-B-16, EVA02-L-14, ...){what}")
    add_checkpoint(
        p,
        "weights to load into --model's architecture (open_clip .bin/.safetensors, BAAI EVA-CLIP .pt, eva02); "
        "without --model, a CLIP file written by eva02 (save_clip)",
    )
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: cuda when available)")


def add_batch_args(p: argparse.ArgumentParser, batch: int) -> None:
    add_batch_size(p, batch, f"images per forward pass ({batch})")
    p.add_argument("--workers", type=int, metavar="N", help="image decoding processes (default: up to 4)")
    add_dtype(p, "compute precision: fp32 (default), bf16 or fp16 autocast (fp16 needs --device cuda)")


def unknown_clip_message(name: str) -> str:
    import difflib

    from eva02.weights.zoo import CLIP_ZOO

    spellings = {s.lower(): s for e in CLIP_ZOO.values() for s in (e.name, *e.aliases)}
    close = difflib.get_close_matches(name.strip().lower(), list(spellings), n=3, cutoff=0.5)
    near = f"closest: {', '.join(spellings[c] for c in close)}; " if close else ""
    return f"unknown CLIP model '{name}'; {near}the CLIP models are {', '.join(CLIP_ZOO)} (`eva02 list clip`)"


def choose_clip(model: str | None, checkpoint: str | None) -> tuple[Any, Path | None, Any, dict[str, Any]]:
    """(zoo entry or None, checkpoint or None, preprocessing, the model's record as an index keeps it, less
    the probe) from --model/--checkpoint, with one-line errors, before anything is loaded."""
    from dataclasses import asdict

    from eva02.weights.zoo import Preprocess, find_clip

    if model is None and checkpoint is None:
        raise CliError("give -m/--model NAME (an EVA-02-CLIP model, e.g. EVA02-CLIP-B-16) or --checkpoint FILE")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.is_file():
        raise CliError(f"--checkpoint file '{ckpt}' does not exist")
    entry = find_clip(model) if model is not None else None
    if model is not None and entry is None:
        raise CliError(unknown_clip_message(model))
    if entry is None:
        from eva02.weights.clip import clip_config_of  # torch

        cfg = clip_config_of(ckpt)
    else:
        cfg = entry.cfg
    if cfg is None:
        from eva02.weights.files import read_metadata

        if read_metadata(ckpt).get("format") == "eva02":  # one of our classifier, backbone or task files
            raise CliError(
                f"--checkpoint {ckpt} holds an EVA-02 image model, not an EVA-02-CLIP model (image and text "
                "towers): give a CLIP checkpoint, or a CLIP name alone for its released weights (`eva02 list clip`)"
            )
        raise CliError(
            f"--checkpoint {ckpt} does not say which CLIP model it holds (only files written by eva02 do); "
            "give -m NAME too"
        )
    pre = entry.preprocess if entry is not None else Preprocess(img_size=cfg.vision.img_size)
    record = {"name": entry.name if entry else None, "checkpoint": str(ckpt.resolve()) if ckpt else None}
    return entry, ckpt, pre, json.loads(json.dumps({**record, "config": cfg.to_dict(), "preprocess": asdict(pre)}))


def load_clip(entry, ckpt: Path | None, device):
    """The model, eval mode, on `device` (downloading the zoo weights when no checkpoint is given)."""
    from eva02.threads import set_threads
    from eva02.weights.clip import get_clip

    set_threads(None)  # torch's one thread per core crawls on a busy machine (eva02/threads.py)
    try:
        return get_clip(entry, pretrained=ckpt if ckpt is not None else True, device=device)
    except (OSError, RuntimeError) as e:  # download, file or state-dict problems
        raise CliError(f"cannot load the model: {' '.join(str(e).split())}") from None


def need_tokenizer(cmd: str) -> None:
    """The `clip` extra (the tokenizer), checked before the model loads."""
    from eva02.extras import need

    need("open_clip.tokenizer", "clip", f"eva02 {cmd} (CLIP's tokenizer)")


def quiet_pipe(command):
    """Wrap a command so that a closed stdout ends it quietly with exit code 141."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except StdoutClosed:
            return PIPE_CLOSED

    return run


# ------------------------------------------------------------------------------------ zero-shot
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "zero-shot",
        help="classify images among text labels (EVA-02-CLIP)",
        description="Zero-shot classification: each image's closest labels, scored by CLIP's softmax.",
        epilog='example: eva02 zero-shot photos/ -m EVA02-CLIP-B-16 --labels "cat,dog,car"',
    )
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files and/or directories (searched recursively)")
    add_clip_args(p, "")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", metavar="A,B,...", help="the labels, separated by commas")
    labels.add_argument("--labels-file", metavar="FILE", help="a text file with one label per line")
    labels.add_argument("--imagenet", action="store_true", help="the 1000 ImageNet classes (80 templates by default)")
    templates = p.add_mutually_exclusive_group()
    templates.add_argument(
        "--templates",
        action="append",
        metavar="TEXT",
        help=f"a prompt with {{}} for the label (repeatable; default '{DEFAULT_TEMPLATE}'); "
        "'imagenet' means CLIP's 80 ImageNet templates",
    )
    templates.add_argument("--templates-file", metavar="FILE", help="a text file with one template per line")
    p.add_argument("--topk", "-k", type=positive_int, default=5, metavar="K", help="labels to show per image (5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    add_batch_args(p, 32)
    p.set_defaults(func=quiet_pipe(zero_shot))


def read_lines(path: str, flag: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a UTF-8 text file given to `flag`."""
    f = Path(path)
    if not f.is_file():
        raise CliError(f"{flag} file '{f}' does not exist")
    try:
        text = f.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CliError(f"{flag} {f} is not UTF-8 text; save it as UTF-8, one entry per line") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def parse_labels(args: argparse.Namespace) -> list[str]:
    """The labels of --labels / --labels-file / --imagenet; empty or repeated labels are refused."""
    if args.imagenet:
        from eva02.clip import imagenet_classnames

        return imagenet_classnames()  # as CLIP published them (two names occur twice; rows are classes)
    if args.labels_file is not None:
        numbered = read_lines(args.labels_file, "--labels-file")
        if not numbered:
            raise CliError(f"--labels-file {args.labels_file} holds no labels; write one label per line")
    else:
        items = [s.strip() for s in args.labels.split(",")]
        if any(not s for s in items):
            raise CliError(f"--labels '{args.labels}' has an empty label; separate the labels with single commas")
        numbered = list(enumerate(items, start=1))
    seen: dict[str, int] = {}
    for n, label in numbered:
        if label in seen:
            place = f" (lines {seen[label]} and {n} of {args.labels_file})" if args.labels_file else ""
            raise CliError(f"label '{label}' is given twice{place}; give each label once")
        seen[label] = n
    if len(seen) < 2:
        raise CliError("zero-shot needs at least two labels to choose between")
    return list(seen)


def parse_templates(args: argparse.Namespace) -> list[str]:
    """The prompt templates; each must hold one {} where the label goes."""
    if args.templates_file is not None:
        given = [t for _, t in read_lines(args.templates_file, "--templates-file")]
        if not given:
            raise CliError(f"--templates-file {args.templates_file} holds no templates; write one per line")
    else:
        given = args.templates or (["imagenet"] if args.imagenet else [DEFAULT_TEMPLATE])
    out: list[str] = []
    for t in given:
        if t.strip().lower() == "imagenet":
            from eva02.clip import imagenet_templates

            out += imagenet_templates()
            continue
        try:
            ok = "{}" in t and t.format("\0").count("\0") == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CliError(f"template '{t}' needs exactly one {{}} where the label goes, e.g. '{DEFAULT_TEMPLATE}'")
        out.append(t)
    return out


def zero_shot_head(clip, labels: list[str], templates: list[str], dtype: str | None):
    """The (E, C) zero-shot head on the CPU, in steps of about PROMPTS_PER_STEP prompts (a progress bar
    on a terminal when there are several)."""
    import torch
    from tqdm import tqdm

    from eva02.clip import zero_shot_classifier
    from eva02.dtypes import autocast, autocast_dtype

    device = next(clip.parameters()).device
    half = autocast_dtype(dtype)
    step = max(1, PROMPTS_PER_STEP // len(templates))
    cols = []
    with tqdm(
        total=len(labels),
        desc="prompts",
        unit="label",
        file=sys.stderr,
        leave=False,
        disable=True if len(labels) <= step else None,
    ) as bar:
        for i in range(0, len(labels), step):
            with autocast(device.type, half):
                cols.append(zero_shot_classifier(clip, labels[i : i + step], templates).float().cpu())
            bar.update(len(labels[i : i + step]))
    return torch.cat(cols, dim=1)  # (E, C)


def zero_shot(args: argparse.Namespace) -> int:
    """The `zero-shot` command."""
    labels = parse_labels(args)
    templates = parse_templates(args)
    paths = collect_paths(args)
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    need_tokenizer("zero-shot")
    entry, ckpt, pre, _ = choose_clip(args.model, args.checkpoint)
    device = check_device(args.device, getattr(args, "dtype", None))
    from eva02.data.transforms import eval_transform  # torch: after the checks
    from eva02.inference import iter_file_batches
    from eva02.retrieval import embed_batch

    clip = load_clip(entry, ckpt, device)
    head = zero_shot_head(clip, labels, templates, args.dtype)
    scale = clip.logit_scale.exp().item()
    k, failed = min(args.topk, len(labels)), 0
    batches = iter_file_batches(
        paths, eval_transform(pre), args.batch_size, worker_count(args, len(paths)), device.type == "cuda"
    )
    bar = progress(len(paths), args.batch_size, "zero-shot")
    for indices, batch, errors in batches:
        for _, err in errors:
            warn("zero-shot", err)
        failed += len(errors)
        if batch is not None:
            probs = (scale * embed_batch(clip, batch, args.dtype) @ head).softmax(dim=-1)  # (B, C)
            top = probs.topk(k, dim=-1)
            for i, scores, rows in zip(indices, top.values.tolist(), top.indices.tolist(), strict=True):
                ranked = [(labels[r], r, s) for r, s in zip(rows, scores, strict=True)]
                emit(format_zero_shot(str(paths[i]), ranked, args.json))
        bar.update(len(indices) + len(errors))
    bar.close()
    if failed:
        print(f"eva02 zero-shot: {failed} of {count(len(paths), 'image')} failed", file=sys.stderr)
    return 1 if failed else 0


def format_zero_shot(path: str, top: list[tuple[str, int, float]], as_json: bool) -> str:
    if as_json:
        label, index, score = top[0]
        rec = {
            "path": path,
            "pred_label": index,  # as `predict` and `inference_model`: the index, and its name in pred_class
            "pred_class": label,
            "pred_score": round(score, 6),
            "topk": [[lab, round(s, 6)] for lab, _, s in top],
        }
        return json.dumps(rec, ensure_ascii=False)
    return "\n".join([path, *(f"  {n:>2}. {s:7.4f}  {lab}" for n, (lab, _, s) in enumerate(top, start=1))])
