"""Print the Markdown zoo tables generated from `eva02.weights.zoo`, or keep a file's copies of them current.

    python tools/zoo_table.py                   # print the table
    python tools/zoo_table.py --write README.md # replace the block between the zoo-table markers
    python tools/zoo_table.py --check README.md # exit 1 if that block is out of date

Parameters and FLOPs (multiply-adds) are our own counts; top-1/top-5 are the reference page's. A file
may also hold the EVA-02-CLIP table between the clip-table markers (zero-shot top-1 as BAAI reports it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from eva02.flops import count_clip, count_flops, count_params
from eva02.weights.zoo import CLIP_ZOO, ZOO

START = "<!-- zoo-table:start -->"
END = "<!-- zoo-table:end -->"
CLIP_START = "<!-- clip-table:start -->"
CLIP_END = "<!-- clip-table:end -->"


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def make_table() -> str:
    """The zoo as a Markdown table, one row per page name in the page's order (no trailing newline)."""
    rows = [
        "| Model | Task | Params (M) | FLOPs (G) | Input | Top-1 (%) | Top-5 (%) |",
        "| :-- | :-- | --: | --: | --: | --: | --: |",
    ]
    for e in ZOO.values():
        params, macs = count_params(e.cfg), count_flops(e.cfg)
        cells = [f"`{e.name}`", e.task, f"{params / 1e6:.2f}", f"{macs / 1e9:.2f}"]
        cells += [f"{e.cfg.img_size}x{e.cfg.img_size}", _acc(e.top1), _acc(e.top5)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def make_clip_table() -> str:
    """The EVA-02-CLIP entries as a Markdown table: per-tower parameters and multiply-adds (the text tower's
    on one 77-token text) and the reported zero-shot top-1 (no trailing newline)."""
    rows = [
        "| Model | open_clip name | Image params (M) | Text params (M) | Image FLOPs (G) | Text FLOPs (G) | Input "
        "| Zero-shot top-1 (%) |",
        "| :-- | :-- | --: | --: | --: | --: | --: | --: |",
    ]
    for e in CLIP_ZOO.values():
        c = count_clip(e.cfg)
        size = e.cfg.vision.img_size
        cells = [f"`{e.name}`", f"`{e.aliases[1]}`", f"{c['image_params'] / 1e6:.2f}", f"{c['text_params'] / 1e6:.2f}"]
        cells += [f"{c['image_macs'] / 1e9:.2f}", f"{c['text_macs'] / 1e9:.2f}", f"{size}x{size}"]
        cells.append("-" if e.zero_shot_top1 is None else f"{e.zero_shot_top1:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def replace_block(text: str, table: str, path: str = "the file", start: str = START, end: str = END) -> str:
    """`text` with the lines between the start and end markers replaced by `table`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == start]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(
            f"{path} must contain one line {start} followed by one line {end}; add them where the table goes"
        )
    s, e = starts[0], ends[0]
    return "".join(lines[: s + 1]) + table + "\n" + "".join(lines[e:])


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so the file is never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the Markdown zoo table from the code.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the zoo-table block of FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 if the zoo-table block of FILE differs")
    args = parser.parse_args(argv)
    table = make_table()
    target = args.write or args.check
    if target is None:
        print(table)
        return 0
    path = Path(target)
    try:
        text = path.read_text(encoding="utf-8")
        new = replace_block(text, table, str(path))
        if CLIP_START in text:
            new = replace_block(new, make_clip_table(), str(path), CLIP_START, CLIP_END)
    except (OSError, ValueError) as e:
        print(f"zoo_table: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path}: zoo tables are out of date; run python tools/zoo_table.py --write {path}", file=sys.stderr)
            return 1
        print(f"{path}: zoo tables are up to date")
        return 0
    if new != text:
        write_atomic(path, new)
    print(f"{path}: zoo tables written ({len(ZOO)} models, {len(CLIP_ZOO)} CLIP models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
