"""Speed and memory harness: our Eva02 against timm's `Eva` (and mmpretrain's `ViTEVA02` when importable).

All implementations of one size are built with the same architecture and measured in one process with
interleaved rounds (the order rotates every round), so load from other processes hits them alike;
numbers are medians over rounds. What is measured:
- inference: one batch forward under `torch.inference_mode`, as img/s and batch latency;
- training step: forward + cross-entropy + backward + AdamW step, as img/s;
- memory (CPU): a fresh subprocess per measurement with glibc told to serve every block over 64 KiB by
  mmap, so freed tensors leave the resident set at once and RSS follows live tensor memory; the peak is
  VmHWM after resetting it through /proc/self/clear_refs. On CUDA, the allocator's own peak counters;
- the machine's matmul peak: a plain square fp32 (or the run's dtype) matmul in the same run, so
  achieved model FLOP/s can be stated as a fraction of it.

timm and mmpretrain are optional: they are imported only when asked for, never by the rest of eva02.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eva02.extras import need
from eva02.model.config import VARIANTS, Eva02Config
from eva02.model.vit import Eva02

IMPLS = ("ours", "timm", "mmpretrain")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchSize:
    """One benchmark point: a variant at an input size and batch size."""

    variant: str
    img_size: int
    batch: int

    def config(self, num_classes: int = 1000) -> Eva02Config:
        return VARIANTS[self.variant].replace(img_size=self.img_size, num_classes=num_classes)


# The sizes the released classifiers run at, with batches that fit a small CPU machine.
SIZES: dict[str, BenchSize] = {
    "test-56": BenchSize("test", 56, 2),
    "tiny-336": BenchSize("tiny", 336, 8),
    "small-336": BenchSize("small", 336, 8),
    "base-448": BenchSize("base", 448, 2),
    "large-448": BenchSize("large", 448, 1),
}


def get_size(name: str) -> BenchSize:
    """Look a size up by name ('tiny-336'); a clear error lists the valid ones."""
    if name not in SIZES:
        raise ValueError(f"unknown benchmark size {name!r}; choose from {', '.join(SIZES)}")
    return SIZES[name]


# ------------------------------------------------------------------------------------------ models
def build_timm(cfg: Eva02Config) -> nn.Module:
    """timm's `Eva` with the architecture of `cfg` (what timm's eva02_*_patch14_* constructors build)."""
    Eva = need("timm.models.eva", "bench", "benchmarking against timm").Eva
    # timm keeps separate q/k/v projections for base/large (qkv_fused=False) and takes the hidden
    # width as int(dim * mlp_ratio): the +0.5 keeps float rounding from landing one below.
    return Eva(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes, embed_dim=cfg.dim,
        depth=cfg.depth, num_heads=cfg.heads, qkv_fused=not cfg.sub_ln, mlp_ratio=(cfg.mlp_hidden + 0.5) / cfg.dim,
        swiglu_mlp=True, scale_mlp=cfg.sub_ln, use_rot_pos_emb=True, ref_feat_shape=(cfg.ref_grid, cfg.ref_grid),
    )  # fmt: skip


class _MmpClassifier(nn.Module):
    """mmpretrain's backbone with the linear head of its EVA-02 classifier configs."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1])


