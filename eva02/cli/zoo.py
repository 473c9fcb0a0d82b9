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
    from eva02.model.config import Eva02Config, TextConfig
    from eva02.weights.zoo import ClipEntry, ZooEntry

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


def _mlp_params(D: int, H: int, cfg: Eva02Config) -> int:
    if cfg.mlp == "gelu":
        return D * H + H + H * D + D  # fc_in, fc_out
    return D * 2 * H + 2 * H + H * D + D + (2 * H if cfg.sub_ln else 0)  # w12, w3, sub-LN


def arch_params(cfg: Eva02Config) -> int:
    """Parameters of `Eva02(cfg)` by formula (what `eva02.flops.count_params` counts on the module)."""
    D, H, p = cfg.dim, cfg.mlp_hidden, cfg.patch_size
    block = 4 * D + 3 * D * D + 2 * D + D * D + D  # norm1, norm2; qkv weight, q and v bias; proj
    block += (2 * D if cfg.attn_norm else 0) + _mlp_params(D, H, cfg)  # the CLIP inner norm; the MLP
    stem = cfg.in_chans * p * p * D + D + D + (1 + cfg.grid**2) * D  # patch embedding, cls, pos_embed
    head = 2 * D + (D * cfg.num_classes + cfg.num_classes)  # final norm or fc_norm; classifier/projection
    return stem + cfg.depth * block + head


def arch_macs(cfg: Eva02Config) -> int:
    """Multiply-adds of one image at `cfg.img_size` by formula (what `eva02.flops.count_flops` counts)."""
    D, H, N = cfg.dim, cfg.mlp_hidden, cfg.grid**2
    T = 1 + N  # tokens, cls included
    block = 2 * 5 * T * D + T * D * 3 * D + 2 * T * T * D + T * D * D  # norms; qkv; q k^T and attn v; proj
    block += 5 * T * D if cfg.attn_norm else 0  # the CLIP towers' inner attention norm
    if cfg.mlp == "gelu":
        block += 2 * T * D * H  # fc_in, fc_out
    else:
        block += T * D * 2 * H + T * H * D + (5 * T * H if cfg.sub_ln else 0)  # w12, w3, sub-LN
    stem = N * D * cfg.in_chans * cfg.patch_size**2  # the patch convolution
    if cfg.pool == "token":  # per-token final norm, then the class token's projection
        head = 5 * T * D + D * cfg.num_classes
    else:  # fc_norm + head, or the headless final norm
        head = 5 * D + D * cfg.num_classes if cfg.num_classes else 5 * T * D
    return stem + cfg.depth * block + head


def text_params(cfg: TextConfig, embed_dim: int) -> int:
    """Parameters of the CLIP text tower by formula (what `eva02.flops.count_clip` counts)."""
    W, H = cfg.width, cfg.mlp_hidden
    block = 4 * W + 3 * W * W + 3 * W + W * W + W + W * H + H + H * W + W  # norms; qkv; proj; MLP
    return cfg.vocab_size * W + cfg.context_length * W + cfg.layers * block + 2 * W + W * embed_dim


def text_macs(cfg: TextConfig, embed_dim: int) -> int:
    """Multiply-adds of the text tower on one text of full context length (attention counted in full)."""
    W, H, T = cfg.width, cfg.mlp_hidden, cfg.context_length
    block = 2 * 5 * T * W + T * W * 3 * W + 2 * T * T * W + T * W * W + 2 * T * W * H
    return cfg.layers * block + 5 * T * W + W * embed_dim


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


def matching_clip(pattern: str | None) -> list[ClipEntry]:
    """The EVA-02-CLIP entries that `pattern` selects, as `matching` does for the classifiers."""
    from eva02.weights.zoo import CLIP_ZOO

    if not pattern:
        return list(CLIP_ZOO.values())
    pat = pattern.strip().lower()
    glob = any(c in pat for c in "*?[")
    return [
        e
        for e in CLIP_ZOO.values()
        if any((fnmatch.fnmatchcase(s.lower(), pat) if glob else pat in s.lower()) for s in (e.name, *e.aliases))
    ]


def clip_row(e: ClipEntry) -> dict[str, Any]:
    """One EVA-02-CLIP model's summary: per-tower parameters and MACs, the reported zero-shot top-1."""
    cfg = e.cfg
    image, text = arch_params(cfg.vision), text_params(cfg.text, cfg.embed_dim)
    return {
        "name": e.name,
        "task": e.task,
        "params": image + text + 1,  # + logit_scale
        "image_params": image,
        "text_params": text,
        "flops": arch_macs(cfg.vision),
        "text_flops": text_macs(cfg.text, cfg.embed_dim),
        "img_size": cfg.vision.img_size,
        "zero_shot_top1": e.zero_shot_top1,
    }


def _print_table(head: tuple[str, ...], table: list[tuple[str, ...]], left: int) -> None:
    table = [head, *table]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row[:left], widths[:left], strict=True)]
        cells += [c.rjust(w) for c, w in zip(row[left:], widths[left:], strict=True)]
        print("  ".join(cells).rstrip())


