"""The kernel floor: the time a forward or training step spends in the kernels no implementation can skip
(matrix products, attention, the patch convolution), recorded at the dispatcher and replayed alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from eva02.dtypes import autocast_dtype, canonical, torch_dtype

from .models import BenchSize, build_model
from .timing import infer_fn, sync, time_interleaved, train_step

# The kernels no implementation of the architecture can skip: matrix products (linears and head),
# attention and the patch convolution, with their backward counterparts. Everything else in a forward
# (norms, activations, RoPE, residuals, copies) is what an implementation can make cheaper.
_FLOOR_OPS = {
    "gemm": {"addmm", "mm", "bmm", "baddbmm", "linear", "matmul"},
    "attention": {
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_cudnn_attention_backward",
    },
    "conv": {"conv2d", "convolution", "convolution_backward"},
}
_FLOOR_KIND = {name: kind for kind, names in _FLOOR_OPS.items() for name in names}


def _clone_arg(a: object) -> object:
    """A tensor argument copied with its strides (views of larger buffers keep their layout)."""
    if isinstance(a, torch.Tensor):
        c = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
        return c.copy_(a.detach())
    if isinstance(a, (list, tuple)):
        return type(a)(_clone_arg(x) for x in a)
    return a


def _describe(a: object) -> str:
    if isinstance(a, torch.Tensor):
        dense = a.is_contiguous()
        return "x".join(map(str, a.shape)) + ("" if dense else "(strided)")
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_describe(x) for x in a) + "]"
    return repr(a)


class KernelRecorder:
    """Records every call of the floor kernels (see `_FLOOR_OPS`) made while it is active.

    Calls with the same operator and argument layout are one entry with a count; the first call's
    arguments are kept (copied) so that the call can be replayed alone. Works at the dispatcher level,
    below autograd, so the backward's kernels are seen as well.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, dict] = {}
        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                kind = _FLOOR_KIND.get(func.overloadpacket.__name__)
                if kind is not None:
                    recorder._note(kind, func, args, kwargs)
                return func(*args, **kwargs)

        self._mode = _Mode()

    def _note(self, kind: str, func, args: tuple, kwargs: dict) -> None:
        def layout(a: object) -> object:
            if isinstance(a, torch.Tensor):
                return (tuple(a.shape), tuple(a.stride()), a.dtype, a.device.type)
            if isinstance(a, (list, tuple)):
                return tuple(layout(x) for x in a)
            return repr(a)

        key = (str(func), layout(args), layout(tuple(sorted(kwargs.items()))))
        e = self.entries.get(key)
        if e is None:
            shapes = ", ".join(_describe(a) for a in args if isinstance(a, (torch.Tensor, list, tuple)))
            dtype = next((str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)), "")
            e = self.entries[key] = {
                "kind": kind, "op": str(func), "args": shapes, "dtype": dtype, "calls": 0,
                "_replay": (func, _clone_arg(args), {k: _clone_arg(v) for k, v in kwargs.items()}),
            }  # fmt: skip
        e["calls"] += 1

    def __enter__(self) -> KernelRecorder:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def replay(self, rounds: int = 5, device: torch.device | None = None) -> list[dict]:
        """Time each recorded kernel alone (median over rounds, inputs warm); entries with ms and total_ms."""
        out = []
        with torch.inference_mode():
            fns = {}
            for i, e in enumerate(self.entries.values()):
                func, args, kwargs = e["_replay"]
                fns[i] = lambda func=func, args=args, kwargs=kwargs: func(*args, **kwargs)
            times = time_interleaved(fns, rounds, warmup=1, device=device)
        for i, e in enumerate(self.entries.values()):
            ms = 1000 * statistics.median(times[i])
            out.append({k: v for k, v in e.items() if not k.startswith("_")} | {"ms": ms, "total_ms": ms * e["calls"]})
        return out


def kernel_floor(fn: Callable[[], object], rounds: int = 5, device: torch.device | None = None) -> dict:
    """The time `fn` spends in kernels every implementation needs, measured kernel by kernel.

    `fn` (a forward, or a whole training step) runs once under a `KernelRecorder`; each distinct matrix
    product, attention and convolution call is then replayed alone and timed, and the times are summed
    with their call counts. The sum is a floor for `fn`: a model that spent no time at all outside these
    kernels would still take this long (with its kernels no slower than alone, warm in cache).
    """
    rec = KernelRecorder()
    with rec:
        fn()
    kernels = rec.replay(rounds, device)
    totals = {kind: sum(k["total_ms"] for k in kernels if k["kind"] == kind) for kind in _FLOOR_OPS}
    kernels.sort(key=lambda k: -k["total_ms"])
    return {"floor_ms": sum(totals.values()), **{f"{kind}_ms": t for kind, t in totals.items()}, "kernels": kernels}


def bench_floor(
    size: BenchSize,
    impls: Sequence[str] = ("ours", "timm"),
    rounds: int = 5,
    train: bool = False,
    batch: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
) -> dict:
    """Per implementation: its kernel floor (see `kernel_floor`) and its measured time, same run.

    `ceiling_x_timm` is timm's measured time over an implementation's floor: the largest speed-up over
    timm that implementation could reach by removing everything but its matrix products, attention
    and convolution. With `dtype` bf16/fp16, inference runs with the weights in that dtype and
    training under its autocast, as in `bench_size`.
    """
    dtype = canonical(dtype)  # before anything is built: a bad word fails at once
    dev = torch.device(device)
    B = batch or size.batch
    cfg = size.config()
    x = torch.randn(B, 3, size.img_size, size.img_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (B,), device=dev)
    amp = autocast_dtype(dtype)
    out: dict = {"batch": B, "img_size": size.img_size, "variant": size.variant, "mode": "train" if train else "infer",
                 "impls": list(impls), "device": device, "dtype": dtype}  # fmt: skip
    fns = {}
    for impl in impls:
        m = build_model(impl, cfg).to(dev)
        if train:
            opt = torch.optim.AdamW(m.train().parameters(), lr=1e-5)
            fns[impl] = lambda m=m, opt=opt: train_step(m, opt, x, y, amp)
        else:
            fns[impl] = infer_fn(m.eval().to(torch_dtype(dtype)), x.to(torch_dtype(dtype)))
        fns[impl]()  # warm (tables, allocator) before recording
        sync(dev)
        out[impl] = kernel_floor(fns[impl], rounds, dev)
    times = time_interleaved(fns, rounds, device=dev)
    for impl in impls:
        out[impl]["measured_ms"] = 1000 * statistics.median(times[impl])
        out[impl]["floor_share"] = out[impl]["floor_ms"] / out[impl]["measured_ms"]
    if "timm" in impls:
        for impl in impls:
            out[impl]["ceiling_x_timm"] = out["timm"]["measured_ms"] / out[impl]["floor_ms"]
            out[impl]["x_timm"] = out["timm"]["measured_ms"] / out[impl]["measured_ms"]
    return out
