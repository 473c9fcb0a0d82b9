"""COCO-format detection data through pycocotools: boxes, classes and instance masks, with ViTDet's
large-scale jitter for training (detectron2 `ResizeScale` + `FixedSizeCrop` + `RandomFlip`, as in
EVA-02 `det/projects/ViTDet/configs/common/coco_loader_lsj_1024.py`).

A dataset is an images folder and an `instances_*.json` file. Classes are the file's categories in
the order of their ids (label k + 1 is the k-th category; torchvision's detectors keep 0 for the
background). Masks come from polygons or RLE (compressed or not); crowd regions (`iscrowd` 1) are
left out of training, and COCOeval treats them as ignored regions. A bad annotation (unknown category,
a box of no area, a malformed segmentation) or image record is named in one warning per file and
skipped; an image that cannot be read comes back as a `BadSample` for the loop to count. Training
leaves out images with no usable instance, as detectron2 does.

Training samples: (uint8 image (3, h, w) with h, w <= size, {'boxes' (N, 4) x1 y1 x2 y2, 'labels' (N,),
'masks' (N, h, w) uint8}, index). Polygons are moved and scaled as polygons and drawn at the output
size; boxes are recomputed from the cropped masks (ViTDet's `recompute_boxes`). Evaluation samples:
the image as stored and {'image_id'}.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from eva02.data.datasets import BadSample, split_bad
from eva02.data.images import ImageError, load_image
from eva02.extras import need

SHOWN_PROBLEMS = 5  # bad annotations named in a file's warning before the rest are counted


@dataclass(frozen=True)
class Instance:
    """One object of an image: its label (1..K), COCO box (x, y, w, h) and segmentation (or None)."""

    label: int
    bbox: tuple[float, float, float, float]
    segm: list | dict | None


@dataclass(frozen=True)
class Record:
    image_id: int
    path: str
    height: int
    width: int
    instances: tuple[Instance, ...]


def read_coco(ann_file: str | os.PathLike):
    """A pycocotools `COCO` of an annotation file, read quietly; a clear error for a missing or bad file."""
    mask_api = need("pycocotools.coco", "det", "COCO-format detection data")
    p = Path(ann_file)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file {str(p)!r} does not exist; set det.train_ann / det.val_ann")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {str(p)!r} is not valid JSON ({e})") from None
    missing = [k for k in ("images", "categories") if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"annotation file {str(p)!r} is not COCO format: no {' or '.join(missing)} list")
    data.setdefault("annotations", [])
    coco = mask_api.COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _number_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int | float) and math.isfinite(x) for x in v)


def segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """Why a COCO segmentation is unusable (None if it is a polygon list or an RLE of the image's size)."""
    if isinstance(segm, list):
        if not segm:
            return "empty segmentation"
        if not all(_number_list(p) and len(p) >= 6 and len(p) % 2 == 0 for p in segm):
            return "a polygon is not an even list of at least 6 numbers"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and [int(s) for s in size if isinstance(s, int)] == [height, width]):
            return f"RLE size {size} is not the image's [{height}, {width}]"
        if not isinstance(counts, list | str) or not counts:
            return "RLE without counts"
        if isinstance(counts, list) and (not _number_list(counts) or sum(counts) != height * width):
            return "uncompressed RLE counts do not add up to the image's pixels"
        return None
    return f"segmentation is a {type(segm).__name__}, not polygons nor RLE"


def annotation_problem(ann: dict, image: dict, labels: dict[int, int], masks: bool) -> str | None:
    """Why an annotation cannot be trained on (None when it can)."""
    if ann.get("category_id") not in labels:
        return f"unknown category_id {ann.get('category_id')!r}"
    box = ann.get("bbox")
    if not (_number_list(box) and len(box) == 4):
        return f"bbox {box!r} is not 4 numbers"
    if box[2] <= 0 or box[3] <= 0:
        return f"bbox {box} has no area"
    if masks:
        return segmentation_problem(ann.get("segmentation"), image["height"], image["width"])
    return None


def _image_problem(img: Any) -> str | None:
    if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
        return "no file_name"
    if not all(isinstance(img.get(k), int) and img[k] > 0 for k in ("height", "width")):
        return "height and width must be positive integers"
    return None


