"""`eva02 train` and `eva02 test`: fine-tuning and evaluation.

The same commands as `python tools/train.py CONFIG` / `python tools/test.py CONFIG CKPT`, and under
`torchrun --nproc_per_node N` (one process per device). `--dtype` and `-b/--batch-size` are the words
every command uses; they set `train.amp` and `data.batch_size` (`--amp` still works).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eva02.cli import CliError
from eva02.cli.options import DTYPES, HIDDEN, add_batch_size, add_out, positive_int
from eva02.fileio import atomic_write_text, check_output, describe_os_error


class _DtypeAsAmp(argparse.Action):
    """--dtype fp32|bf16|fp16 into train.amp (none|bf16|fp16)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, "none" if value == "fp32" else value)


class _BatchAsOption(argparse.Action):
    """-b/--batch-size N as `--set data.batch_size=N`."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        namespace.options = [*getattr(namespace, "options", []), f"data.batch_size={value}"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config file (configs/eva02/*.py) or a saved config.json")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument(
        "--cfg-options",
        "--set",
        dest="options",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set optim.lr=1e-4 data.batch_size=32",
    )
    p.add_argument(
        "--dtype",
        dest="amp",
        choices=DTYPES,
        action=_DtypeAsAmp,
        help="precision: fp32, or bf16 / fp16 autocast (train.amp; default: the config's)",
    )
    p.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16", "none"), help=HIDDEN)  # older --dtype


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune / train from a config (also under torchrun)",
        epilog="example: eva02 train configs/eva02/eva02_tiny_p14_8xb16_in1k.py -b 32 --dtype bf16",
    )
    _common(p)
    p.add_argument(
        "-b",
        "--batch-size",
        type=positive_int,
        metavar="N",
        action=_BatchAsOption,
        help="batch per device (data.batch_size)",
    )
    p.add_argument(
        "--resume", nargs="?", const="auto", help="'auto' (default when given alone): the work dir's last checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start a new run in a work dir that holds one, deleting its files"
    )
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.set_defaults(func=run_train)

    p = sub.add_parser(
        "test",
        help="evaluate a checkpoint: top-1 / top-5 (per class with --per-class)",
        epilog="example: eva02 test configs/eva02/eva02_tiny_p14_8xb16_in1k.py work_dirs/x/final.safetensors",
    )
    _common(p)
    # Required, as in tools/test.py: argparse fills an optional positional at its first chance, so in
    # `CONFIG --set a=b CKPT` an optional CKPT would be left over.
    p.add_argument(
        "checkpoint",
        metavar="CKPT",
        help="training checkpoint (.pt), our .safetensors, or official/timm/mmpretrain file",
    )
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--per-class", action="store_true", help="also report per-class top-1")
    add_batch_size(p, 0, "evaluation batch per device (default: the config's)")
    add_out(
        p,
        "FILE",
        "JSON results file (default: test_<checkpoint>.json in the checkpoint's run folder)",
        "replace an existing results file",
    )
    p.set_defaults(func=run_test)


def _resolve(args) -> tuple:
    from eva02.engine.config import load_run, override, parse_options

    cfg, task = load_run(args.config)
    changes = parse_options(args.options)
    if args.amp:
        changes["train.amp"] = args.amp
    if getattr(args, "seed", None) is not None:
        changes["train.seed"] = str(args.seed)
    if getattr(args, "deterministic", False):
        changes["train.deterministic"] = "true"
    cfg = override(cfg, changes)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    return cfg, task, work_dir


def run_train(args) -> int:
    from eva02.engine.train import Trainer, TrainingError

    cfg, task, work_dir = _resolve(args)
    try:
        trainer = Trainer(cfg, work_dir, task, resume=args.resume, overwrite=args.overwrite)
        metrics = trainer.fit()
    except TrainingError as e:
        raise CliError(str(e)) from None
    except OSError as e:  # the work dir became unwritable or full outside a checkpoint write
        raise CliError(f"work dir {work_dir}: {describe_os_error(e)}{_at(e)}") from None
    if trainer.info.is_main:
        shown = {k: v for k, v in metrics.items() if k != "per_class"}
        print(json.dumps(shown))
        print(f"final weights: {work_dir / 'final.safetensors'}")
    return 0


def _at(e: OSError) -> str:
    return f" ({e.filename})" if e.filename else ""


def results_path(args) -> Path:
    """Where `eva02 test` writes: --out, else the --work-dir, else the checkpoint's run folder (the parent
    of its `checkpoints/` folder, or the folder holding it)."""
    if args.out:
        return Path(args.out)
    ck = Path(args.checkpoint).resolve()
    folder = Path(args.work_dir) if args.work_dir else ck.parent
    if not args.work_dir and folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"test_{ck.stem}.json"


def run_test(args) -> int:

    from eva02.dtypes import autocast_dtype
    from eva02.engine.dist import init_distributed
    from eva02.engine.evaluate import format_table
    from eva02.engine.testing import run_test as evaluate

    cfg, _, _ = _resolve(args)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist; give a .pt or .safetensors file")
    out = results_path(args)
    if init_distributed().is_main:  # checked before the evaluation, not after it
        check_output(out, inputs=[args.checkpoint], force=args.force)
    amp = autocast_dtype(cfg.train.amp)
    metrics, classes = evaluate(cfg, args.checkpoint, args.use_ema or None, amp, args.batch_size)
    if not init_distributed().is_main:
        return 0
    print(format_table(metrics, classes, args.per_class))
    if not args.per_class:
        metrics = {k: v for k, v in metrics.items() if k != "per_class"}
    elif "per_class" in metrics:  # (tasks without per-class figures, such as detection, have none)
        metrics["per_class"] = dict(zip(classes, metrics["per_class"], strict=True))
    atomic_write_text(out, json.dumps({"checkpoint": str(args.checkpoint), **metrics}, indent=2) + "\n")
    print(f"results: {out}")
    return 0
