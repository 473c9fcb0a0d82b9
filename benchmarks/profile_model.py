"""Profile our Eva02 against timm's Eva on CPU (fp32) with identical weights.

timm is the reference here and is imported only by this script, never by the library. Both models get
the same random weights (timm's, converted with `eva02.weights.convert.to_ours`), run on the same
threads in the same process, and are timed in interleaved rounds so that machine noise hits both
alike; the reported numbers are medians over rounds.

    python benchmarks/profile_model.py speed --size tiny --img 336 --batch 8
    python benchmarks/profile_model.py speed --size base --img 448 --batch 2 --compile
    python benchmarks/profile_model.py train --size tiny --img 336 --batch 8 [--bf16]
    python benchmarks/profile_model.py memory --size base --img 448 --batch 2
    python benchmarks/profile_model.py ops --size tiny --img 336 --batch 8

To compare two revisions of our code, time each from its own worktree with `benchmarks/compare.py`
(docs/performance.md): block code can no longer be swapped into today's model, whose blocks take their
fast form and window layout from the model call.

Activation memory is counted exactly: the distinct storages autograd saves for backward during one
training forward (parameters excluded), via `torch.autograd.graph.saved_tensors_hooks`; it does not
depend on the C allocator's caching. `--rss` adds, from a fresh process per model, the RSS before a training step
(after one warm-up step) and the step's peak RSS (VmHWM reset through /proc/self/clear_refs); RSS
includes pages the C allocator keeps cached, so it is an upper bound.
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


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each function in every round; the order rotates so no one always runs first."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / iters)
    return times


def report(times: dict[str, list[float]], batch: int, ref: str = "timm") -> None:
    """Median img/s, and the median over rounds of the per-round speed ratio to `ref` (robust to drifting load)."""
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(r / t for r, t in zip(times[ref], ts, strict=True))
        print(f"  {name:14s} {batch / med:8.2f} img/s  {med * 1e3:8.1f} ms   x{ratio:.3f} vs {ref} (median of ratios)")


def cmd_speed(a: argparse.Namespace) -> None:
    tm, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tm(x), atol=1e-4, rtol=0)
    if a.bf16:  # weights and input in bfloat16
        tm, ours, x = tm.bfloat16(), ours.bfloat16(), x.bfloat16()
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
        if a.freezing:  # inference-only: constant-fold the weights and prepack them for oneDNN linears
            torch._inductor.config.freezing = True
        c_ours = torch.compile(ours)
        c_tm = torch.compile(tm)
        for f in (c_ours, c_tm):  # compile outside the timed rounds
            for _ in range(2):
                wrap(f)()
        fns["ours+compile"] = wrap(c_ours)
        fns["timm+compile"] = wrap(c_tm)
    for f in fns.values():
        f()
    times = interleaved(fns, a.rounds, a.iters)
    print(f"inference {a.size}-{a.img} batch {a.batch}, {torch.get_num_threads()} threads, median of {a.rounds}")
    report(times, a.batch)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Callable[[], object]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
    fns = {"timm": train_step_fn(tm, x, y, a.bf16), "ours": train_step_fn(ours, x, y, a.bf16)}
    for f in fns.values():
        f()
    times = interleaved(fns, a.rounds, a.iters)
    amp = ", bf16 autocast" if a.bf16 else ""
    print(f"train step {a.size}-{a.img} batch {a.batch}{amp}, {torch.get_num_threads()} threads, median of {a.rounds}")
    report(times, a.batch)


def saved_bytes(model: torch.nn.Module, fn: Callable[[], object]) -> int:
    """Bytes of the distinct tensor storages kept for backward while fn runs, parameters excluded.

    Autograd's saved tensors are seen through `saved_tensors_hooks`. Under gradient checkpointing the
    checkpoint keeps each block's input itself (its own hooks hide the block's internals, which are
    recomputed), so block inputs are counted too when checkpointing is on. This is the activation memory
    of a training step, counted exactly and independent of the allocator.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def note(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    def note_input(_block: torch.nn.Module, args: tuple) -> None:
        note(args[0])

    ckpt = bool(getattr(model, "grad_checkpointing", False))
    hooks = [b.register_forward_pre_hook(note_input) for b in model.blocks] if ckpt else []
    try:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    del out
    return sum(seen.values())


RSS_CODE = """
import gc, sys, torch
sys.path.insert(0, "benchmarks")
import profile_model as p
def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
torch.set_num_threads({threads})
tm, ours = p.build_pair({size!r}, {img}, depth={depth})
m = {which}
del tm, ours
gc.collect()
m.set_grad_checkpointing({ckpt})
x, y = torch.randn({batch}, 3, {img}, {img}), torch.randint(0, 1000, ({batch},))
step = p.train_step_fn(m, x, y)
step()  # optimizer state exists from here on
base = kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
step()
print(base, kib("VmHWM:"))
"""


def cmd_memory(a: argparse.Namespace) -> None:
    tm, ours = build_pair(a.size, a.img, depth=a.depth)
    x = torch.randn(a.batch, 3, a.img, a.img)
    y = torch.randint(0, 1000, (a.batch,))
    mb = 2**20
    print(f"memory {a.size}-{a.img} batch {a.batch} depth {a.depth or 'full'}: saved activations of one forward")
    models = [("timm", tm), ("ours", ours)]
    for name, m in models:
        m.train()
        for ckpt in (False, True):
            m.set_grad_checkpointing(ckpt)
            n = saved_bytes(m, lambda m=m: torch.nn.functional.cross_entropy(m(x), y))
            print(f"  {name:14s} grad-checkpointing={int(ckpt)}  {n / mb:9.1f} MiB")
            m.set_grad_checkpointing(False)
    if not a.rss:
        return
    print("fresh process per model: RSS before a training step (model, grads freed, AdamW state) and its peak")
    for name in ("timm", "ours"):
        for ckpt in (False, True):
            code = RSS_CODE.format(
                threads=a.threads, size=a.size, img=a.img, depth=a.depth, batch=a.batch, ckpt=ckpt,
                which="tm" if name == "timm" else "ours",
            )  # fmt: skip
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            base, peak = (int(v) / 1024 for v in out.stdout.split()[-2:])
            print(f"  {name:14s} grad-checkpointing={int(ckpt)}  before {base:8.1f} MiB  peak {peak:8.1f} MiB")


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
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--freezing", action="store_true", help="speed --compile: torch._inductor.config.freezing")
    ap.add_argument("--train", action="store_true", help="ops: profile a training step")
    ap.add_argument("--inference-mode", action="store_true", help="speed: torch.inference_mode, not no_grad")
    ap.add_argument("--rss", action="store_true", help="memory: also peak RSS of fresh processes")
    ap.add_argument("--bf16", action="store_true", help="speed: bf16 weights; train: bf16 autocast")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"speed": cmd_speed, "train": cmd_train, "memory": cmd_memory, "ops": cmd_ops, "explain": cmd_explain}[a.cmd](a)


if __name__ == "__main__":
    main()