def build_mmpretrain(cfg: Eva02Config) -> nn.Module:
    """mmpretrain's `ViTEVA02` as configured by its eva02-*-p14_in1k configs, plus the linear head."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmpretrain.models.backbones import ViTEVA02
    except ImportError as e:
        raise ImportError(
            f"mmpretrain cannot be imported ({e}); install it or pass its site folder (--mmp-site DIR)"
        ) from e
    arch = {
        "embed_dims": cfg.dim,
        "num_layers": cfg.depth,
        "num_heads": cfg.heads,
        "feedforward_channels": cfg.mlp_hidden,
    }
    backbone = ViTEVA02(
        arch=arch, img_size=cfg.img_size, patch_size=cfg.patch_size, sub_ln=cfg.sub_ln, final_norm=False,
        out_type="avg_featmap",
    )  # fmt: skip
    return _MmpClassifier(backbone, cfg.dim, cfg.num_classes)


def build_model(impl: str, cfg: Eva02Config) -> nn.Module:
    """One implementation of the architecture `cfg`, randomly initialised, on the CPU in fp32."""
    if impl == "ours":
        return Eva02(cfg)
    if impl == "timm":
        return build_timm(cfg)
    if impl == "mmpretrain":
        return build_mmpretrain(cfg)
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def load_timm_weights(ours: Eva02, timm_model: nn.Module) -> bool:
    """Give `ours` timm's random weights through eva02.weights.convert, when that module exists."""
    try:
        from eva02.weights.convert import to_ours
    except ImportError:
        return False
    ours.load_state_dict(to_ours(timm_model.state_dict(), "timm", ours.cfg), strict=True)
    return True


def forward_flops(cfg: Eva02Config, img_size: int | None = None) -> float:
    """Forward FLOPs of one image (2 x the multiply-adds of the matrix products and the patch convolution)."""
    from eva02.flops import forward_flops as flops

    return flops(cfg, img_size)


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
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
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
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


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
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
        amp = None if dtype == "fp32" else DTYPES[dtype]
        out["train"] = _bench_train(models, x, y, rounds, warmup, amp, dev, compile)
    out["infer"] = _bench_infer(models, x, rounds, warmup, compile, DTYPES[dtype], dev)
    return out


def _bench_infer(models, x, rounds, warmup, compile, dtype, dev) -> dict:
    fns = {}
    xi = x.to(dtype)
    for impl, m in models.items():
        m = m.eval().to(dtype)
        fns[impl] = _infer_fn(m, xi)
        if compile:
            # CPU: inductor's freezing (weights folded and prepacked for oneDNN) is what makes compiled
            # inference pay on CPU; every implementation gets the same setting.
            fns[impl + "+compile"] = _infer_fn(torch.compile(m), xi, freeze=dev.type == "cpu")
    errors: dict[str, str] = {}
    times = time_interleaved(fns, rounds, max(warmup, 2 if compile else 1), dev, errors)
    for m in models.values():
        m.float()
    return {**{k: _summary(v, x.shape[0]) for k, v in times.items()}, **{k: {"error": e} for k, e in errors.items()}}


def _infer_fn(model: nn.Module, x: torch.Tensor, freeze: bool = False) -> Callable[[], object]:
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
        fns[impl] = lambda m=m, opt=opt: _train_step(m, opt, x, y, amp)
        if compile:  # the compiled module shares the parameters (and so the optimizer) of the eager one
            compiled = torch.compile(m)
            fns[impl + "+compile"] = lambda m=compiled, opt=opt: _train_step(m, opt, x, y, amp)
    errors: dict[str, str] = {}
    times = time_interleaved(fns, rounds, max(warmup, 2 if compile else 1), dev, errors)
    return {**{k: _summary(v, x.shape[0]) for k, v in times.items()}, **{k: {"error": e} for k, e in errors.items()}}


# ------------------------------------------------------------------------------------------ floor
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
        from torch.utils._python_dispatch import TorchDispatchMode

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
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dev = torch.device(device)
    B = batch or size.batch
    cfg = size.config()
    x = torch.randn(B, 3, size.img_size, size.img_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (B,), device=dev)
    amp = None if dtype == "fp32" else DTYPES[dtype]
    out: dict = {"batch": B, "img_size": size.img_size, "variant": size.variant, "mode": "train" if train else "infer",
                 "impls": list(impls), "device": device, "dtype": dtype}  # fmt: skip
    fns = {}
    for impl in impls:
        m = build_model(impl, cfg).to(dev)
        if train:
            opt = torch.optim.AdamW(m.train().parameters(), lr=1e-5)
            fns[impl] = lambda m=m, opt=opt: _train_step(m, opt, x, y, amp)
        else:
            fns[impl] = _infer_fn(m.eval().to(DTYPES[dtype]), x.to(DTYPES[dtype]))
        fns[impl]()  # warm (tables, allocator) before recording
        _sync(dev)
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


