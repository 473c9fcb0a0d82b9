"""The words every command shares, defined once: -m/--model NAME, --checkpoint FILE, -o/--out with
--force, -b/--batch-size N and --dtype fp32|bf16|fp16, plus the zoo-name check with suggestions.

Older spellings (`export NAME`, `bench --batch`, `predict --amp`, ...) stay accepted as hidden aliases:
they work but are left out of `--help`. Nothing here imports torch: building the parser stays quick.
"""

from __future__ import annotations

import argparse
import difflib
from typing import TYPE_CHECKING

from eva02.cli import CliError
from eva02.dtypes import DTYPES  # noqa: F401 (the --dtype words, for the command modules)

if TYPE_CHECKING:
    from eva02.weights.zoo import ZooEntry

HIDDEN = argparse.SUPPRESS


def add_model(p: argparse.ArgumentParser, help: str, positional: bool = False, **kw) -> None:
    """`-m/--model NAME`; with `positional`, a bare NAME is accepted too (the older spelling, not shown)."""
    if positional:
        p.add_argument("name_arg", nargs="?", metavar="NAME", help=HIDDEN)
    p.add_argument("-m", "--model", metavar="NAME", help=help, **kw)


def model_arg(args: argparse.Namespace) -> str | None:
    """The model name of `-m/--model` or of the positional NAME (one of them, not two different ones)."""
    positional = getattr(args, "name_arg", None)
    if positional is not None and args.model is not None and positional != args.model:
        raise CliError(f"two model names given ({positional} and --model {args.model}); give one")
    return args.model if args.model is not None else positional


def add_checkpoint(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--checkpoint", metavar="FILE", help=help)


def add_out(p: argparse.ArgumentParser, metavar: str, help: str, force_help: str, required: bool = False) -> None:
    """`-o/--out` and the `--force` that allows replacing what it names."""
    p.add_argument("-o", "--out", metavar=metavar, required=required, help=help)
    p.add_argument("--force", action="store_true", help=force_help)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (the error names the flag: 'argument -b/--batch-size: ...')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_batch_size(p: argparse.ArgumentParser, default: int | None, help: str, dest: str = "batch_size") -> None:
    p.add_argument("-b", "--batch-size", type=positive_int, default=default, metavar="N", dest=dest, help=help)


def add_dtype(p: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    p.add_argument("--dtype", choices=DTYPES, default=default, help=help)


# ------------------------------------------------------------------------------------ zoo names
def suggestions(name: str, limit: int = 3) -> tuple[list[str], int]:
    """Zoo names close to `name`: those containing it (as a name or an alias), else near spellings.
    Returns up to `limit` page names and how many matched in all."""
    from eva02.weights.zoo import ZOO

    key = name.strip().lower()
    if not key:
        return [], 0
    contains = [n for n, e in ZOO.items() if any(key in s.lower() for s in (n, *e.aliases))]
    if contains:
        return contains[:limit], len(contains)

    def score(spelling: str) -> float:
        s = spelling.lower()  # a typo in a name's start scores high against that start of the name
        return max(
            difflib.SequenceMatcher(None, key, s).ratio(), difflib.SequenceMatcher(None, key, s[: len(key)]).ratio()
        )

    scored = sorted(((max(score(s) for s in (n, *e.aliases)), n) for n, e in ZOO.items()), key=lambda t: -t[0])
    best = scored[0][0]
    close = [n for s, n in scored if s >= max(0.75, best - 0.03)]  # the best, and those nearly as good
    return close[:limit], len(close)


def unknown_model_message(name: str) -> str:
    """One line: the unknown name, the closest zoo names, and how to see them all."""
    close, total = suggestions(name)
    if not close:
        return f"unknown model name '{name}', and no zoo name is close to it; `eva02 list` shows them all"
    more = f" (and {total - len(close)} more: `eva02 list {name.strip()}`)" if total > len(close) else ""
    return f"unknown model name '{name}'; closest: {', '.join(close)}{more}"


def zoo_entry(name: str) -> ZooEntry:
    """The zoo entry of a name or alias (any case), or a CliError that suggests close names."""
    from eva02.weights.zoo import resolve

    try:
        return resolve(name)
    except ValueError:
        raise CliError(unknown_model_message(name)) from None


def check_device(device: str | None, dtype: str | None = None):
    """The torch device `--device` names (default: CUDA when available), checked with `--dtype`: a
    one-line CliError for an unknown or missing device, or fp16 on a CPU. Imports torch."""
    from eva02.inference import resolve_device

    try:
        found = resolve_device(device)
    except ValueError:
        if device.startswith("cuda"):
            raise CliError(f"--device {device}: no CUDA device is visible here; use --device cpu") from None
        raise CliError(f"--device {device}: unknown device; use cpu, cuda or cuda:N") from None
    if dtype == "fp16" and found.type != "cuda":
        raise CliError("--dtype fp16 needs a CUDA device (--device cuda); on CPU use --dtype bf16 or fp32")
    return found
