"""Profile our Eva02 against timm's Eva on CPU (fp32) with identical weights.

timm is the reference here and is imported only by this script, never by the library. Both models get
the same random weights (timm's, converted with `eva02.weights.convert.to_ours`), run on the same
threads in the same process, and are timed in interleaved rounds so that machine noise hits both
alike; the reported numbers are medians over rounds.

    python benchmarks/profile_model.py speed --size tiny --img 336 --batch 8
    python benchmarks/profile_model.py speed --size base --img 448 --batch 2 --compile
    python benchmarks/profile_model.py train --size tiny --img 336 --batch 8
    python benchmarks/profile_model.py memory --size base --img 448 --batch 2
    python benchmarks/profile_model.py ops --size tiny --img 336 --batch 8

Memory is measured as live tensor bytes from torch.profiler's memory events (every CPU allocation and
free made by torch, in order); the peak of their running sum is the most memory the step held on top
of what existed before it. This is independent of the C allocator's caching, which makes peak RSS a
poor measure on CPU. `--rss` additionally reports each model's peak RSS from a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from eva02.model.config import VARIANTS
from eva02.model.vit import Eva02
from eva02.weights.convert import to_ours


def build_pair(size: str, img: int, classes: int = 1000, depth: int | None = None) -> tuple[torch.nn.Module, Eva02]:
    """timm's Eva and our Eva02 with the same random weights, both in eval mode."""
    import timm  # reference only

    kw = {} if depth is None else {"depth": depth}
    torch.manual_seed(0)
    tm = timm.create_model(f"eva02_{size}_patch14_224", pretrained=False, num_classes=classes, img_size=img, **kw)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = VARIANTS[size].replace(img_size=img, num_classes=classes, **kw)
    ours = Eva02(cfg)
    ours.load_state_dict(to_ours(tm.state_dict(), "timm", cfg), strict=True)
    return tm.eval(), ours.eval()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds (order rotated each round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def report(med: dict[str, float], batch: int, ref: str = "timm") -> None:
    for name, sec in med.items():
        print(f"  {name:14s} {batch / sec:8.2f} img/s  {sec * 1e3:8.1f} ms   x{med[ref] / sec:.3f} vs {ref}")


def cmd_speed(a: argparse.Namespace) -> None:
    tm, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tm(x), atol=1e-4, rtol=0)
    fns: dict[str, Callable[[], object]] = {}
    mode = torch.inference_mode if a.inference_mode else torch.no_grad

    def wrap(m: Callable) -> Callable[[], object]:
        def run() -> object:
            with mode():
                return m(x)

        return run

    fns["timm"] = wrap(tm)
    fns["ours"] = wrap(ours)
    if a.compile:
        c_ours = torch.compile(ours)
        c_tm = torch.compile(tm)
        for f in (c_ours, c_tm):  # compile outside the timed rounds
            for _ in range(2):
                wrap(f)()
        fns["ours+compile"] = wrap(c_ours)
        fns["timm+compile"] = wrap(c_tm)
    for f in fns.values():
        f()
    med = interleaved(fns, a.rounds, a.iters)
    print(f"inference {a.size}-{a.img} batch {a.batch}, {torch.get_num_threads()} threads, median of {a.rounds}")
    report(med, a.batch)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> object:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def cmd_train(a: argparse.Namespace) -> None:
    tm, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    y = torch.randint(0, 1000, (a.batch,))
    fns = {"timm": train_step_fn(tm, x, y), "ours": train_step_fn(ours, x, y)}
    for f in fns.values():
        f()
    med = interleaved(fns, a.rounds, a.iters)
    print(f"train step {a.size}-{a.img} batch {a.batch}, {torch.get_num_threads()} threads, median of {a.rounds}")
    report(med, a.batch)


def live_peak(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, end) live tensor bytes allocated by fn beyond those existing before it, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
    live = peak = 0
    for _, b in sorted(events, key=lambda t: t[0]):
        live += b
        peak = max(peak, live)
    return peak, live


def cmd_memory(a: argparse.Namespace) -> None:
    tm, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    y = torch.randint(0, 1000, (a.batch,))
    mb = 2**20
    print(f"memory {a.size}-{a.img} batch {a.batch} (MiB of live tensors beyond the model)")
    for name, m in (("timm", tm), ("ours", ours)):
        for ckpt in (False, True):
            m.set_grad_checkpointing(ckpt)
            step = train_step_fn(m, x, y)
            step()  # optimizer state exists from here on

            def fwd(m: torch.nn.Module = m) -> object:
                return torch.nn.functional.cross_entropy(m(x), y)

            fwd_peak, saved = live_peak(fwd)  # `saved`: what the forward left alive for backward
            step_peak, _ = live_peak(step)
            print(
                f"  {name:5s} ckpt={int(ckpt)}  activations {saved / mb:8.1f}  forward peak {fwd_peak / mb:8.1f}"
                f"  train-step peak {step_peak / mb:8.1f}"
            )
            m.set_grad_checkpointing(False)
    if a.rss:
        for name in ("timm", "ours"):
            for ckpt in (0, 1):
                code = (
                    "import resource,sys,torch;sys.path.insert(0,'benchmarks');import profile_model as p;"
                    f"tm,o=p.build_pair({a.size!r},{a.img},depth={a.depth});m={'tm' if name == 'timm' else 'o'};"
                    f"m.set_grad_checkpointing({bool(ckpt)});del tm,o;"
                    f"x=torch.randn({a.batch},3,{a.img},{a.img});y=torch.randint(0,1000,({a.batch},));"
                    "s=p.train_step_fn(m,x,y);[s() for _ in range(2)];"
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
                )
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                print(
                    f"  {name:5s} ckpt={ckpt}  peak RSS {int(out.stdout.split()[-1]) / 1024:8.1f} MiB (fresh process)"
                )


def cmd_ops(a: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    tm, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    y = torch.randint(0, 1000, (a.batch,))
    for name, m in (("timm", tm), ("ours", ours)):
        if a.train:
            fn = train_step_fn(m, x, y)
        else:

            def fn(m: torch.nn.Module = m) -> object:
                with torch.no_grad():
                    return m(x)

        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.iters):
                fn()
        print(f"===== {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


def cmd_explain(a: argparse.Namespace) -> None:
    _, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    with torch.no_grad():
        ex = torch._dynamo.explain(ours)(x)
    print(json.dumps({"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count}))
    for r in ex.break_reasons:
        print(" ", r.reason)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["speed", "train", "memory", "ops", "explain"])
    ap.add_argument("--size", default="tiny", choices=sorted(VARIANTS))
    ap.add_argument("--img", type=int, default=336)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks for a quick look")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--train", action="store_true", help="ops: profile a training step")
    ap.add_argument("--inference-mode", action="store_true", help="speed: torch.inference_mode, not no_grad")
    ap.add_argument("--rss", action="store_true", help="memory: also peak RSS of fresh processes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"speed": cmd_speed, "train": cmd_train, "memory": cmd_memory, "ops": cmd_ops, "explain": cmd_explain}[a.cmd](a)


if __name__ == "__main__":
    main()
