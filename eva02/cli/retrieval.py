"""`eva02 index` and `eva02 search`: image retrieval with EVA-02-CLIP.

`index` embeds every image below a folder into an index file, resumable (`eva02.retrieval`); `search` finds
the images closest to a text or an image. Both follow `predict`: inputs, outputs and the model name are
checked before the model loads; an unreadable image is a one-line warning and exit code 1; result lines are
flushed one by one and a closed stdout ends with exit code 141. The CLIP options and model loading are
shared with `zero-shot` (`eva02.cli.clip`). Nothing here imports torch until the checks are done, so
`--help` stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eva02.cli import CliError
from eva02.cli.clip import (
    add_batch_args,
    add_clip_args,
    choose_clip,
    load_clip,
    need_tokenizer,
    quiet_pipe,
)
from eva02.cli.options import add_out, check_device, positive_int
from eva02.cli.predict import emit, warn, worker_count
from eva02.hints import count


def register(subparsers) -> None:
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
    device = check_device(args.device, getattr(args, "dtype", None))
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
    if any(not t.strip() for t in args.text):  # an unset shell variable, most often: nothing to search for
        raise CliError("--text is empty; give the words to search for, e.g. --text 'a red car'")
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
        device = check_device(args.device, getattr(args, "dtype", None))
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
