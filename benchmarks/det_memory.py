"""Training-step activation memory of the EVA-02 Mask R-CNN, with and without gradient checkpointing.

Counts, on CPU in fp32, the bytes of the distinct tensors that a training forward pass keeps for the
backward pass (autograd's saved tensors, plus the block inputs that checkpointing keeps), at a few small
input sizes, with the full ViTDet heads (256 channels, 512 sampled proposals per image) and seven
objects per image (COCO's mean). The count is exact for what is measured; the figures at 1024 and 1536 px
are extrapolated: the backbone, pyramid and RPN part by fitting  bytes = c + a * N  over the token count
N of the measured sizes (the residual printed shows how linear it is: no attention matrix is kept), the
RoI heads' part (a fixed number of sampled proposals) as measured. Weights, gradients and AdamW's two
moments add 16 bytes per parameter. Under bf16 autocast most saved tensors take half the room.

    python benchmarks/det_memory.py --variant base --sizes 256 512 768 [--json out.json]

Sizes are best multiples of 256 px (windows of 16 tokens of 16 px): other sizes pad the windows, which
keeps more than the linear trend predicts (384 px keeps what 512 px keeps in the windowed blocks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eva02.model.config import VARIANTS, dense_config  # noqa: E402
from eva02.model.detect import DetectorConfig, Eva02MaskRCNN  # noqa: E402

MiB = 2**20


def targets(size: int, n: int = 7, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One image's `n` boxes with filled masks, spread over the image."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = (torch.rand(n, 2, generator=g) * 0.25 + 0.05) * size
    boxes = torch.cat([xy, xy + wh], dim=1).clamp(max=size - 1)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist(), strict=True):
        m[y1:y2, x1:x2] = 1
    return [{"boxes": boxes, "labels": torch.randint(1, 81, (n,), generator=g), "masks": masks}]


PHASES = ("backbone", "rpn", "roi_heads")  # the modules of the forward pass, in order


def saved_bytes(model: Eva02MaskRCNN, size: int) -> dict[str, int]:
    """Bytes of the distinct storages a training forward pass keeps for backward, per phase (the module
    running when a storage is first kept)."""
    storages: dict[int, tuple[str, int]] = {}
    phase = ["transform"]

    def keep(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), (phase[0], s.nbytes()))

    def pack(t: torch.Tensor):
        keep(t)
        return t

    hooks = [getattr(model, name).register_forward_pre_hook(lambda _m, _a, n=name: phase.__setitem__(0, n))
             for name in PHASES]  # fmt: skip
    if model.vit.grad_checkpointing:  # checkpointed blocks keep their inputs only (not seen by the hooks)
        hooks = [blk.register_forward_pre_hook(lambda _m, args: keep(args[0])) for blk in model.blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        losses = model([torch.rand(3, size, size)], targets(size))
    for h in hooks:
        h.remove()
    del losses
    out = dict.fromkeys(("transform", *PHASES), 0)
    for name, nbytes in storages.values():
        out[name] += nbytes
    return out


def measure(variant: str, sizes: list[int], checkpointing: bool) -> dict:
    out: dict = {}
    for size in sizes:
        vit = dense_config(VARIANTS[variant], size, window_size=16).replace(drop_path=0.0, patch_grad_scale=1.0)
        with torch.device("cpu"):
            model = Eva02MaskRCNN(DetectorConfig(vit, num_classes=80, mean=(0.5,) * 3, std=(0.25,) * 3)).train()
        model.set_grad_checkpointing(checkpointing)
        out[size] = saved_bytes(model, size)
        params = sum(p.numel() for p in model.parameters())
    out["params"] = params
    return out


def fit(points: dict[int, float], patch: int = 16) -> tuple[np.ndarray, float]:
    """(c, a) of bytes = c + a N over token counts N (least squares), and the largest relative residual."""
    n = np.array([(s // patch) ** 2 for s in points], dtype=np.float64)
    y = np.array(list(points.values()), dtype=np.float64)
    A = np.stack([np.ones_like(n), n], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return coef, float(np.max(np.abs(A @ coef - y) / y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--extrapolate", type=int, nargs="+", default=[1024, 1536])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"variant": args.variant}
    for key, ckpt in (("plain", False), ("checkpointing", True)):
        points = measure(args.variant, args.sizes, ckpt)
        params = points.pop("params")
        # The backbone, its pyramid and the RPN grow with the image; the RoI heads see a fixed number of
        # sampled proposals (512 per image, at most 128 of them with masks): their part is kept as measured.
        grows = {s: float(v["transform"] + v["backbone"] + v["rpn"]) for s, v in points.items()}
        heads = max(v["roi_heads"] for v in points.values())
        coef, residual = fit(grows)
        report[key] = {
            "measured_mib": {s: {k: round(b / MiB, 1) for k, b in v.items()} for s, v in points.items()},
            "per_token_kib": round(coef[1] / 1024, 2),
            "fit_residual": round(residual, 4),
            "extrapolated_mib": {
                s: round((coef[0] + coef[1] * (s // 16) ** 2 + heads) / MiB) for s in args.extrapolate
            },
        }
    report["params_m"] = round(params / 1e6, 2)
    report["weights_grads_adamw_mib"] = round(params * 16 / MiB)
    print(f"EVA-02 {args.variant} Mask R-CNN, {report['params_m']}M parameters; weights, gradients and AdamW "
          f"moments: {report['weights_grads_adamw_mib']} MiB. Saved activations per image, fp32:")  # fmt: skip
    print("| input | plain: backbone+RPN / RoI heads | checkpointing: backbone+RPN / RoI heads |")
    print("|---|---|---|")
    for s in args.sizes:
        row = []
        for key in ("plain", "checkpointing"):
            m = report[key]["measured_mib"][s]
            row.append(f"{round(m['transform'] + m['backbone'] + m['rpn'], 1)} / {m['roi_heads']} MiB")
        print(f"| {s} px (measured) | {row[0]} | {row[1]} |")
    for s in args.extrapolate:
        print(f"| {s} px (extrapolated, total) | {report['plain']['extrapolated_mib'][s]} MiB | "
              f"{report['checkpointing']['extrapolated_mib'][s]} MiB |")  # fmt: skip
    print(f"linear fit residual: plain {report['plain']['fit_residual']:.2%}, "
          f"checkpointing {report['checkpointing']['fit_residual']:.2%}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
