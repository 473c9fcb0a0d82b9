"""The `eva02` command line: one subcommand per module of this package, each thin over the library.

Each module `eva02/cli/<name>.py` defines `register(subparsers)`, which adds its subcommand(s) and sets
`func` (taking the parsed args, returning an exit code) with `parser.set_defaults(func=...)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order their commands appear in `eva02 --help`.
MODULES = ("zoo", "predict", "features", "convert", "train", "bench", "export", "pretrain")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2 (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eva02", description="EVA-02 vision transformers: run `eva02 CMD -h`.")
    sub = parser.add_subparsers(dest="command", metavar="CMD")
    for name in MODULES:
        try:
            mod = importlib.import_module(f"eva02.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"eva02.cli.{name}":
                continue  # that command group is not part of this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CliError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eva02 {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
