"""`eva02 zero-shot`, `eva02 index` and `eva02 search`: EVA-02-CLIP on images, by text labels or by similarity.

`zero-shot` classifies images among text labels (softmax of CLIP's scaled cosine similarities to the
labels' prompt embeddings). `index` embeds every image below a folder into an index file, resumable
(`eva02.retrieval`); `search` finds the images closest to a text or an image. The three follow `predict`:
inputs, outputs and the model name are checked before the model loads; an unreadable image is a one-line
warning and exit code 1; result lines are flushed one by one and a closed stdout ends with exit code 141.
Nothing here imports torch until the checks are done, so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eva02.cli import CliError
from eva02.cli.options import add_batch_size, add_checkpoint, add_dtype, add_model, add_out, positive_int
from eva02.cli.predict import PIPE_CLOSED, StdoutClosed, collect_paths, emit, progress, warn, worker_count
from eva02.hints import count

DEFAULT_TEMPLATE = "a photo of a {}."
PROMPTS_PER_STEP = 1024  # text prompts embedded per step of building a zero-shot head


# ------------------------------------------------------------------------------- shared options
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
        raise CliError(
            f"--checkpoint {ckpt} does not say which CLIP model it holds (only files written by eva02 do); "
            "give -m NAME too"
        )
    pre = entry.preprocess if entry is not None else Preprocess(img_size=cfg.vision.img_size)
    record = {"name": entry.name if entry else None, "checkpoint": str(ckpt.resolve()) if ckpt else None}
    return entry, ckpt, pre, json.loads(json.dumps({**record, "config": cfg.to_dict(), "preprocess": asdict(pre)}))


def check_device(args: argparse.Namespace):
    from eva02.inference import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError:
        if args.device.startswith("cuda"):
            raise CliError(f"--device {args.device}: no CUDA device is visible here; use --device cpu") from None
        raise CliError(f"--device {args.device}: unknown device; use cpu, cuda or cuda:N") from None
    if getattr(args, "dtype", None) == "fp16" and device.type != "cuda":
        raise CliError("--dtype fp16 needs a CUDA device (--device cuda); on CPU use --dtype bf16 or fp32")
    return device


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
    register_retrieval(subparsers)


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

    device = next(clip.parameters()).device
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype or "fp32")
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
            with torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
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
    device = check_device(args)
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


# ------------------------------------------------------------------------------------ index, search
def register_retrieval(subparsers) -> None:
    p = subparsers.add_parser(
        "index",
        help="embed a folder of images into a search index (EVA-02-CLIP)",
        description="Embed every image below DIR into an index file for `eva02 search`. Progress is saved as "
        "it goes: an interrupted run continues when the same command runs again.",
        epilog="example: eva02 index photos/ -m EVA02-CLIP-B-16 -o photos.safetensors",
    )
    p.add_argument("folder", metavar="DIR", help="the folder of images (searched recursively)")
    add_clip_args(p, "")
    add_out(p, "INDEX", "the index file to write (.safetensors)", "rebuild --out if it exists", required=True)
    p.add_argument("--update", action="store_true", help="add new and changed images to --out, drop vanished ones")
    p.add_argument("--ann", action="store_true", help="also build the faiss index of `search --ann` (the ann extra)")
    p.add_argument(
        "--save-every",
        type=positive_int,
        default=4096,
        metavar="N",
        help="save progress every N images (4096) and at least every minute",
    )
    add_batch_args(p, 32)
    p.set_defaults(func=quiet_pipe(index))

    p = subparsers.add_parser(
        "search",
        help="find the indexed images closest to a text or an image",
        description="Search an index of `eva02 index` by text or by image: cosine similarity, exact unless --ann.",
        epilog='example: eva02 search photos.safetensors --text "a red car" -k 5',
    )
    p.add_argument("index", metavar="INDEX", help="an index file written by `eva02 index`")
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text query (repeatable)")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image query (repeatable)")
    p.add_argument("--topk", "-k", type=positive_int, default=10, metavar="K", help="images per query (10)")
    p.add_argument("--json", action="store_true", help="print one JSON object per query instead of a table")
    add_clip_args(p, "; default: the model that built INDEX")
    p.add_argument("--ann", action="store_true", help="search the faiss index of `index --ann` (approximate)")
    p.add_argument("--nprobe", type=positive_int, metavar="N", help="with --ann: IVF lists visited per query (32)")
    p.set_defaults(func=quiet_pipe(search))


def model_flags(record: dict[str, Any]) -> str:
    """The -m/--checkpoint words that load the model of an index record."""
    words = (("-m", "name"), ("--checkpoint", "checkpoint"))
    flags = [f"{flag} {record[key]}" for flag, key in words if record.get(key)]
    return " ".join(flags) or "the model that made it"


def mismatch_message(e, out: Path) -> str:
    from eva02.retrieval import describe_model

    now, then = describe_model(e.current), describe_model(e.stored)
    if Path(e.where) == out:
        return (
            f"{out} holds embeddings of {then}, not of {now} (other {e.why}), and models are never mixed in one "
            f"index; update it with {model_flags(e.stored)}, or rebuild it with --force"
        )
    return (
        f"{e.where} holds an unfinished index made with {then}, not with {now} (other {e.why}); finish it with "
        f"{model_flags(e.stored)}, or pass --force to discard it"
    )


def check_index_target(args: argparse.Namespace, out: Path, record: dict[str, Any], ckpt: Path | None) -> None:
    """--out may be written by this model: checked by config, before the model loads."""
    from eva02.fileio import check_output
    from eva02.retrieval import IndexMismatch, check_same_model, parts_dir, stored_model

    if out.suffix != ".safetensors":
        raise CliError(f"--out {out} must end in .safetensors")
    if out.exists() and not out.is_dir() and not (args.update or args.force):
        raise CliError(f"--out {out} already exists; pass --update to add new and changed images, --force to rebuild")
    check_output(out, inputs=[ckpt] if ckpt else [], force=True, flag="--out")
    targets = ([] if args.force else [parts_dir(out)]) + ([out] if args.update and out.exists() else [])
    for where in targets:
        try:
            stored = stored_model(where)
        except (ValueError, KeyError) as e:
            raise CliError(f"cannot read {where} ({e}); pass --force to start over") from None
        try:
            if stored is not None:
                check_same_model(stored, record, str(where), "")
        except IndexMismatch as e:
            raise CliError(mismatch_message(e, out)) from None


def index(args: argparse.Namespace) -> int:
    """The `index` command."""
    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        what = "is a file; `eva02 index` takes a folder of images" if folder.exists() else "does not exist"
        raise CliError(f"{folder} {what}")
    if args.update and args.force:
        raise CliError("give --update or --force, not both")
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    entry, ckpt, pre, record = choose_clip(args.model, args.checkpoint)
    device = check_device(args)
    if args.ann:
        from eva02.extras import need

        need("faiss", "ann", "eva02 index --ann")
    check_index_target(args, out, record, ckpt)
    from tqdm import tqdm  # torch: after the checks

    from eva02.retrieval import IndexMismatch, build_index, list_images, parts_dir

    listing = list_images(folder)
    if not listing:
        raise CliError(f"no image files found in {folder} (looked for .jpg, .png, .webp, ...)")
    clip = load_clip(entry, ckpt, device)
    try:
        report = build_index(
            folder,
            clip,
            out,
            preprocess=pre,
            name=record["name"],
            checkpoint=ckpt,
            update=args.update,
            force=args.force,
            batch_size=args.batch_size,
            save_every=args.save_every,
            workers=worker_count(args, len(listing)),
            dtype=args.dtype,
            on_error=lambda e: warn("index", e),
            log=lambda msg: tqdm.write(f"eva02 index: {msg}", file=sys.stderr),
            listing=listing,
        )
    except IndexMismatch as e:
        raise CliError(mismatch_message(e, out)) from None
    except KeyboardInterrupt:
        print(
            f"eva02 index: interrupted; what was embedded is kept in {parts_dir(out)}: run the same command "
            "again to continue",
            file=sys.stderr,
        )
        return 130
    return report_index(args, out, report)


def report_index(args: argparse.Namespace, out: Path, report) -> int:
    from eva02.retrieval import build_ann, describe_model, load_ann, save_ann

    failed = f"{len(report.failed)} of {count(report.total, 'image')} failed"
    if report.index is None:
        print(f"eva02 index: {failed}; nothing written", file=sys.stderr)
        return 1
    idx = report.index
    if report.written:
        kept = f", {report.reused} of them from before" if report.reused else ""
        emit(
            f"wrote {out}: {count(len(idx), 'image')}{kept}; {idx.dim}-d float16 embeddings of "
            f"{describe_model(idx.model)}"
        )
    else:
        emit(f"{out} is up to date: {count(len(idx), 'image')}")
    if args.ann:
        try:
            load_ann(idx)
        except (FileNotFoundError, ValueError):
            emit(f"wrote {save_ann(idx, build_ann(idx))}: the faiss index of {count(len(idx), 'image')}")
    if report.failed:
        print(f"eva02 index: {failed}", file=sys.stderr)
    return 1 if report.failed else 0


def search_model(args: argparse.Namespace, index) -> tuple[str | None, str | None]:
    """--model/--checkpoint, or the model recorded in the index."""
    if args.model is not None or args.checkpoint is not None:
        return args.model, args.checkpoint
    name, ckpt = index.model.get("name"), index.model.get("checkpoint")
    if ckpt is not None and not Path(ckpt).is_file():
        raise CliError(
            f"{index.path} was built with the weights of {ckpt}, which is gone; give --checkpoint FILE "
            "(and -m NAME) with the same weights"
        )
    if name is None and ckpt is None:
        raise CliError(f"{index.path} does not say which model built it; give -m NAME and/or --checkpoint FILE")
    return name, ckpt


def search(args: argparse.Namespace) -> int:
    """The `search` command."""
    path = Path(args.index)
    if not args.text and not args.image:
        raise CliError("give --text TEXT or --image FILE (each may be repeated)")
    if args.nprobe is not None and not args.ann:
        raise CliError("--nprobe applies to approximate search: add --ann")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CliError(f"index {path} {what}; build one with `eva02 index DIR -m NAME -o INDEX`")
    missing = [q for q in args.image if not Path(q).is_file()]
    if missing:
        raise CliError(f"--image {missing[0]}: no such file")
    if args.text:
        need_tokenizer("search")
    from eva02.data.images import load_image  # torch: after the checks
    from eva02.retrieval import (
        IndexMismatch,
        check_same_model,
        embed_images,
        embed_texts,
        load_ann,
        load_index,
        model_info,
    )

    idx = load_index(path)
    images = [load_image(q) for q in args.image]
    ann = None
    if args.ann:
        try:
            ann = load_ann(idx)
        except (FileNotFoundError, ValueError) as e:
            how = f"eva02 index {idx.root} {model_flags(idx.model)} -o {path} --update --ann"
            raise CliError(f"{e}; build it with `{how}`") from None
    entry, ckpt, pre, record = choose_clip(*search_model(args, idx))
    fix = "search it with the model that built it (leave out -m and --checkpoint)"
    try:
        check_same_model(idx.model, record, str(path), fix)
        device = check_device(args)
        clip = load_clip(entry, ckpt, device)
        check_same_model(idx.model, model_info(clip, pre, record["name"], ckpt), str(path), fix)
    except IndexMismatch as e:
        raise CliError(str(e)) from None
    import torch

    queries = [("text", t) for t in args.text] + [("image", q) for q in args.image]
    emb = [embed_texts(clip, args.text)] if args.text else []
    emb += [embed_images(clip, images, pre)] if images else []
    if ann is None and len(idx) > 1_000_000:
        print(f"eva02 search: note: {path} holds {len(idx)} images; --ann searches it faster", file=sys.stderr)
    hits = idx.search(torch.cat(emb), args.topk, ann=ann, nprobe=args.nprobe)
    for (kind, query), found in zip(queries, hits, strict=True):
        emit(format_hits(kind, query, [(str(idx.file(h.row)), h.score) for h in found], args.json))
    return 0


def format_hits(kind: str, query: str, found: list[tuple[str, float]], as_json: bool) -> str:
    if as_json:
        results = [{"path": p, "score": round(s, 6)} for p, s in found]
        return json.dumps({"query": query, "kind": kind, "results": results}, ensure_ascii=False)
    return "\n".join([f"{kind}: {query}", *(f"  {n:>2}. {s:7.4f}  {p}" for n, (p, s) in enumerate(found, start=1))])
