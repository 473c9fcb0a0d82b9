"""`eva02 plot`: the loss, learning-rate and top-1 curves of a training work dir as PNG files.

The pictures (loss.png, lr.png, top1.png) go into the work dir or `-o/--out DIR`; pictures already there
are replaced only with `--force`, checked before anything is read or drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import add_out

PICTURES = ("loss.png", "lr.png", "top1.png")  # what eva02.engine.plot.plot_run draws


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="PNG curves (loss, lr, top-1) of a training work dir",
        description="Draw loss.png, lr.png and top1.png from a work dir's metrics.jsonl (needs the plot extra).",
        epilog="example: eva02 plot work_dirs/eva02_tiny_p14_8xb16_in1k -o curves",
    )
    p.add_argument("work_dir", metavar="WORK_DIR", help="a training run's folder (holds metrics.jsonl)")
    add_out(p, "DIR", "folder for the PNGs (default: the work dir)", "replace PNGs that are already there")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eva02.engine.plot import plot_run

    work_dir = Path(args.work_dir)
    if not work_dir.is_dir():
        raise CliError(f"work dir {work_dir} does not exist; give the folder of a training run")
    folder = Path(args.out) if args.out else work_dir
    there = [name for name in PICTURES if (folder / name).exists()]
    if there and not args.force:
        where = f"--out {folder}" if args.out else f"work dir {folder}"
        raise CliError(
            f"{where} already holds {', '.join(there)}; pass --force to replace them or choose another --out"
        )
    for path in plot_run(work_dir, args.out):
        print(path)
    return 0
