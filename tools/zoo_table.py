"""Print the Markdown zoo table generated from `eva02.weights.zoo`, or keep a file's copy of it current.

    python tools/zoo_table.py                   # print the table
    python tools/zoo_table.py --write README.md # replace the block between the zoo-table markers
    python tools/zoo_table.py --check README.md # exit 1 if that block is out of date

Parameters and FLOPs (multiply-adds) are our own counts; top-1/top-5 are the reference page's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from eva02.flops import count_flops, count_params
from eva02.weights.zoo import ZOO

START = "<!-- zoo-table:start -->"
END = "<!-- zoo-table:end -->"


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


def replace_block(text: str, table: str, path: str = "the file") -> str:
    """`text` with the lines between the start and end markers replaced by `table`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(
            f"{path} must contain one line {START} followed by one line {END}; add them where the table goes"
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
    except (OSError, ValueError) as e:
        print(f"zoo_table: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path}: zoo table is out of date; run python tools/zoo_table.py --write {path}", file=sys.stderr)
            return 1
        print(f"{path}: zoo table is up to date")
        return 0
    if new != text:
        write_atomic(path, new)
    print(f"{path}: zoo table written ({len(ZOO)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