# ------------------------------------------------------------------------------------------ memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory needs Linux")


def _memory_child(spec_json: str) -> None:
    """Run in a fresh interpreter by `measure_memory`: one measured step, result printed as JSON."""
    spec = json.loads(spec_json)
    sys.path[:0] = spec["path"]
    torch.set_num_threads(spec["threads"])
    cfg = VARIANTS[spec["variant"]].replace(img_size=spec["img_size"], num_classes=1000)
    model = build_model(spec["impl"], cfg)
    if spec["grad_ckpt"]:
        model.set_grad_checkpointing(True)
    x = torch.randn(spec["batch"], 3, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (spec["batch"],))
    if spec["train"]:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for _ in range(2):  # optimizer state exists from here on, so it counts in the base, not the step
            _train_step(model, opt, x, y, None)
        opt.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.inference_mode():
            model(x)
    gc.collect()
    base = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    if spec["train"]:
        loss = F.cross_entropy(model(x), y)
        after_fwd = _proc_status_kib("VmRSS")
        loss.backward()
        opt.step()
    else:
        with torch.inference_mode():
            model(x)
            after_fwd = _proc_status_kib("VmRSS")
    peak = _proc_status_kib("VmHWM")
    mib = 1.0 / 1024
    res = {"base_mib": base * mib, "activations_mib": (after_fwd - base) * mib, "peak_mib": (peak - base) * mib}
    print(json.dumps(res))


def measure_memory(
    impl: str,
    size: BenchSize,
    train: bool = True,
    grad_ckpt: bool = False,
    batch: int | None = None,
    threads: int | None = None,
    extra_path: Sequence[str] = (),
    timeout: float = 1800,
) -> dict:
    """Memory of one step on the CPU, in MiB, measured in a fresh subprocess.

    Returns base_mib (resident before the step: weights, optimizer state, libraries), activations_mib
    (growth by the end of the forward: what the backward keeps) and peak_mib (highest growth during
    the whole step, gradients and temporaries included).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    spec = {"impl": impl, "variant": size.variant, "img_size": size.img_size, "batch": batch or size.batch,
            "train": train, "grad_ckpt": grad_ckpt, "threads": threads or torch.get_num_threads(),
            "path": list(extra_path)}  # fmt: skip
    # A fixed mmap threshold also turns off glibc's dynamic raising of it, which would otherwise keep
    # freed blocks of up to 32 MiB resident and hide how much memory a step really needs.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "import sys; from eva02.bench import _memory_child; _memory_child(sys.argv[1])"
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=timeout
    )
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {impl} failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_memory_cuda(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp) -> dict:
    """Peak CUDA memory of one training step beyond what is allocated before it, in MiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        _train_step(model, opt, x, y, amp)
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _train_step(model, opt, x, y, amp)
    torch.cuda.synchronize()
    mib = 1.0 / 2**20
    return {"base_mib": base * mib, "peak_mib": (torch.cuda.max_memory_allocated() - base) * mib}