def _polygon_mask(polys: list, height: int, width: int) -> np.ndarray:
    m = need("pycocotools.mask", "det", "COCO-format detection data")
    return m.decode(m.merge(m.frPyObjects(polys, height, width)))


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE, uncompressed RLE) as an (height, width) uint8 mask."""
    m = need("pycocotools.mask", "det", "COCO-format detection data")
    if isinstance(segm, list):
        return _polygon_mask(segm, height, width)
    if isinstance(segm["counts"], list):  # uncompressed RLE: encode it first
        segm = m.frPyObjects(segm, height, width)
    return m.decode(segm)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) tight boxes x1, y1, x2, y2 at pixel edges (zeros for an empty mask)."""
    out = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows):
            out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return out


def large_scale_jitter(
    img: Image.Image,
    instances: Sequence[Instance],
    size: int,
    scale: tuple[float, float],
    hflip: float,
    rng: np.random.Generator,
    masks: bool = True,
) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """ViTDet's training augmentation: resize so that the image fits a square of s * size (s uniform in
    `scale`), take a random crop of at most size x size, flip with probability `hflip`.

    Returns the image and {'boxes', 'labels', 'masks'} of the instances left visible.
    """
    w, h = img.size
    flip = rng.random() < hflip
    s = rng.uniform(*scale)
    f = min(s * size / h, s * size / w)
    rh, rw = max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))
    ch, cw = min(size, rh), min(size, rw)
    oy, ox = (int(np.round(rng.uniform() * (r - c))) for r, c in ((rh, ch), (rw, cw)))
    fy, fx = rh / h, rw / w  # the exact factors after rounding the resized size
    # The crop window of the resized image, read from the source directly (PIL resamples the box).
    out = img.resize((cw, ch), Image.Resampling.BILINEAR, box=(ox / fx, oy / fy, (ox + cw) / fx, (oy + ch) / fy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    labels = np.array([inst.label for inst in instances], dtype=np.int64)
    if not masks:
        boxes = np.array([inst.bbox for inst in instances], dtype=np.float32).reshape(-1, 4)
        x1 = np.clip(boxes[:, 0] * fx - ox, 0, cw)
        y1 = np.clip(boxes[:, 1] * fy - oy, 0, ch)
        x2 = np.clip((boxes[:, 0] + boxes[:, 2]) * fx - ox, 0, cw)
        y2 = np.clip((boxes[:, 1] + boxes[:, 3]) * fy - oy, 0, ch)
        if flip:
            x1, x2 = cw - x2, cw - x1
        boxes = np.stack([x1, y1, x2, y2], axis=1)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        return out, {"boxes": boxes[keep], "labels": labels[keep]}
    rows = np.clip(((np.arange(ch) + oy + 0.5) / fy).astype(np.int64), 0, h - 1)  # nearest source pixels
    cols = np.clip(((np.arange(cw) + ox + 0.5) / fx).astype(np.int64), 0, w - 1)
    drawn = np.zeros((len(instances), ch, cw), dtype=np.uint8)
    for i, inst in enumerate(instances):
        if isinstance(inst.segm, list):  # polygons: moved as polygons, drawn at the output size
            polys = []
            for poly in inst.segm:
                xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) * (fx, fy) - (ox, oy)
                if flip:
                    xy[:, 0] = cw - xy[:, 0]
                polys.append(xy.ravel().tolist())
            drawn[i] = _polygon_mask(polys, ch, cw)
        else:
            full = decode_segmentation(inst.segm, h, w)
            drawn[i] = full[rows][:, cols][:, ::-1] if flip else full[rows][:, cols]
    boxes = boxes_from_masks(drawn)
    keep = boxes[:, 2] > boxes[:, 0]
    return out, {"boxes": boxes[keep], "labels": labels[keep], "masks": drawn[keep]}


def image_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class CocoDetection(Dataset):
    """An images folder with its COCO annotation file, for training (`train`: jittered samples with
    targets) or evaluation (images as stored, with their ids)."""

    def __init__(
        self,
        image_root: str | os.PathLike,
        ann_file: str | os.PathLike,
        train: bool,
        size: int = 1024,
        scale: tuple[float, float] = (0.1, 2.0),
        hflip: float = 0.5,
        masks: bool = True,
    ) -> None:
        self.image_root, self.ann_file = Path(image_root), str(ann_file)
        self.train, self.size, self.scale, self.hflip, self.masks = train, size, tuple(scale), hflip, masks
        if not self.image_root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.image_root)!r} does not exist; set data.root / data.*_split"
            )
        self.coco = read_coco(ann_file)
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        self.records, self.skipped_empty = self._index()

    def _index(self) -> tuple[list[Record], int]:
        labels = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}
        problems: list[str] = []
        per_image: dict[Any, list[Instance]] = {}
        images = {}
        for img in self.coco.dataset["images"]:
            why = _image_problem(img)
            if why:
                problems.append(f"image {img.get('id') if isinstance(img, dict) else img!r}: {why}")
            else:
                images[img["id"]] = img
        for ann in self.coco.dataset["annotations"]:
            img = images.get(ann.get("image_id"))
            if img is None:
                problems.append(f"annotation {ann.get('id')}: image_id {ann.get('image_id')!r} is not an image")
                continue
            if ann.get("iscrowd", 0):  # an ignored region: COCOeval reads it from the file
                continue
            why = annotation_problem(ann, img, labels, self.masks)
            if why:
                problems.append(f"annotation {ann.get('id')} (image {img['id']}): {why}")
                continue
            inst = Instance(labels[ann["category_id"]], tuple(float(v) for v in ann["bbox"]),
                            ann.get("segmentation") if self.masks else None)  # fmt: skip
            per_image.setdefault(img["id"], []).append(inst)
        if problems:
            shown = "; ".join(problems[:SHOWN_PROBLEMS])
            more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
            warnings.warn(f"{self.ann_file}: skipped {len(problems)} bad entries: {shown}{more}", stacklevel=3)
        records = []
        for iid, img in images.items():
            inst = tuple(per_image.get(iid, ()))
            if self.train and not inst:
                continue
            path = str(self.image_root / img["file_name"])
            records.append(Record(iid, path, img["height"], img["width"], inst))
        return records, len(images) - len(records)

    def __len__(self) -> int:
        return len(self.records)

    def check_not_empty(self, what: str) -> None:
        if not self.records:
            raise ValueError(
                f"the {what} dataset {self.ann_file!r} has no usable image"
                + (" with annotations" if self.train else "")
                + "; check the annotation file and data.root"
            )

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        rec = self.records[index]
        try:
            img = load_image(rec.path)
        except (ImageError, OSError) as e:
            return BadSample(rec.path, str(e))
        if img.size != (rec.width, rec.height):
            return BadSample(rec.path, f"the image is {img.width}x{img.height} but its record says "
                                       f"{rec.width}x{rec.height}")  # fmt: skip
        if not self.train:
            return image_tensor(img), {"image_id": rec.image_id}, index
        rng = np.random.default_rng(seed)
        out, t = large_scale_jitter(img, rec.instances, self.size, self.scale, self.hflip, rng, self.masks)
        target = {"boxes": torch.from_numpy(t["boxes"]), "labels": torch.from_numpy(t["labels"])}
        if self.masks:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(t["masks"]))
        return image_tensor(out), target, index


