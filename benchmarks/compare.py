"""Side-by-side speed and memory of eva02, timm and mmpretrain; writes JSON results and a PNG plot.

Every size is measured in one process with interleaved rounds (see eva02_bench/, beside this script). Defaults are the
published CPU run of BENCHMARKS.md:

    python benchmarks/compare.py --threads 2 --rounds 7

On a GPU (bf16, torch.compile for ours and timm, no mmpretrain):

    python benchmarks/compare.py --device cuda --dtype bf16 --compile-sizes all --tag gpu

mmpretrain is optional: it is looked for in --mmp-site (default: .mmp_site beside this folder, an
install made with `pip install --no-deps --target .mmp_site mmpretrain mmengine mmcv-lite ...`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import eva02_bench as bench
import torch

from eva02.cli.bench import write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = ("tiny-336", "small-336", "base-448", "large-448")
COLORS = {"ours": "#1f77b4", "ours+compile": "#aec7e8", "timm": "#ff7f0e", "timm+compile": "#ffbb78",
          "mmpretrain": "#2ca02c"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), choices=list(bench.SIZES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="one batch size for every size (default: per size)")
    p.add_argument(
        "--compile-sizes",
        nargs="*",
        default=["tiny-336", "base-448"],
        help="sizes also timed under torch.compile ('all' for every size)",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training-step timings")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument(
        "--ckpt-sizes",
        nargs="*",
        default=["base-448"],
        help="sizes whose memory is also measured with gradient checkpointing",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(bench.DTYPES))
    p.add_argument("--mmp-site", default=str(ROOT / ".mmp_site"), metavar="DIR")
    p.add_argument("--no-mmpretrain", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), metavar="DIR")
    p.add_argument("--from-json", metavar="FILE", help="no measuring: re-derive ratios, table and plot from a report")
    p.add_argument("--tag", default="cpu", help="name of the result files: <tag>.json, <tag>_img_s.png")
    return p.parse_args(argv)  # fmt: skip


def mmpretrain_available(site: str) -> bool:
    """Whether mmpretrain imports with `site` on the path (tried in this process)."""
    if site and os.path.isdir(site) and site not in sys.path:
        sys.path.insert(0, site)
    if importlib.util.find_spec("mmpretrain") is None:
        return False
    try:
        bench.build_mmpretrain(bench.SIZES["test-56"].config())
    except Exception as e:  # any import-time failure of its stack means: leave it out, say why
        print(f"mmpretrain left out: {e}", file=sys.stderr)
        return False
    return True


def run(args: argparse.Namespace, save: Path | None = None) -> dict:
    """Measure every size; one merged report, also written to `save` after each size (a long run that is
    cut short keeps what it measured)."""
    impls = ["ours", "timm"]
    if not args.no_mmpretrain and args.device == "cpu" and mmpretrain_available(args.mmp_site):
        impls.append("mmpretrain")
    compile_sizes = set(bench.SIZES) if "all" in args.compile_sizes else set(args.compile_sizes)
    report: dict = {}
    for name in args.sizes:
        part = bench.run_benchmark(
            [name], impls, args.rounds, args.warmup, compile=name in compile_sizes, train=not args.no_train,
            memory=not args.no_memory, grad_ckpt=name in args.ckpt_sizes, device=args.device, dtype=args.dtype,
            threads=args.threads, extra_path=[args.mmp_site] if "mmpretrain" in impls else [],
            log=lambda s: print(s, file=sys.stderr, flush=True), batch=args.batch,
        )  # fmt: skip
        if not report:
            report = part
        else:
            report["results"].update(part["results"])
        report.setdefault("matmul_gflop_s_per_size", {})[name] = part["matmul_gflop_s"]
        rederive(report)
        report["settings"]["compile_sizes"] = sorted(compile_sizes & set(args.sizes))
        report["settings"]["impls"] = impls
        if save:
            write_json(report, save)
    return report


def rederive(report: dict) -> None:
    """Ratios and peak fractions against the best matmul rate of the whole run (the least disturbed one)."""
    peak = max([report["matmul_gflop_s"], *report.get("matmul_gflop_s_per_size", {}).values()])
    report["matmul_gflop_s"] = peak
    for res in report["results"].values():
        bench.add_derived(res, peak * 1e9)


def plot(report: dict, path: Path) -> None:
    """Grouped bars: img/s per size for each implementation, inference and training side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["results"])
    modes = [m for m in ("infer", "train") if any(m in r for r in report["results"].values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        names = [n for n in COLORS if any(n in r.get(mode, {}) for r in report["results"].values())]
        width = 0.8 / len(names)
        for k, n in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(sizes))]
            ys = [report["results"][s].get(mode, {}).get(n, {}).get("img_s", 0.0) for s in sizes]
            bars = ax.bar(xs, ys, width, label=n, color=COLORS[n])
            ax.bar_label(bars, labels=[f"{y:.3g}" if y else "" for y in ys], fontsize=7, rotation=90, padding=2)
        batches = [report["results"][s]["batch"] for s in sizes]
        ax.set_xticks(range(len(sizes)), [f"{s}\nbatch {b}" for s, b in zip(sizes, batches, strict=True)])
        ax.set_yscale("log")
        ax.set_ylabel("images / s (log scale)")
        title = "inference" if mode == "infer" else "training step (fwd + bwd + AdamW)"
        ax.set_title(f"{title}, {report['settings']['dtype']}")
        ax.legend(fontsize=8)
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['threads']} threads"
    fig.suptitle(f"EVA-02 img/s: {where}, torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        rederive(report)
        write_json(report, out / f"{args.tag}.json")
    else:
        report = run(args, save=out / f"{args.tag}.json")
    plot(report, out / f"{args.tag}_img_s.png")
    m = report["machine"]
    print(f"{m.get('gpu') or m['cpu']}, {m['threads']} threads, torch {m['torch']}, {report['settings']['dtype']}")
    print(f"matmul peak: {report['matmul_gflop_s']:.1f} GFLOP/s")
    print(bench.format_table(report))
    print(f"written: {out / (args.tag + '.json')}, {out / (args.tag + '_img_s.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