# ------------------------------------------------------------------------------------------ report
def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    info = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_derived(result: dict, peak_flops: float) -> dict:
    """Ratios against timm (same run) and achieved FLOP/s as a fraction of the matmul peak, in place."""
    flop = result["gflop_per_img"] * 1e9
    for mode, factor in (("infer", 1.0), ("train", 3.0)):  # training = forward + 2x forward for backward
        entries = result.get(mode, {})
        base = entries.get("timm", {}) if "img_s" in entries.get("timm", {}) else None
        for name, e in entries.items():
            if "img_s" not in e:
                continue
            e["peak_fraction"] = e["img_s"] * flop * factor / peak_flops
            if base and name != "timm":
                e["x_timm"] = e["img_s"] / base["img_s"]
                e["x_timm_best"] = base["min_ms"] / e["min_ms"]  # fastest rounds: the least disturbed ones
    mem = result.get("memory", {})
    mem = {k: v for k, v in mem.items() if "peak_mib" in v}
    for name, e in mem.items():
        impl, _, tag = name.partition("+")
        ref = mem.get("timm+" + tag if tag else "timm")
        if ref and impl != "timm":
            e["x_timm_peak"] = e["peak_mib"] / ref["peak_mib"]
        if tag == "ckpt" and impl in mem and mem[impl].get("activations_mib", 0) > 0:
            e["ckpt_activation_ratio"] = e["activations_mib"] / mem[impl]["activations_mib"]
    return result


def run_benchmark(
    sizes: Sequence[str],
    impls: Sequence[str] = ("ours", "timm"),
    rounds: int = 5,
    warmup: int = 1,
    compile: bool = False,
    train: bool = False,
    memory: bool = False,
    grad_ckpt: bool = False,
    device: str = "cpu",
    dtype: str = "fp32",
    threads: int | None = None,
    extra_path: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    batch: int | None = None,
    floor: bool = False,
) -> dict:
    """The whole side-by-side run: machine, matmul peak, and per size timings, memory and ratios.

    With `floor` (with timm), each size also gets `bench_floor` for inference (and for the training
    step with `train`), on the same device and in the same dtype.
    """
    for name in sizes:
        get_size(name)  # fail on a typo before minutes of measuring
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    sys.path[:0] = [p for p in extra_path if p not in sys.path]
    peak = matmul_flops_per_s(device=device, dtype=DTYPES[dtype])
    settings = {"rounds": rounds, "warmup": warmup, "compile": compile, "train": train, "dtype": dtype, "floor": floor}
    report = {"machine": machine_info(device), "settings": settings, "matmul_gflop_s": peak / 1e9, "results": {}}
    for name in sizes:
        size = get_size(name)
        if log:
            log(f"{name}: timing {', '.join(impls)}")
        res = bench_size(size, impls, rounds, warmup, compile, train, device, dtype, batch)
        if memory:
            if log:
                log(f"{name}: memory")
            res["memory"] = _memory_all(size, impls, grad_ckpt, device, dtype, extra_path, batch or size.batch)
        if floor:
            if log:
                log(f"{name}: kernel floor")
            res["floor"] = {mode: bench_floor(size, impls, rounds, mode == "train", batch, device, dtype)
                            for mode in (("infer", "train") if train else ("infer",))}  # fmt: skip
        report["results"][name] = add_derived(res, peak)
        # Compiled graphs keep their models alive; drop them before the next (bigger) size.
        torch._dynamo.reset()
        gc.collect()
    return report


def _memory_all(size: BenchSize, impls, grad_ckpt: bool, device: str, dtype: str, extra_path, batch: int) -> dict:
    runs = [(impl, False) for impl in impls]
    runs += [(impl, True) for impl in impls if grad_ckpt and impl != "mmpretrain"]  # mmpretrain has no ckpt
    out = {}
    for impl, ckpt in runs:
        key = impl + ("+ckpt" if ckpt else "")
        try:
            if device == "cpu":
                out[key] = measure_memory(impl, size, True, ckpt, batch, extra_path=extra_path)
                continue
            model = build_model(impl, size.config()).to(device).train()
            if ckpt:
                model.set_grad_checkpointing(True)
            x = torch.randn(batch, 3, size.img_size, size.img_size, device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            out[key] = measure_memory_cuda(model, x, y, None if dtype == "fp32" else DTYPES[dtype])
            del model
        except Exception as e:  # keep the other measurements; the report names what failed
            out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out