def _list(args: argparse.Namespace) -> int:
    entries, clips = matching(args.pattern), matching_clip(args.pattern)
    if not entries and not clips:
        print(f"no model name contains or matches '{args.pattern}'; `eva02 list` shows them all", file=sys.stderr)
        return 1
    rows = [list_row(e) for e in entries]
    clip_rows = [clip_row(e) for e in clips]
    if args.json:
        print(json.dumps(rows + clip_rows, indent=2))
        return 0
    if not rows:  # CLIP models alone: their table, without the title that separates it from the classifiers'
        _print_clip_table(clip_rows, after=False)
        print("FLOPs are multiply-adds (MACs), the text tower's on one 77-token text; see docs/clip.md.")
        return 0
    head = ("name", "task", "params (M)", "FLOPs (G)", "input", "top-1", "top-5")
    table = [
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
    _print_table(head, table, left=2)
    print("FLOPs are multiply-adds (MACs), as the page's Flops column; see docs/zoo.md.")
    if clip_rows:
        print()
        _print_clip_table(clip_rows, after=True)
    return 0


def _print_clip_table(rows: list[dict[str, Any]], after: bool) -> None:
    if after:
        print("EVA-02-CLIP (zero-shot ImageNet-1k top-1 as reported; FLOPs of the text tower on one 77-token text):")
    head = ("name", "image params (M)", "text params (M)", "image FLOPs (G)", "text FLOPs (G)", "input", "zero-shot")
    table = [
        (
            r["name"],
            f"{r['image_params'] / 1e6:.2f}",
            f"{r['text_params'] / 1e6:.2f}",
            f"{r['flops'] / 1e9:.2f}",
            f"{r['text_flops'] / 1e9:.2f}",
            str(r["img_size"]),
            _fmt(r["zero_shot_top1"], 1),
        )
        for r in rows
    ]
    _print_table(head, table, left=1)


def _info(args: argparse.Namespace) -> int:
    name = model_arg(args)
    if name is None:
        raise CliError("which model? give -m/--model NAME (`eva02 list` shows the names)")
    from eva02.weights.zoo import find_clip

    clip = find_clip(name)
    if clip is not None:
        return _info_clip(clip, args)
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


def clip_info(e: ClipEntry) -> dict[str, Any]:
    """Everything known about an EVA-02-CLIP entry, as JSON-ready data (counts from `eva02.flops.count_clip`)."""
    from eva02.flops import count_clip
    from eva02.weights.download import verification

    counts = count_clip(e.cfg)
    return {
        "name": e.name,
        "task": e.task,
        "aliases": list(e.aliases),
        "pretrain_data": e.pretrain_data,
        "config": e.cfg.to_dict(),
        **counts,
        "img_size": e.cfg.vision.img_size,
        "preprocess": asdict(e.preprocess),
        "sources": [{**asdict(s), "verified_by": verification(s)} for s in e.sources],
        "zero_shot_top1": e.zero_shot_top1,
        "notes": e.notes,
    }


def _info_clip(e: ClipEntry, args: argparse.Namespace) -> int:
    if args.img_size is not None:
        raise CliError(
            f"--img-size applies to the classifiers; {e.name} is counted at its own {e.cfg.vision.img_size} px"
        )
    info = clip_info(e)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    v, t, p = info["config"]["vision"], info["config"]["text"], info["preprocess"]
    layout = ", ".join(
        f for f, on in (("inner attention norm", v["attn_norm"]), ("sub-LN", v["sub_ln"]),
                        ("post-norm", v["post_norm"]), ("RoPE", v["rope"])) if on
    )  # fmt: skip
    lines = [
        f"{info['name']}  (EVA-02-CLIP, trained on {info['pretrain_data']})",
        f"  aliases:     {', '.join(info['aliases'])}",
        f"  image tower: dim {v['dim']}, depth {v['depth']}, heads {v['heads']}, {v['mlp']} mlp {v['mlp_hidden']}, "
        f"patch {v['patch_size']}, img {v['img_size']}; {layout}",
        f"  text tower:  width {t['width']}, layers {t['layers']}, heads {t['heads']}, context {t['context_length']}",
        f"  joint space: {info['config']['embed_dim']}",
        f"  params:      {info['params']:,} (image {info['image_params']:,}, text {info['text_params']:,})",
        f"  MACs:        image {info['image_macs']:,} at {info['img_size']} px ({info['image_macs'] / 1e9:.2f} G); "
        f"text {info['text_macs']:,} per 77-token text ({info['text_macs'] / 1e9:.2f} G)",
        f"  zero-shot:   ImageNet-1k top-1 {_fmt(info['zero_shot_top1'], 1)} (reported, 80 prompt templates)",
        f"  preprocess:  {p['img_size']} px, crop_pct {p['crop_pct']}, {p['crop_mode']}, {p['interpolation']}",
        "  sources:",
    ]
    for s in info["sources"]:
        lines += [f"    [{s['kind']}] {s['url']}", f"        verified by: {s['verified_by']}"]
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
