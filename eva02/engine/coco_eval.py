"""COCO detection evaluation through pycocotools: box and mask AP (AP, AP50, AP75, APs, APm, APl, in
percent as detectron2 reports them) from detections in the COCO results format.

A results entry is {'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'} plus, for masks,
'segmentation': a compressed RLE whose counts are text (JSON-ready). Each process evaluates its share
of the images (`EvalSampler`); the detections are gathered on rank 0, which runs COCOeval, and the
metrics are sent back to every rank. Padding keys (>= the dataset size) and unreadable images are left
out; COCOeval evaluates exactly the images that were detected on.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from eva02.dtypes import autocast
from eva02.engine.dist import broadcast_object
from eva02.extras import need
from eva02.fileio import atomic_write_text

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6]
IOU_TYPES = {"bbox": "bbox", "segm": "segm"}  # our metric prefix -> COCOeval iouType


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask -> compressed RLE with text counts (the COCO results format)."""
    mask_api = need("pycocotools.mask", "det", "COCO evaluation")
    rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, cat_ids: list[int], mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's detections (torchvision's output: boxes x1 y1 x2 y2, labels 1..K, scores, masks
    (N, 1, H, W) probabilities) as COCO results entries; label k is category `cat_ids[k - 1]`."""
    boxes = output["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels, scores = output["labels"].tolist(), output["scores"].float().tolist()
    masks = output.get("masks")
    binary = (masks[:, 0] >= mask_threshold).cpu().numpy() if masks is not None else None
    out = []
    for i, (box, label, score) in enumerate(zip(xywh, labels, scores, strict=True)):
        entry = {"image_id": image_id, "category_id": cat_ids[label - 1],
                 "bbox": [round(v, 2) for v in box], "score": round(score, 5)}  # fmt: skip
        if binary is not None:
            entry["segmentation"] = encode_mask(binary[i])
        out.append(entry)
    return out


def coco_metrics(coco_gt, results: list[dict[str, Any]], image_ids: list[int], kinds: tuple[str, ...]) -> dict:
    """{'bbox_AP', 'bbox_AP50', ..., 'segm_APl'} (percent) of `results` on the ground-truth `COCO` object,
    over `image_ids`; 0 for a kind without any detection."""
    cocoeval = need("pycocotools.cocoeval", "det", "COCO evaluation")
    metrics: dict[str, Any] = {}
    for kind in kinds:
        # Copies: loadRes adds keys to the entries (box results get a box polygon as 'segmentation')
        entries = [dict(r) for r in results if kind != "segm" or "segmentation" in r]
        if not entries:
            metrics.update({f"{kind}_{s}": 0.0 for s in STATS})
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
            dt = coco_gt.loadRes(entries)
            ev = cocoeval.COCOeval(coco_gt, dt, IOU_TYPES[kind])
            ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # -1 marks an area range without ground truth: reported as 0, as an empty range scores nothing
        metrics.update({f"{kind}_{s}": max(float(v), 0.0) * 100 for s, v in zip(STATS, ev.stats[:6], strict=True)})
    return metrics


def _gather(items: list) -> list:
    """Every process's list, concatenated on rank 0 (other ranks get [])."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    parts: list[list] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[list-item]
    dist.gather_object(items, parts, dst=0)
    return [x for part in parts for x in part] if parts is not None else []


@torch.no_grad()
def detect_batches(model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None, n: int):
    """(image_id, detections on CPU) of every real image of the loader's batches; bad images warned."""
    from eva02.data.coco import unpad

    for batch in loader:
        for path, reason in batch.get("bad", ()):
            print(f"warning: skipped unreadable validation image {path}: {reason}", file=sys.stderr)
        if batch["images"] is None:
            continue
        images = [img.to(device, non_blocking=True) for img in unpad(batch)]
        with autocast(device.type, amp):
            outputs = model(images)
        for key, target, out in zip(batch["index"].tolist(), batch["targets"], outputs, strict=True):
            if key < n:  # keys >= n only pad the ranks to equal length
                yield target["image_id"], {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                                           for k, v in out.items()}  # fmt: skip


def evaluate_detector(
    model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None = None, masks: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO box (and mask) AP of `model` on the loader's `CocoDetection`; returns (metrics, results)
    on every rank, the results (COCO format) complete on rank 0 only."""
    ds = getattr(loader.dataset, "ds", loader.dataset)  # inside PaddedDataset
    was_training = model.training
    model.eval()
    results, seen = [], []
    for image_id, out in detect_batches(model, loader, device, amp, len(ds)):
        seen.append(image_id)
        results += to_coco_results(out, image_id, ds.cat_ids)
    model.train(was_training)
    results, seen = _gather(results), _gather(seen)
    metrics = None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        if not seen:
            raise ValueError("no validation image could be evaluated; check the validation dataset")
        kinds = ("bbox", "segm") if masks else ("bbox",)
        metrics = {**coco_metrics(ds.coco, results, sorted(set(seen)), kinds), "count": len(set(seen))}
        metrics["bad"] = len(ds) - metrics["count"]
    return broadcast_object(metrics), results


def write_results(path: str | Path, results: list[dict[str, Any]]) -> Path:
    """Write COCO results entries as a JSON list, atomically (loadable by pycocotools' `COCO.loadRes`)."""
    return atomic_write_text(Path(path), json.dumps(results) + "\n")
