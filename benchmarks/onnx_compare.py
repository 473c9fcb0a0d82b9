"""onnxruntime speed of our ONNX export against timm's, same weights, same session settings.

Ours is exported with `eva02.export.export_model` (what `eva02 export --format onnx` writes); timm's
model with `torch.onnx.export(dynamo=True)` at the same opset. Both run on onnxruntime's CPU provider
with the same thread count, timed in interleaved rounds (`eva02_bench.time_interleaved`), medians reported.

    python benchmarks/onnx_compare.py --sizes tiny-336 base-448 --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from eva02.export import OPSET, export_model

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # loaded by its path rather than run: the harness package sits beside this file
    sys.path.insert(0, HERE)
import eva02_bench as bench  # noqa: E402


def sessions(size: str, threads: int, folder: Path):
    """Exported ours and timm for one benchmark size: (onnxruntime sessions, input batch, max |diff|)."""
    import onnxruntime as ort

    spec = bench.get_size(size)
    cfg = spec.config()
    ours, theirs = bench.build_model("ours", cfg).eval(), bench.build_model("timm", cfg).eval()
    bench.load_timm_weights(ours, theirs)
    x = torch.randn(spec.batch, 3, spec.img_size, spec.img_size)
    export_model(ours, "onnx", folder / "ours.onnx", dynamic_batch=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(theirs, (x,), dynamo=True, opset_version=OPSET, verbose=False).save(str(folder / "timm.onnx"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = {
        name: ort.InferenceSession(str(folder / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        for name in ("ours", "timm")
    }
    xn = x.numpy()
    outs = [s.run(None, {s.get_inputs()[0].name: xn})[0] for s in sess.values()]
    return sess, xn, float(np.abs(outs[0] - outs[1]).max())


def compare(size: str, threads: int = 2, rounds: int = 5) -> dict:
    """img/s of both exports on onnxruntime and their ratio (ours / timm)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess, xn, diff = sessions(size, threads, Path(tmp))
        fns = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: xn})) for name, s in sess.items()}
        times = bench.time_interleaved(fns, rounds)  # the order rotates every round
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": len(xn),
        "max_abs_diff": diff,
        **{k: {"img_s": len(xn) / t, "latency_ms": 1000 * t} for k, t in med.items()},
        "x_timm": med["timm"] / med["ours"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["tiny-336", "base-448"], choices=list(bench.SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, opset {OPSET}, {a.threads} threads, {bench.cpu_model()}")
    print("| size | batch | ours img/s | timm img/s | ours x timm | max abs diff |")
    print("|---|---|---|---|---|---|")
    for size in a.sizes:
        r = compare(size, a.threads, a.rounds)
        print(f"| {size} | {r['batch']} | {r['ours']['img_s']:.2f} | {r['timm']['img_s']:.2f} | {r['x_timm']:.2f} "
              f"| {r['max_abs_diff']:.1e} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
