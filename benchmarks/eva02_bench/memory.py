"""Memory of one training (or inference) step.

CPU: a fresh subprocess per measurement with glibc told to serve every block over 64 KiB by mmap, so
freed tensors leave the resident set at once and RSS follows live tensor memory; the peak is VmHWM after
resetting it through /proc/self/clear_refs (Linux only). CUDA: the allocator's own peak counters.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eva02.model.config import VARIANTS

from .models import IMPLS, BenchSize, build_model
from .timing import train_step

HERE = Path(__file__).resolve().parent


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
            train_step(model, opt, x, y, None)
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
    # The child imports this package from the folder that holds it, wherever the parent was started.
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from eva02_bench import memory; memory._memory_child(sys.argv[1])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec), str(HERE.parent)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {impl} failed: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_memory_cuda(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp) -> dict:
    """Peak CUDA memory of one training step beyond what is allocated before it, in MiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        train_step(model, opt, x, y, amp)
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, opt, x, y, amp)
    torch.cuda.synchronize()
    mib = 1.0 / 2**20
    return {"base_mib": base * mib, "peak_mib": (torch.cuda.max_memory_allocated() - base) * mib}
