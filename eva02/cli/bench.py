"""`eva02 bench`: our models against timm's (and mmpretrain's) on this machine, side by side in one run.

A thin front to the harness in `benchmarks/eva02_bench` of a source checkout: the harness builds the
peers' models, so it stays out of the installed package, and the command says so in one line where
there is no checkout beside the package. `-m/--model` takes benchmark sizes (`tiny-336`) or zoo names,
which are timed as their size at their input size (random weights either way). The `-o/--out` report
path is checked before anything is timed (never an existing file without `--force`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from eva02.cli import CliError
from eva02.cli.options import HIDDEN, add_batch_size, add_dtype, add_out, positive_int, suggestions
from eva02.extras import MissingExtra, install_hint
from eva02.fileio import atomic_write_text, check_output

SIZE_NAMES = "test-56 tiny-336 small-336 base-448 large-448"  # the harness's SIZES, without importing it
# benchmarks/ of the checkout this package was imported from (absent from an installed wheel)
HARNESS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="inference / training-step img/s and memory against timm",
        description="Time our Eva02 and timm's Eva (same architecture, random weights) in interleaved rounds, "
        "with the harness of benchmarks/ (a source checkout).",
        epilog="example: eva02 bench -m eva02-tiny-p14_in21k-pre_3rdparty_in1k base-448 --train -o bench.json",
    )
    p.add_argument(
        "-m",
        "--model",
        "--models",
        dest="models",
        nargs="+",
        default=["tiny-336", "base-448"],
        metavar="NAME",
        help=f"sizes ({SIZE_NAMES}) or zoo names (default: tiny-336 base-448)",
    )
    p.add_argument("--impls", nargs="+", default=["ours", "timm"], choices=["ours", "timm", "mmpretrain"])
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=5, metavar="N", help="timed rounds per implementation (median)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed calls before the rounds")
    add_batch_size(p, None, "batch size for every model (default: per size)", dest="batch")
    p.add_argument("--batch", type=positive_int, dest="batch", help=HIDDEN)  # older spelling of --batch-size
    p.add_argument("--compile", action="store_true", help="also time each implementation under torch.compile")
    p.add_argument("--train", action="store_true", help="also time a training step (fwd + bwd + AdamW)")
    p.add_argument("--memory", action="store_true", help="also measure training-step memory (subprocess each)")
    p.add_argument("--grad-ckpt", action="store_true", help="with --memory: also with gradient checkpointing")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time the unavoidable kernels (matmuls, attention, conv) alone: the fastest one could be",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_dtype(p, "inference with the weights in this dtype, training under its autocast (fp16: CUDA only)", "fp32")
    p.add_argument("--mmp-site", default=None, metavar="DIR", help="folder holding an mmpretrain install")
    add_out(p, "FILE", "write the full report (all rounds) as JSON here", "replace --out if it exists")
    p.add_argument("--json", dest="out", metavar="FILE", help=HIDDEN)  # older spelling of --out
    p.set_defaults(func=run)


def size_names(models: list[str]) -> list[str]:
    """Benchmark size names for -m/--model: sizes as given, zoo names as their variant at their input size
    (`small-224`; `add_sizes` gives the harness a size it does not list)."""
    from eva02.model.config import VARIANTS
    from eva02.weights.zoo import ZOO, resolve

    sizes = SIZE_NAMES.split()
    out = []
    for name in models:
        if name in sizes:
            out.append(name)
            continue
        try:
            cfg = resolve(name).cfg
        except ValueError:
            close, _ = suggestions(name)
            hint = f", or a zoo name such as {close[0]}" if close else ", or a zoo name (`eva02 list`)"
            raise CliError(f"unknown size '{name}' in --model; choose from {', '.join(sizes)}{hint}") from None
        if cfg.patch_size != 14:
            p14 = cfg.replace(patch_size=14)
            twin = next((n for n, e in ZOO.items() if e.cfg == p14), None)
            raise CliError(
                f"--model {name}: eva02 bench times patch-14 models only (this one has patch {cfg.patch_size})"
                + (f"; time {twin} instead" if twin else "")
            )
        variant = next(v for v, c in VARIANTS.items() if c.replace(img_size=cfg.img_size) == cfg.replace(num_classes=0))
        out.append(f"{variant}-{cfg.img_size}")
    return list(dict.fromkeys(out))  # each size once


def add_sizes(names: list[str], harness: ModuleType) -> None:
    """Add the sizes of `names` the harness does not list (`small-224`), with the batch of the variant's own size."""
    for name in names:
        if name not in harness.SIZES:
            variant, img_size = name.rsplit("-", 1)
            batch = next(s.batch for s in harness.SIZES.values() if s.variant == variant)
            harness.SIZES[name] = harness.BenchSize(variant, int(img_size), batch)


def check_harness() -> Path:
    """The folder holding the harness package; a one-line error outside a source checkout."""
    if not (HARNESS_DIR / "eva02_bench" / "__init__.py").is_file():
        raise CliError(
            "it runs from a source checkout only (its harness, benchmarks/eva02_bench, builds timm's models and "
            "is not installed): clone the repository, `pip install -e '.[bench]'` and run `python "
            "benchmarks/compare.py` (or `eva02 bench`) there"
        )
    return HARNESS_DIR


def load_harness() -> ModuleType:
    """Import the harness (`benchmarks/eva02_bench`) from the checkout beside this package."""
    where = str(check_harness())
    if where not in sys.path:
        sys.path.append(where)  # last: its scripts' names never shadow an installed module
    import eva02_bench

    return eva02_bench


def run(args: argparse.Namespace) -> int:
    for dest, flag in (("rounds", "--rounds"), ("threads", "--threads")):
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise CliError(f"{flag} must be 1 or more, got {value}")
    if args.warmup < 0:
        raise CliError(f"--warmup must be 0 or more, got {args.warmup}")
    models = size_names(args.models)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CliError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    elif args.dtype == "fp16":
        raise CliError("--dtype fp16 needs --device cuda; on CPU use --dtype fp32 or bf16")
    check_harness()
    if "timm" in args.impls and importlib.util.find_spec("timm") is None:  # looked for, not imported: the harness does
        what = "eva02 bench (it times timm's implementation beside ours; --impls ours skips it)"
        raise MissingExtra(f"{what} needs timm: {install_hint('bench')}", name="timm")
    if args.floor and "timm" not in args.impls:
        raise CliError("--floor states its ceiling against timm: keep timm in --impls")
    if args.out:
        check_output(args.out, force=args.force, flag="--out")
    bench = load_harness()
    add_sizes(models, bench)
    extra = [args.mmp_site] if args.mmp_site else []
    try:
        report = bench.run_benchmark(
            models, args.impls, args.rounds, args.warmup, args.compile, args.train, args.memory,
            args.grad_ckpt, args.device, args.dtype, args.threads, extra,
            log=lambda s: print(s, file=sys.stderr, flush=True), batch=args.batch, floor=args.floor,
        )  # fmt: skip
    except ImportError as e:
        raise CliError(str(e)) from e
    m = report["machine"]
    print(f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}, {args.dtype}")
    print(f"matmul peak: {report['matmul_gflop_s']:.1f} GFLOP/s")
    print(bench.format_table(report))
    if args.out:
        write_json(report, Path(args.out))
        print(f"report written to {args.out}")
    return 0


def write_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (`eva02.fileio.atomic_write_text`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1))
