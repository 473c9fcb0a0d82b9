"""PNG curves of a training run from its `metrics.jsonl`: loss, learning rate and validation top-1.

The output folder is checked once the metrics are read and before anything is drawn; each picture is
written through `eva02.fileio.atomic_write`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from eva02.engine.runlog import read_metrics
from eva02.extras import need
from eva02.fileio import atomic_write, check_writable_dir


def plot_run(work_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, lr.png and (when evaluated) top1.png; returns the paths written."""
    need("matplotlib", "plot", "eva02 plot").use("Agg")
    plt = need("matplotlib.pyplot", "plot", "eva02 plot")
    recs = read_metrics(work_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not train and not evals:
        raise ValueError(f"{work_dir}/metrics.jsonl has no train or eval records yet")
    out = check_writable_dir(out_dir or work_dir, "plot folder")
    curves = [("loss", train, ["loss"]), ("lr", train, ["lr"]), ("top1", evals, ["top1", "ema_top1"])]
    written = []
    for name, rows, keys in curves:
        series = [(k, [r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys]
        series = [s for s in series if s[1]]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, xs, ys in series:
            ax.plot(xs, ys, marker="o" if name == "top1" else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        try:
            path = atomic_write(out / f"{name}.png", functools.partial(fig.savefig, dpi=100, format="png"))
        finally:
            plt.close(fig)
        written.append(path)
    return written
