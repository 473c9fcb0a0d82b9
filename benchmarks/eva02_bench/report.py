"""The whole side-by-side run and its report: machine, matmul peak, per size timings, memory, kernel floor,
the ratios against timm derived from them, and the report as Markdown tables.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Callable, Sequence

import torch

from eva02.dtypes import autocast_dtype, canonical, torch_dtype

from .floor import bench_floor
from .memory import measure_memory, measure_memory_cuda
from .models import BenchSize, build_model, get_size
from .timing import bench_size, matmul_flops_per_s


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
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
    dtype = canonical(dtype)
    if threads:
        torch.set_num_threads(threads)
    sys.path[:0] = [p for p in extra_path if p not in sys.path]
    peak = matmul_flops_per_s(device=device, dtype=torch_dtype(dtype))
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
            out[key] = measure_memory_cuda(model, x, y, autocast_dtype(dtype))
            del model
        except Exception as e:  # keep the other measurements; the report names what failed
            out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out


def _ratio(e: dict) -> str:
    return f"{e['x_timm']:.2f} / {e['x_timm_best']:.2f}" if "x_timm" in e else ""


def format_table(report: dict) -> str:
    """Markdown table of a report from `run_benchmark` (one row per size and implementation)."""
    head = (
        "| size | batch | impl | infer img/s | latency ms | x timm (median / best) | % matmul peak "
        "| train img/s | x timm (median / best) |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, res in report["results"].items():
        train = res.get("train", {})
        for impl, e in res["infer"].items():
            if "img_s" not in e:
                lines.append(f"| {name} | {res['batch']} | {impl} | error: {e.get('error', '?')} | | | | | |")
                continue
            t = train.get(impl) if "img_s" in train.get(impl, {}) else None
            cells = [
                name,
                str(res["batch"]),
                impl,
                f"{e['img_s']:.2f}",
                f"{e['latency_ms']:.0f}",
                _ratio(e),
                f"{100 * e['peak_fraction']:.0f}%",
                f"{t['img_s']:.2f}" if t else "",
                _ratio(t) if t else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    mem_rows = [(name, impl, e) for name, res in report["results"].items() for impl, e in res.get("memory", {}).items()]
    if mem_rows:
        lines += [
            "",
            "| size | impl | train step peak MiB | activations MiB | x timm (peak) |",
            "|---|---|---|---|---|",
        ]
        for name, impl, e in mem_rows:
            if "peak_mib" not in e:
                lines.append(f"| {name} | {impl} | error: {e.get('error', '?')} | | |")
                continue
            act = f"{e['activations_mib']:.0f}" if "activations_mib" in e else ""
            ratio = f"{e['x_timm_peak']:.2f}" if "x_timm_peak" in e else ""
            lines.append(f"| {name} | {impl} | {e['peak_mib']:.0f} | {act} | {ratio} |")
    floor_rows = [(name, f) for name, res in report["results"].items() for f in res.get("floor", {}).values()]
    if floor_rows:
        lines += [
            "",
            "| size | pass | impl | measured ms | kernel floor ms | GEMM / attention / conv ms | in kernels "
            "| x timm | ceiling x timm |",
            "|" + "---|" * 9,
        ]
        for name, f in floor_rows:
            for impl in f["impls"]:
                e = f[impl]
                parts = f"{e['gemm_ms']:.0f} / {e['attention_ms']:.0f} / {e['conv_ms']:.0f}"
                share, x, ceiling = f"{100 * e['floor_share']:.0f}%", f"{e['x_timm']:.2f}", f"{e['ceiling_x_timm']:.2f}"
                measured, floor = f"{e['measured_ms']:.0f}", f"{e['floor_ms']:.0f}"
                cells = [name, f["mode"], impl, measured, floor, parts, share, x, ceiling]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
