"""The `eva02` command line: one subcommand per module of this package, each thin over the library.

Each module `eva02/cli/<name>.py` defines `register(subparsers)`, which adds its subcommand(s) and sets
`func` (taking the parsed args, returning an exit code) with `parser.set_defaults(func=...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

from eva02 import hints
from eva02.extras import MissingExtra

# Subcommand modules, in the order their commands appear in `eva02 --help`.
MODULES = (
    "zoo",
    "predict",
    "features",
    "convert",
    "train",
    "shard",
    "plot",
    "bench",
    "export",
    "pretrain",
    "serve",
    "explain",
    "detect",
    "segment",
    "clip",
    "retrieval",
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2 (no traceback)."""


class Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line naming the command and where help is, exit code 2
    (argparse's own prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} -h`\n")


def build_parser() -> argparse.ArgumentParser:
    from eva02 import __version__

    parser = Parser(prog="eva02", description="EVA-02 vision transformers: run `eva02 CMD -h`.")
    parser.add_argument("--version", action="version", version=f"eva02 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="CMD")
    for name in MODULES:
        importlib.import_module(f"eva02.cli.{name}").register(sub)
    return parser


# Options taking any number of KEY=VALUE items: a word without '=' after them is a positional argument.
_KEY_VALUE_OPTIONS = ("--set", "--cfg-options")


def _positionals_last(argv: list[str]) -> list[str]:
    """Move words that follow a KEY=VALUE option but are not KEY=VALUE to the end of the command line,
    after `--`, so that `eva02 test CFG --set a=b CKPT` reads CKPT as the checkpoint, not as an option."""
    if "--" in argv:
        return argv
    head, tail, in_options = [], [], False
    for word in argv:
        if word in _KEY_VALUE_OPTIONS:
            in_options = True
        elif word.startswith("-"):
            in_options = False
        elif in_options and "=" not in word:
            tail.append(word)
            continue
        head.append(word)
    return [*head, "--", *tail] if tail else head


@contextlib.contextmanager
def _plain_warnings():
    """Warnings as `warning: message` lines on stderr, without the source file and line of the library."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_positionals_last(sys.argv[1:] if argv is None else list(argv)))
    if extra:  # named with the command they were given to, not with `eva02` alone
        prog = f"eva02 {args.command}" if getattr(args, "command", None) else "eva02"
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}; see `{prog} -h`", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with hints.using(hints.CLI), _plain_warnings():
            return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout's reader went away (`| head`): stop quietly, as a killed writer would
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, FileNotFoundError, ValueError, KeyError, MissingExtra) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eva02 {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
