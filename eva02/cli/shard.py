"""`eva02 shard`: class folders, a list file or a plain folder of images -> WebDataset tar shards with a
manifest (`eva02/data/shard_writer.py`); `eva02 shard --verify DIR` re-reads every shard against its manifest.

The output folder is checked before the source is scanned: never inside the source, new or empty, or
an earlier `eva02 shard` output that only `--force` replaces. Shards are written under temporary names
and renamed into place at the end, the manifest last, so a killed run leaves no shards behind under
their real names. Unreadable images are named in one warning each and left out (exit code 0; the
manifest lists them); `--verify` prints one line and exits with 1 when anything differs.
"""

from __future__ import annotations

import argparse
import os
import sys

from eva02.cli import CliError
from eva02.extras import need
from eva02.hints import count


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shard",
        help="write image folders as WebDataset tar shards (or --verify them)",
        description="Write class folders (SRC/<class>/<image>), a list file (--list) or a plain folder of images as "
        "WebDataset tar shards of about --shard-size bytes, with manifest.json (counts per shard and class, "
        "sha256, class names, images left out). Train on them with --set data.format=wds data.train_shards=OUT.",
        epilog="examples: eva02 shard data/imagenet/train shards/train --shard-size 1GB; "
        "eva02 shard --verify shards/train",
    )
    p.add_argument("paths", nargs="+", metavar="SRC OUT", help="source folder and output folder (with --verify: DIR)")
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (instead of OUT after SRC)")
    p.add_argument("--force", action="store_true", help="replace the shards of an earlier run in the output folder")
    p.add_argument("--verify", action="store_true", help="re-read the shards of DIR: sizes, sha256, counts, images")
    p.add_argument("--shard-size", default="1GB", metavar="SIZE", help="bytes of images per shard: 1GB (default), "
                   "500MB, 2GiB")  # fmt: skip
    p.add_argument("--list", dest="list_file", metavar="FILE", help="'relative/path label' lines; paths under SRC")
    p.add_argument("--class-names", metavar="FILE", help="class names, one a line (default: folder names)")
    p.add_argument("--no-labels", action="store_true", help="every image below SRC, without labels (for MIM)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding processes (default: the CPU count, up to 8)")  # fmt: skip
    p.set_defaults(func=run)


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    return args.workers if args.workers is not None else min(8, os.cpu_count() or 1)


def verify(args: argparse.Namespace) -> int:
    from eva02.data.shard_writer import verify_shards

    need("wids.wids", "data", "eva02 shard --verify")
    if len(args.paths) != 1 or args.out:
        raise CliError("--verify takes one folder: eva02 shard --verify DIR")
    folder = args.paths[0]
    m, problems = verify_shards(folder, _workers(args))
    n, shards, classes = m.get("count", 0), len(m["shardlist"]), len(m.get("classes", []))
    what = f"{count(shards, 'shard')}, {count(n, 'image')}" + (f" in {count(classes, 'class', 'classes')}"
                                                               if classes else "")  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        print(f"{folder}: {count(len(problems), 'problem')} in {what}: {'; '.join(problems[:3])}{more}")
        return 1
    print(f"{folder}: {what}; sizes, sha256, counts and images all match the manifest")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verify:
        return verify(args)
    from eva02.data.shard_writer import check_out, parse_size, scan_source, write_shards

    need("webdataset", "data", "eva02 shard")  # before anything is read or written
    if len(args.paths) == 2 and args.out and args.out != args.paths[1]:
        raise CliError(f"two outputs given ({args.paths[1]} and --out {args.out}); give one")
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.out):
        raise CliError("give the source folder and the output folder: eva02 shard SRC OUT")
    src, out = args.paths[0], args.out or args.paths[1]
    size, workers = parse_size(args.shard_size), _workers(args)
    if args.no_labels and (args.list_file or args.class_names):
        raise CliError("--no-labels shards images without labels; drop --list / --class-names")
    if not os.path.isdir(src):
        raise CliError(f"source folder {src} does not exist")
    check_out(out, src, args.force)  # before the source is scanned: that can take minutes
    source = scan_source(src, args.list_file or "", args.class_names or "", labels=not args.no_labels)
    if not source.items:
        raise CliError(f"no images found in {src} (looked for .jpg, .png, .webp, ...)")
    from tqdm import tqdm

    bar = tqdm(total=len(source.items), desc="shard", unit="img", file=sys.stderr, disable=None, leave=False)

    def on_item(reason: str | None) -> None:
        bar.update(1)
        if reason is not None:
            tqdm.write(f"eva02 shard: warning: {reason} (left out)", file=sys.stderr)

    try:
        m = write_shards(source, out, size, args.force, workers, on_item)
    finally:
        bar.close()
    nbytes = sum(e["filesize"] for e in m["shardlist"])
    classes = f" in {count(len(m['classes']), 'class', 'classes')}" if m["classes"] else " (no labels)"
    left = f"; {count(len(m['skipped']), 'unreadable image')} left out" if m["skipped"] else ""
    print(f"wrote {count(len(m['shardlist']), 'shard')} to {out}: {count(m['count'], 'image')}{classes}, "
          f"{nbytes / 1e6:.1f} MB{left}")  # fmt: skip
    return 0
