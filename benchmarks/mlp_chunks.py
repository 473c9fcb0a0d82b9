"""CPU inference: SwiGLU's w12 product in column chunks (`fast.Workspace.gated`) against one product.

Each released size's MLP (random weights, fp32) runs on (1, rows, D) tokens through the inference form
with a workspace, once as one w12 product and once in chunks, in alternating rounds; the median of the
rounds' times is reported with the ratio (one product / chunks). Sizes whose w12 is below
`fast.CHUNKED_W12_BYTES` (tiny) are timed too, with chunks forced, to show why they are left out
(with 2 threads or more one chunk covers tiny's 512 hidden columns: its rows then time the same code
twice, which shows the noise of the run).

    python benchmarks/mlp_chunks.py --threads 2 --rounds 11
"""

from __future__ import annotations

import argparse
import statistics

import torch
from profile_model import interleaved

from eva02.model import VARIANTS, fast
from eva02.model.layers import SwiGLU

# rows: tokens per call (one or more images), as the sizes run at 224, 336 and 448 px
ROWS = {"tiny": (257, 577), "small": (257, 577, 2308), "base": (197, 257, 788, 2050), "large": (257, 577, 1025)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sizes", nargs="+", default=list(ROWS), choices=list(ROWS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    per_thread = fast.GATE_COLUMNS_PER_THREAD
    print(f"threads {a.threads}, {a.rounds} rounds of {a.iters} calls; chunks of {per_thread} columns per thread")
    print(f"{'size':6s} {'rows':>5s} {'one product ms':>15s} {'chunks ms':>10s} {'ratio':>6s}  chunked by default")
    for size in a.sizes:
        cfg = VARIANTS[size]
        mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, cfg.sub_ln, 1e-6).eval()
        default = fast.Workspace().chunks(mlp.w12)
        for rows in ROWS[size]:
            x = torch.randn(1, rows, cfg.dim)
            whole = fast.Workspace(rows * 2 * cfg.mlp_hidden, gate_columns=1 << 30)
            chunked = fast.Workspace(rows * 2 * cfg.mlp_hidden, chunked_bytes=0)
            forms = {"whole": fast.Inference(ws=whole), "chunks": fast.Inference(ws=chunked)}
            with torch.inference_mode():
                torch.testing.assert_close(forms["chunks"].mlp(mlp, x), forms["whole"].mlp(mlp, x))
                calls = {k: (lambda form=form, mlp=mlp, x=x: form.mlp(mlp, x)) for k, form in forms.items()}
                times = interleaved(calls, a.rounds, a.iters)
            w, c = (statistics.median(times[k]) * 1e3 for k in forms)
            note = "" if chunked.chunks(mlp.w12) else "  (one chunk covers w12: same code twice, a noise control)"
            print(f"{size:6s} {rows:5d} {w:15.2f} {c:10.2f} {w / c:5.2f}x  {'yes' if default else 'no'}{note}")


if __name__ == "__main__":
    main()
