"""Classification evaluation: top-1 / top-5 / per-class accuracy, summed over processes, and its table.

Each rank evaluates its share (`EvalSampler`, padded to equal length so that FSDP collectives line up);
padding keys (>= dataset size) and images that failed to load are left out of the counts.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from eva02.dtypes import autocast
from eva02.engine.dist import all_reduce_sum


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    num_classes: int,
    amp: torch.dtype | None = None,
    n_total: int | None = None,
) -> dict[str, Any]:
    """{'top1', 'top5' (percent), 'loss', 'count', 'bad', 'per_class' (percent or None per class)}."""
    n = n_total if n_total is not None else len(loader.dataset)
    was_training = model.training
    model.eval()
    correct1 = torch.zeros(num_classes, dtype=torch.float64, device=device)
    correct5 = torch.zeros(num_classes, dtype=torch.float64, device=device)
    seen = torch.zeros(num_classes, dtype=torch.float64, device=device)
    extra = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, bad images
    for batch in loader:
        for path, reason in batch.get("bad", ()):
            print(f"warning: skipped unreadable validation image {path}: {reason}", file=sys.stderr)
        extra[1] += len(batch.get("bad", ()))
        if batch["images"] is None:
            continue
        keep = batch["index"] < n  # padding keys only make the ranks' lengths equal
        images = batch["images"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        with autocast(device.type, amp):
            logits = model(images)
        logits, targets, keep = logits.float(), targets, keep.to(device)
        k = min(5, num_classes)
        top = logits.topk(k, dim=-1).indices  # (B, k)
        hit = top == targets[:, None]
        w = keep.double()
        correct1.index_add_(0, targets, hit[:, 0].double() * w)
        correct5.index_add_(0, targets, hit.any(dim=1).double() * w)
        seen.index_add_(0, targets, w)
        extra[0] += (nn.functional.cross_entropy(logits, targets, reduction="none").double() * w).sum()
    for t in (correct1, correct5, seen, extra):
        all_reduce_sum(t)
    model.train(was_training)
    total = float(seen.sum())
    if total == 0:
        raise ValueError("no validation image could be evaluated; check the validation dataset")
    per_class = [float(c / s * 100) if s > 0 else None for c, s in zip(correct1.tolist(), seen.tolist(), strict=True)]
    return {
        "top1": float(correct1.sum()) / total * 100,
        "top5": float(correct5.sum()) / total * 100,
        "loss": float(extra[0]) / total,
        "count": int(total),
        "bad": int(extra[1]),
        "per_class": per_class,
    }


def format_table(metrics: dict[str, Any], classes: list[str] | None = None, per_class: bool = False) -> str:
    """A plain-text table of the results (and per-class accuracy when asked)."""
    lines = ["| metric | value |", "|---|---|"]
    for key, v in metrics.items():  # every task's scalars: top-1/top-5, mIoU/mAcc/aAcc, box and mask AP, ...
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        lines.append(f"| {key} | {v:.3f} |" if isinstance(v, float) else f"| {key} | {v} |")
    if per_class and metrics.get("per_class"):
        head = "IoU" if "mIoU" in metrics else "top-1"
        lines += ["", f"| class | {head} |", "|---|---|"]
        for i, acc in enumerate(metrics["per_class"]):
            name = classes[i] if classes and i < len(classes) else str(i)
            lines.append(f"| {name} | {'n/a' if acc is None else f'{acc:.2f}'} |")
    return "\n".join(lines)
