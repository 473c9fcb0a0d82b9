"""Memory of one segmentation training step on CPU: EVA-02 + UperNet (the official ADE20K config at
512 px), with and without gradient checkpointing of the backbone blocks.

Each setting runs in a fresh process (peak RSS is per process): the model, AdamW and the loss of
`configs/eva02_seg/eva02_base_upernet_ade20k_512.py` (random init, no download), `--batch` random
512 px images with random labels, `--steps` optimizer steps in fp32. Reported per setting: resident
memory after building (torch and the weights), the peak over the steps (getrusage), their difference
(activations, gradients and AdamW's two moments), and the seconds per step.

    python benchmarks/seg_memory.py [--config FILE] [--batch 2] [--steps 2] [--out results/seg_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "eva02_seg" / "eva02_base_upernet_ade20k_512.py"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(config: str, ckpt: bool, batch: int, steps: int) -> dict:
    """One setting, in this process: build, train `steps` steps, measure."""
    import torch

    sys.path.insert(0, str(ROOT))
    from eva02.engine.config import load_config
    from eva02.engine.optim import build_optimizer
    from eva02.engine.tasks.segment import SegmentTask

    torch.manual_seed(0)
    cfg = load_config(config)
    task = SegmentTask()
    model = task.build_model(cfg, load_init=False).train()
    model.set_grad_checkpointing(ckpt)
    loss_fn = task.build_loss(cfg)
    opt = build_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay, 1.0, len(model.blocks))
    size = cfg.model.img_size
    batch_data = {
        "images": torch.randn(batch, 3, size, size),
        "targets": torch.randint(0, cfg.model.num_classes, (batch, size, size)),
    }
    built = rss_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss_fn(model, batch_data).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    return {
        "grad_checkpointing": ckpt,
        "params_m": round(params / 1e6, 2),
        "rss_built_mib": round(built),
        "peak_rss_mib": round(peak),
        "step_mib": round(peak - built),  # what the steps added: activations, gradients, AdamW's moments
        "step_s": [round(t, 1) for t in times],
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--batch", type=int, default=2, help="images per step (2: the heads' BatchNorm needs two)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--child", choices=("off", "on"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.child == "on", args.batch, args.steps)))
        return 0
    rows = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--config", args.config, "--batch", str(args.batch),
               "--steps", str(args.steps), "--child", setting]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"grad checkpointing {setting:>3}: built {r['rss_built_mib']} MiB, peak {r['peak_rss_mib']} MiB "
              f"(+{r['step_mib']} MiB), steps {r['step_s']} s ({r['threads']} threads)")  # fmt: skip
    result = {"config": os.path.relpath(args.config, ROOT), "batch": args.batch, "dtype": "fp32", "runs": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
