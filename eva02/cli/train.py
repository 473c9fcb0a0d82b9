"""`eva02 train`, `eva02 test` and `eva02 plot`: fine-tuning, evaluation and training curves.

The same commands as `python tools/train.py CONFIG` / `python tools/test.py CONFIG CKPT`, and under
`torchrun --nproc_per_node N` (one process per device).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eva02.cli import CliError
from eva02.fileio import atomic_write_text, check_output, describe_os_error


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
        "--amp", nargs="?", const="bf16", choices=("bf16", "fp16", "none"), help="mixed precision (default bf16)"
    )


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune / train from a config (also under torchrun)")
    _common(p)
    p.add_argument(
        "--resume", nargs="?", const="auto", help="'auto' (default when given alone): the work dir's last checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start a new run in a work dir that holds one, deleting its files"
    )
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("test", help="evaluate a checkpoint: top-1 / top-5 (per class with --per-class)")
    _common(p)
    p.add_argument("checkpoint", help="training checkpoint (.pt), our .safetensors, or official/timm/mmpretrain file")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--per-class", action="store_true", help="also report per-class top-1")
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch per device")
    p.add_argument(
        "-o", "--out", help="JSON results file (default: test_<checkpoint>.json in the checkpoint's run folder)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing results file")
    p.set_defaults(func=run_test)

    p = sub.add_parser("plot", help="PNG curves (loss, lr, top-1) of a training work dir")
    p.add_argument("work_dir")
    p.add_argument("--out", help="folder for the PNGs (default: the work dir)")
    p.set_defaults(func=run_plot)


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
    import torch

    from eva02.engine.dist import init_distributed
    from eva02.engine.evaluate import format_table
    from eva02.engine.evaluate import run_test as evaluate

    cfg, _, _ = _resolve(args)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist; give a .pt or .safetensors file")
    out = results_path(args)
    if init_distributed().is_main:  # checked before the evaluation, not after it
        check_output(out, inputs=[args.checkpoint], force=args.force)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    metrics, classes = evaluate(cfg, args.checkpoint, args.use_ema or None, amp, args.batch_size)
    if not init_distributed().is_main:
        return 0
    print(format_table(metrics, classes, args.per_class))
    if not args.per_class:
        metrics = {k: v for k, v in metrics.items() if k != "per_class"}
    else:
        metrics["per_class"] = dict(zip(classes, metrics["per_class"], strict=True))
    atomic_write_text(out, json.dumps({"checkpoint": str(args.checkpoint), **metrics}, indent=2) + "\n")
    print(f"results: {out}")
    return 0


def run_plot(args) -> int:
    from eva02.engine.plot import plot_run

    for p in plot_run(args.work_dir, args.out):
        print(p)
    return 0
