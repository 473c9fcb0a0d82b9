"""PNG curves of a training run from its `metrics.jsonl`: loss, learning rate and validation top-1."""

from __future__ import annotations

import os
from pathlib import Path

from eva02.engine.runlog import read_metrics


def plot_run(work_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, lr.png and (when evaluated) top1.png; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'eva02[plot]'") from e
    recs = read_metrics(work_dir)
    out = Path(out_dir or work_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not train and not evals:
        raise ValueError(f"{work_dir}/metrics.jsonl has no train or eval records yet")
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
        path = out / f"{name}.png"
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written
