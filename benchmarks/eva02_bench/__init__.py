"""Speed and memory harness: our Eva02 against timm's `Eva` (and mmpretrain's `ViTEVA02` when importable).

It lives beside the scripts of `benchmarks/`, outside the installed package, because it builds the peers'
models; `eva02 bench` and `benchmarks/compare.py` import it from a source checkout. All implementations
of one size are built with the same architecture and measured in one process with interleaved rounds
(the order rotates every round), so load from other processes hits them alike; numbers are medians
over rounds. What is measured:
- inference: one batch forward under `torch.inference_mode`, as img/s and batch latency (`timing`);
- training step: forward + cross-entropy + backward + AdamW step, as img/s (`timing`);
- memory: a fresh subprocess per measurement on the CPU, the allocator's peak on CUDA (`memory`);
- the kernel floor: the unavoidable kernels replayed alone and summed (`floor`);
- the machine's matmul peak: a plain square matmul in the run's dtype, in the same run, so achieved
  model FLOP/s can be stated as a fraction of it (`timing`, used by `report`).
"""

from .floor import KernelRecorder, bench_floor, kernel_floor
from .memory import measure_memory, measure_memory_cuda
from .models import (
    DTYPES,
    IMPLS,
    SIZES,
    BenchSize,
    build_mmpretrain,
    build_model,
    build_timm,
    forward_flops,
    get_size,
    load_timm_weights,
)
from .report import add_derived, cpu_model, format_table, machine_info, run_benchmark
from .timing import bench_size, infer_fn, matmul_flops_per_s, time_interleaved, train_step

__all__ = [
    "DTYPES", "IMPLS", "SIZES", "BenchSize", "KernelRecorder", "add_derived", "bench_floor", "bench_size",
    "build_mmpretrain", "build_model", "build_timm", "cpu_model", "format_table", "forward_flops", "get_size",
    "infer_fn", "kernel_floor", "load_timm_weights", "machine_info", "matmul_flops_per_s", "measure_memory",
    "measure_memory_cuda", "run_benchmark", "time_interleaved", "train_step",
]  # fmt: skip
