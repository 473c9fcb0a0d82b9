"""Timing: interleaved rounds, the machine's matmul peak, and inference / training-step img/s of one size.

Every implementation of one size is timed in the same process, one call each per round with the order
rotating every round, so load from other processes hits them alike; numbers are medians over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eva02.dtypes import autocast, autocast_dtype, torch_dtype

from .models import BenchSize, build_model, forward_flops, load_timm_weights


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | None = None,
    errors: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one call each per round, the order rotating every round.

    With `errors` given, a function that raises during warm-up is left out and its error recorded
    there, so one broken implementation does not lose the others' numbers.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = device or torch.device("cpu")
    names = []
    for name in fns:
        try:
            for _ in range(warmup):
                fns[name]()
        except Exception as e:
            if errors is None or warmup < 1:
                raise
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        names.append(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_flops_per_s(n: int | None = None, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """FLOP/s of a plain n x n x n matmul (median of `repeats`): the machine's practical peak.

    Without `n`, the size is the largest (up to 8192 on CUDA, 2048 on CPU) whose product takes about
    0.2 s here, so a dtype this CPU only emulates (bf16 without AVX512-BF16/AMX) is not timed for minutes.
    """
    if n is None:
        n = 8192 if str(device).startswith("cuda") else 2048  # big enough to reach the peak
        probe = torch.randn(256, 256, device=device, dtype=dtype)
        t = min(time_interleaved({"mm": lambda: torch.mm(probe, probe)}, 3, 1, torch.device(device))["mm"])
        fits = int((0.2 * 2.0 * 256**3 / max(t, 1e-9) / 2.0) ** (1 / 3)) // 256 * 256
        n = max(256, min(n, fits))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats, warmup=2, device=torch.device(device))["mm"]
    return 2.0 * n**3 / statistics.median(t)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp) -> None:
    """One measured training step: forward (under autocast to `amp` when given), cross-entropy, backward, step."""
    opt.zero_grad(set_to_none=True)
    with autocast(x.device.type, amp):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _summary(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"img_s": batch / med, "latency_ms": 1000 * med, "min_ms": 1000 * min(times), "times_s": times}


def bench_size(
    size: BenchSize,
    impls: Sequence[str] = ("ours", "timm"),
    rounds: int = 5,
    warmup: int = 1,
    compile: bool = False,
    train: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
    batch: int | None = None,
) -> dict:
    """Inference (and training-step) img/s of every implementation of one size, interleaved.

    With `compile`, each implementation is also measured through `torch.compile` as '<impl>+compile'.
    On CUDA with bf16/fp16, inference runs the model in that dtype and training uses autocast.
    """
    dev = torch.device(device)
    B = batch or size.batch
    cfg = size.config()
    models = {impl: build_model(impl, cfg).to(dev) for impl in impls}
    parity = None
    if "ours" in models and "timm" in models and load_timm_weights(models["ours"], models["timm"]):
        with torch.no_grad():  # not inference_mode: tables the model caches now must serve training too
            xp = torch.randn(1, 3, size.img_size, size.img_size, device=dev)
            parity = (models["ours"].eval()(xp) - models["timm"].eval()(xp)).abs().max().item()
    x = torch.randn(B, 3, size.img_size, size.img_size, device=dev)
    out: dict = {"batch": B, "img_size": size.img_size, "variant": size.variant, "timm_parity_max_abs": parity}
    out["gflop_per_img"] = forward_flops(cfg) / 1e9
    if train:  # before inference: tables cached under inference_mode cannot be saved for backward
        y = torch.randint(0, cfg.num_classes, (B,), device=dev)
        amp = autocast_dtype(dtype)
        out["train"] = _bench_train(models, x, y, rounds, warmup, amp, dev, compile)
    out["infer"] = _bench_infer(models, x, rounds, warmup, compile, torch_dtype(dtype), dev)
    return out


def _bench_infer(models, x, rounds, warmup, compile, dtype, dev) -> dict:
    fns = {}
    xi = x.to(dtype)
    for impl, m in models.items():
        m = m.eval().to(dtype)
        fns[impl] = infer_fn(m, xi)
        if compile:
            # CPU: inductor's freezing (weights folded and prepacked for oneDNN) is what makes compiled
            # inference pay on CPU; every implementation gets the same setting.
            fns[impl + "+compile"] = infer_fn(torch.compile(m), xi, freeze=dev.type == "cpu")
    errors: dict[str, str] = {}
    times = time_interleaved(fns, rounds, max(warmup, 2 if compile else 1), dev, errors)
    for m in models.values():
        m.float()
    return {**{k: _summary(v, x.shape[0]) for k, v in times.items()}, **{k: {"error": e} for k, e in errors.items()}}


def infer_fn(model: nn.Module, x: torch.Tensor, freeze: bool = False) -> Callable[[], object]:
    """A call of `model` on `x` under inference mode (with inductor's freezing when `freeze`)."""

    import torch._inductor.config as inductor_config

    def run() -> object:
        with torch.inference_mode(), inductor_config.patch(freezing=freeze):
            return model(x)

    return run


def _bench_train(models, x, y, rounds, warmup, amp, dev, compile: bool = False) -> dict:
    fns = {}
    for impl, m in models.items():
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        fns[impl] = lambda m=m, opt=opt: train_step(m, opt, x, y, amp)
        if compile:  # the compiled module shares the parameters (and so the optimizer) of the eager one
            compiled = torch.compile(m)
            fns[impl + "+compile"] = lambda m=compiled, opt=opt: train_step(m, opt, x, y, amp)
    errors: dict[str, str] = {}
    times = time_interleaved(fns, rounds, max(warmup, 2 if compile else 1), dev, errors)
    return {**{k: _summary(v, x.shape[0]) for k, v in times.items()}, **{k: {"error": e} for k, e in errors.items()}}
