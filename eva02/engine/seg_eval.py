"""Segmentation metrics: a confusion matrix summed over processes, and mmseg's mIoU / mAcc / aAcc.

Definitions (mmseg 0.29 `mean_iou`, as the official EVA-02 results report them), per class c over all
evaluated pixels whose label is not 255: intersection I_c = pixels labelled c and predicted c, union
U_c = labelled c + predicted c - I_c; IoU_c = I_c / U_c, Acc_c = I_c / labelled c, aAcc = sum I / sum
labelled. A class with no pixel in the union has IoU NaN (and Acc NaN when none is labelled): such
classes are left out of the means, so a class predicted but never labelled counts with IoU 0.
Each rank evaluates its share of the images (`EvalSampler`); padding keys and unusable images are skipped.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from eva02.dtypes import autocast
from eva02.engine.dist import all_reduce_sum

IGNORE = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = label, columns = prediction; label 255 skipped."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def seg_metrics(conf: torch.Tensor) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU ('per_class'), in percent (None for NaN), from a confusion matrix."""
    conf = conf.double().cpu()
    inter = conf.diag()
    labelled, predicted = conf.sum(dim=1), conf.sum(dim=0)
    iou = inter / (labelled + predicted - inter)  # 0 / 0 -> NaN: the class is absent from both
    acc = inter / labelled
    total = float(labelled.sum())

    def mean(x: torch.Tensor) -> float:
        return float(x.nanmean()) * 100 if not bool(x.isnan().all()) else math.nan

    return {
        "mIoU": mean(iou),
        "mAcc": mean(acc),
        "aAcc": float(inter.sum()) / total * 100 if total else math.nan,
        "per_class": [None if math.isnan(v) else v * 100 for v in iou.tolist()],
    }


@torch.no_grad()
def evaluate_segmentor(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    num_classes: int,
    amp: torch.dtype | None = None,
    n_total: int | None = None,
    crop: int = 0,
    stride: int = 0,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> dict[str, Any]:
    """Metrics of `seg_metrics` plus 'count' (images evaluated) and 'bad' (skipped) over all processes.

    Each image is predicted (`Segmentor.predict`: sliding `crop` windows `stride` apart when both are
    set, over `scales` and flips) at its loaded size, the scores upsampled to its label map's size. With
    several scales, no view is smaller than the crop on its short side (the official multi-scale test).
    """
    n = n_total if n_total is not None else len(loader.dataset)
    min_side = crop if len(scales) > 1 else 0
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    extra = torch.zeros(2, dtype=torch.int64, device=device)  # images, bad
    for batch in loader:
        for path, reason in batch.get("bad", ()):
            print(f"warning: skipped unreadable validation image {path}: {reason}", file=sys.stderr)
        extra[1] += len(batch.get("bad", ()))
        if batch["images"] is None:
            continue
        for image, target, key in zip(batch["images"], batch["targets"], batch["index"].tolist(), strict=True):
            if key >= n:  # padding keys only make the ranks' lengths equal
                continue
            target = target.to(device)
            with autocast(device.type, amp):
                scores = model.predict(image[None].to(device), target.shape[-2:], crop, stride, scales, flip, min_side)
            conf += confusion_matrix(scores.argmax(dim=1)[0], target, num_classes)
            extra[0] += 1
    all_reduce_sum(conf)
    all_reduce_sum(extra)
    model.train(was_training)
    if int(extra[0]) == 0:
        raise ValueError("no validation image could be evaluated; check the validation dataset")
    return {**seg_metrics(conf), "count": int(extra[0]), "bad": int(extra[1])}