def collate(items: list) -> dict[str, Any]:
    """Samples -> {'images' (B, 3, H, W) uint8 padded with zeros at the bottom and right, 'sizes' (B, 2)
    the real (h, w), 'targets' a list, 'index', 'bad' [(path, reason)] of images that failed to load}."""
    good, bad = split_bad(items)
    if not good:
        return {"images": None, "sizes": None, "targets": None, "index": None, "bad": bad}
    imgs, targets, index = zip(*good, strict=True)
    H, W = max(i.shape[1] for i in imgs), max(i.shape[2] for i in imgs)
    batch = torch.zeros((len(imgs), 3, H, W), dtype=torch.uint8)
    for img, slot in zip(imgs, batch, strict=True):
        slot[:, : img.shape[1], : img.shape[2]] = img
    return {
        "images": batch,
        "sizes": torch.tensor([i.shape[1:] for i in imgs], dtype=torch.long),
        "targets": list(targets),
        "index": torch.as_tensor(index, dtype=torch.long),
        "bad": bad,
    }


def unpad(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's images as float RGB in [0, 1], each at its own size (what torchvision's detectors take)."""
    return [
        img[:, :h, :w].float().div_(255) for img, (h, w) in zip(batch["images"], batch["sizes"].tolist(), strict=True)
    ]
