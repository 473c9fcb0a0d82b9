"""`eva02 list` and `eva02 info`: the model zoo, with parameter and multiply-add counts.

`list` neither builds a model nor imports torch: its counts come from `arch_params` / `arch_macs`, the
closed forms of what `eva02.flops` counts on a shape-only model (a test keeps both equal for every
zoo entry). `info` shows the counter's own numbers, in both conventions.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from eva02.cli import CliError
from eva02.cli.options import add_model, model_arg, zoo_entry

if TYPE_CHECKING:
    from eva02.model.config import Eva02Config
    from eva02.weights.zoo import ZooEntry

_COUNTERS = ("count_params", "count_flops", "mmpretrain_params", "mmpretrain_macs")


def __getattr__(name: str) -> Any:
    # The counters of eva02.flops build models (torch): loaded on first use, by `info` only.
    if name in _COUNTERS:
        import eva02.flops

        value = getattr(eva02.flops, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _counter(name: str):
    return globals()[name] if name in globals() else __getattr__(name)


def arch_params(cfg: Eva02Config) -> int:
    """Parameters of `Eva02(cfg)` by formula (what `eva02.flops.count_params` counts on the module)."""
    D, H, p = cfg.dim, cfg.mlp_hidden, cfg.patch_size
    block = 4 * D + 3 * D * D + 2 * D + D * D + D  # norm1, norm2; qkv weight, q and v bias; proj
    block += D * 2 * H + 2 * H + H * D + D + (2 * H if cfg.sub_ln else 0)  # w12, w3, sub-LN
    stem = cfg.in_chans * p * p * D + D + D + (1 + cfg.grid**2) * D  # patch embedding, cls, pos_embed
    head = 2 * D + (D * cfg.num_classes + cfg.num_classes)  # final norm or fc_norm; classifier
    return stem + cfg.depth * block + head


def arch_macs(cfg: Eva02Config) -> int:
    """Multiply-adds of one image at `cfg.img_size` by formula (what `eva02.flops.count_flops` counts)."""
    D, H, N = cfg.dim, cfg.mlp_hidden, cfg.grid**2
    T = 1 + N  # tokens, cls included
    block = 2 * 5 * T * D + T * D * 3 * D + 2 * T * T * D + T * D * D  # norms; qkv; q k^T and attn v; proj
    block += T * D * 2 * H + T * H * D + (5 * T * H if cfg.sub_ln else 0)  # w12, w3, sub-LN
    stem = N * D * cfg.in_chans * cfg.patch_size**2  # the patch convolution
    head = 5 * D + D * cfg.num_classes if cfg.num_classes else 5 * T * D  # fc_norm + head, or final norm
    return stem + cfg.depth * block + head


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def list_row(e: ZooEntry) -> dict[str, Any]:
    """One model's summary: our parameter and MAC counts and the page's accuracy."""
    return {
        "name": e.name,
        "task": e.task,
        "params": arch_params(e.cfg),
        "flops": arch_macs(e.cfg),
        "img_size": e.cfg.img_size,
        "top1": e.top1,
        "top5": e.top5,
    }


def entry_info(e: ZooEntry, img_size: int | None = None) -> dict[str, Any]:
    """Everything known about a zoo entry, as JSON-ready data; MACs at `img_size` (default: native)."""
    from eva02.weights.download import verification

    count_params, count_flops = _counter("count_params"), _counter("count_flops")
    mmpretrain_params, mmpretrain_macs = _counter("mmpretrain_params"), _counter("mmpretrain_macs")
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


def matching(pattern: str | None) -> list[ZooEntry]:
    """Zoo entries whose name or an alias contains `pattern` (any case), or matches it as a shell-style
    pattern when it holds * ? or [ ('*large*p16*'); all entries without a pattern. Page order."""
    from eva02.weights.zoo import ZOO

    if not pattern:
        return list(ZOO.values())
    pat = pattern.strip().lower()
    glob = any(c in pat for c in "*?[")

    def hit(spelling: str) -> bool:
        s = spelling.lower()
        return fnmatch.fnmatchcase(s, pat) if glob else pat in s

    return [e for e in ZOO.values() if any(hit(s) for s in (e.name, *e.aliases))]


def _list(args: argparse.Namespace) -> int:
    entries = matching(args.pattern)
    if not entries:
        print(f"no model name contains or matches '{args.pattern}'; `eva02 list` shows them all", file=sys.stderr)
        return 1
    rows = [list_row(e) for e in entries]
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
    name = model_arg(args)
    if name is None:
        raise CliError("which model? give -m/--model NAME (`eva02 list` shows the names)")
    entry = zoo_entry(name)
    ps = entry.cfg.patch_size
    if args.img_size is not None and (args.img_size <= 0 or args.img_size % ps):
        near = max(ps, round(args.img_size / ps) * ps)
        raise CliError(f"--img-size {args.img_size} must be a multiple of {entry.name}'s patch size {ps}, e.g. {near}")
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
    p = subparsers.add_parser(
        "list",
        help="list the model zoo (names of the reference page)",
        description="The model zoo: names, task, parameters, multiply-adds at the input size, page accuracy.",
        epilog="examples: eva02 list tiny; eva02 list '*large*p16*' --json",
    )
    p.add_argument(
        "pattern",
        nargs="?",
        default=None,
        metavar="PATTERN",
        help="part of a name or alias (any case), or a shell-style pattern such as '*large*p16*'",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_list)

    p = subparsers.add_parser(
        "info",
        help="details of one zoo model: config, counts, preprocessing, sources",
        description="Everything known about one zoo model (`eva02 info NAME` works too).",
        epilog="example: eva02 info -m eva02-tiny-p14_in21k-pre_3rdparty_in1k --img-size 448",
    )
    add_model(p, "a zoo name, timm name or mmpretrain metafile name (any case)", positional=True)
    p.add_argument(
        "--img-size", type=int, default=None, metavar="N", help="count MACs at this input size (default: native)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_info)
