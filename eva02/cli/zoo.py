"""`eva02 list` and `eva02 info`: the model zoo, with parameter and multiply-add counts."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from eva02.cli import CliError
from eva02.flops import count_flops, count_params, mmpretrain_macs, mmpretrain_params
from eva02.weights.download import verification
from eva02.weights.zoo import ZooEntry, list_models, resolve


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def list_row(e: ZooEntry) -> dict[str, Any]:
    """One model's summary: our parameter and MAC counts and the page's accuracy."""
    return {
        "name": e.name,
        "task": e.task,
        "params": count_params(e.cfg),
        "flops": count_flops(e.cfg),
        "img_size": e.cfg.img_size,
        "top1": e.top1,
        "top5": e.top5,
    }


def entry_info(e: ZooEntry, img_size: int | None = None) -> dict[str, Any]:
    """Everything known about a zoo entry, as JSON-ready data; MACs at `img_size` (default: native)."""
    size = img_size or e.cfg.img_size
    return {
        "name": e.name,
        "task": e.task,
        "aliases": list(e.aliases),
        "pretrain_data": e.pretrain_data,
        "config": e.cfg.to_dict(),
        "params": count_params(e.cfg),
        "params_mmpretrain": mmpretrain_params(e.cfg),
        "img_size": size,
        "flops": count_flops(e.cfg, size),
        "flops_mmpretrain": mmpretrain_macs(e.cfg, size),
        "preprocess": asdict(e.preprocess),
        "sources": [{**asdict(s), "verified_by": verification(s)} for s in e.sources],
        "weights_patch_size": e.weights_patch_size,
        "official_ema": e.official_ema,
        "page": {"params_m": e.page_params_m, "flops_g": e.page_flops_g, "top1": e.top1, "top5": e.top5},
        "notes": e.notes,
        "extra": dict(e.extra),
    }


def _list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        print(
            f"no model name matches {args.pattern!r}; run `eva02 list` without a pattern for all names", file=sys.stderr
        )
        return 1
    rows = [list_row(resolve(n)) for n in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("name", "task", "params (M)", "FLOPs (G)", "input", "top-1", "top-5")
    table = [head] + [
        (
            r["name"],
            r["task"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['flops'] / 1e9:.2f}",
            str(r["img_size"]),
            _fmt(r["top1"]),
            _fmt(r["top5"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        print("  ".join(cells).rstrip())
    print("FLOPs are multiply-adds (MACs), as the page's Flops column; see docs/zoo.md.")
    return 0


def _info(args: argparse.Namespace) -> int:
    entry = resolve(args.name)
    ps = entry.cfg.patch_size
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % ps):
        raise CliError(f"--img-size {args.img_size} must be a positive multiple of {entry.name}'s patch size {ps}")
    info = entry_info(entry, args.img_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c, p, page = info["config"], info["preprocess"], info["page"]
    lines = [
        f"{info['name']}  ({info['task']}, pre-trained on {info['pretrain_data']})",
        f"  aliases:     {', '.join(info['aliases']) or '-'}",
        f"  config:      dim {c['dim']}, depth {c['depth']}, heads {c['heads']}, mlp {c['mlp_hidden']}, "
        f"sub-LN {c['sub_ln']}, patch {c['patch_size']}, img {c['img_size']}, classes {c['num_classes']}",
        f"  params:      {info['params']:,} (official/timm); mmpretrain counts {info['params_mmpretrain']:,}",
        f"  MACs:        {info['flops']:,} at {info['img_size']} px ({info['flops'] / 1e9:.2f} G); "
        f"mmpretrain's convention {info['flops_mmpretrain']:,}",
        f"  page:        params {_fmt(page['params_m'])} M, flops {_fmt(page['flops_g'])} G, "
        f"top-1 {_fmt(page['top1'])}, top-5 {_fmt(page['top5'])}",
        f"  preprocess:  {p['img_size']} px, crop_pct {p['crop_pct']}, {p['crop_mode']}, {p['interpolation']}, "
        f"mean {p['mean']}, std {p['std']}",
    ]
    if info["weights_patch_size"]:
        lines.append(f"  weights:     patch {info['weights_patch_size']} checkpoints, resampled at load")
    lines.append("  sources:")
    for s in info["sources"]:
        lines.append(f"    [{s['kind']}] {s['url']}")
        lines.append(f"        verified by: {s['verified_by']}")
    if info["notes"]:
        lines.append(f"  notes:       {info['notes']}")
    print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `list` and `info` subcommands."""
    p = subparsers.add_parser("list", help="list the model zoo (names of the reference page)")
    p.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'eva02-large*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_list)

    p = subparsers.add_parser("info", help="details of one zoo model: config, counts, preprocessing, sources")
    p.add_argument("name", help="a zoo name, timm name or mmpretrain metafile name (case-insensitive)")
    p.add_argument("--img-size", type=int, default=None, help="count MACs at this input size (default: native)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_info)
