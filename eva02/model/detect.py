"""Mask R-CNN on the EVA-02 dense backbone, built from torchvision's detection models (ViTDet layout).

The detector is torchvision's `MaskRCNN` (`torchvision/models/detection/mask_rcnn.py`) whose backbone
is our `DenseBackbone` with the simple feature pyramid and its p6 level (`dense.py`), returning the
p2-p6 maps as torchvision's FPN does. Heads follow detectron2's ViTDet Mask R-CNN
(`configs/common/models/mask_rcnn_vitdet.py`, the base of EVA-02 `det/`): an RPN head with two 3x3
convolutions, one anchor size per level (32-512) with aspect ratios 0.5/1/2, a box head of four
convolutions with channel LayerNorm and one 1024-wide fully connected layer, a mask head of four
convolutions with LayerNorm, RoI pooling over p2-p5.

Input handling follows ViTDet: the data pipeline makes the training images (large-scale jitter, then
a crop of at most `img_size` square), so training batches are only normalised; test images are resized
so that their long side is `img_size`; every batch is padded to an `img_size` square.

What torchvision fixes and detectron2 sets otherwise: RoIAlign without the half-pixel offset
(detectron2's ROIAlignV2 has it), smooth-L1 box losses with beta 1/9 (ViTDet: L1), the RPN's and
heads' initialisations. EVA-02's COCO results use Cascade R-CNN heads (three box stages at IoU 0.5,
0.6, 0.7), which torchvision does not have; see docs/detection.md.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from eva02.model.config import Eva02Config
from eva02.model.dense import DenseBackbone, LayerNorm2d, SimpleFeaturePyramid
from eva02.model.vit import Eva02

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # detectron2's imagenet_rgb256_mean / 255 (the official det configs)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEVELS = ("p2", "p3", "p4", "p5", "p6")  # strides 4-64 for a patch size of 16
PAD_MULTIPLE = 64  # the stride of p6: every level's grid then divides the padded image exactly


@dataclass(frozen=True)
class DetectorConfig:
    """A Mask R-CNN on an EVA-02 dense backbone: everything that builds one (saved with its weights)."""

    backbone: Eva02Config  # a dense config (no class token, windows, see `config.dense_config`)
    num_classes: int  # object classes, without the background
    out_channels: int = 256  # of the pyramid maps, and the width of the heads' convolutions
    roi_batch_per_image: int = 512  # proposals sampled per image to train the box and mask heads
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level, p2-p6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    mean: tuple[float, ...] = IMAGENET_MEAN  # of images in [0, 1], RGB
    std: tuple[float, ...] = IMAGENET_STD
    masks: bool = True  # Mask R-CNN; False: Faster R-CNN (boxes only)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_top_n: tuple[int, ...] = (2000, 1000)  # per level, (training, testing)
    rpn_post_nms_top_n: tuple[int, ...] = (1000, 1000)  # per image, (training, testing)

    def __post_init__(self) -> None:
        b = self.backbone
        problems = []
        if b.cls_token or b.num_classes:
            problems.append("the backbone must be a dense config (no class token nor head; see dense_config)")
        if self.num_classes < 1:
            problems.append(f"num_classes={self.num_classes} must be >= 1")
        if len(self.anchor_sizes) != len(LEVELS):
            problems.append(f"anchor_sizes needs one size per level {LEVELS}, got {self.anchor_sizes}")
        if b.img_size % PAD_MULTIPLE:
            problems.append(f"img_size={b.img_size} must be a multiple of {PAD_MULTIPLE} (the stride of p6)")
        if problems:
            raise ValueError("invalid DetectorConfig: " + "; ".join(problems))

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    def to_dict(self) -> dict[str, Any]:
        return {"task": "detect", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        """Build from `to_dict` output (JSON lists read as tuples); unknown keys are refused."""
        d = {k: v for k, v in d.items() if k != "task"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DetectorConfig keys {unknown}; valid keys: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**{**d, "backbone": Eva02Config.from_dict(dict(d["backbone"]))})


class PyramidBackbone(DenseBackbone):
    """The dense backbone with the simple pyramid as torchvision's detectors take a backbone: an
    `out_channels` attribute and an OrderedDict of maps from the finest (p2) to the coarsest (p6)."""

    def __init__(self, vit: Eva02, pyramid: SimpleFeaturePyramid) -> None:
        super().__init__(vit, pyramid)
        self.out_channels = pyramid.out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(super().forward(images))


class SquareTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with ViTDet's input handling.

    Training images come resized and cropped by the data pipeline (large-scale jitter) and are only
    normalised; test images are resized so that the long side is `size` (detectron2's
    ResizeShortestEdge(size, max_size=size)). Batches are padded with zeros after normalisation to a
    square of at least `size` (ViTDet's `square_pad`), in multiples of 64.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(min_size=size, max_size=size, image_mean=list(mean), image_std=list(std),
                         size_divisible=PAD_MULTIPLE)  # fmt: skip
        self.size = size

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        if self.training:
            return image, target
        return super().resize(image, target)

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = PAD_MULTIPLE) -> torch.Tensor:
        h = max(self.size, max(img.shape[-2] for img in images))
        w = max(self.size, max(img.shape[-1] for img in images))
        H, W = (math.ceil(s / size_divisible) * size_divisible for s in (h, w))
        batch = images[0].new_zeros((len(images), images[0].shape[0], H, W))  # (B, 3, H, W)
        for img, slot in zip(images, batch, strict=True):
            slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        return batch


class Eva02MaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN (or Faster R-CNN with `masks=False`) on an EVA-02 dense backbone.

    `model(images, targets)` in training mode gives torchvision's loss dict; in eval mode `model(images)`
    gives per image `boxes` (x1, y1, x2, y2 in input pixels), `labels` (1..num_classes; 0 is the
    background), `scores` and `masks` (N, 1, H, W probabilities). Images are float RGB in [0, 1].
    """

    def __init__(self, cfg: DetectorConfig, vit: Eva02 | None = None) -> None:
        vit = vit if vit is not None else Eva02(cfg.backbone)
        if vit.cfg != cfg.backbone:
            raise ValueError("the given Eva02 is not built from cfg.backbone")
        # The pyramid reads the last block's raw tokens (ViTDet): the headless model's final norm is
        # never used, and a parameter without gradient stalls DistributedDataParallel.
        vit.norm = nn.Identity()
        c = cfg.out_channels
        pyramid = SimpleFeaturePyramid(vit.cfg.dim, vit.cfg.patch_size, c, top_level=True)
        backbone = PyramidBackbone(vit, pyramid)
        if tuple(pyramid.levels) != LEVELS:
            raise ValueError(f"the pyramid gives {pyramid.levels}, not {LEVELS}: use a patch size of 16")
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * len(LEVELS))
        # RoIAlign with adaptive sampling (sampling_ratio=0), as detectron2's poolers.
        box_pool = MultiScaleRoIAlign(list(LEVELS[:4]), output_size=7, sampling_ratio=0)
        mask_pool = MultiScaleRoIAlign(list(LEVELS[:4]), output_size=14, sampling_ratio=0)
        super().__init__(
            backbone,
            box_predictor=FastRCNNPredictor(1024, cfg.num_classes + 1),  # torchvision counts the background
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(c, len(cfg.aspect_ratios), conv_depth=2),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n[0],
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n[1],
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n[0],
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n[1],
            box_roi_pool=box_pool,
            box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [1024], norm_layer=LayerNorm2d),
            box_score_thresh=cfg.score_thresh,
            box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img,
            box_batch_size_per_image=cfg.roi_batch_per_image,
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=LayerNorm2d),
            mask_predictor=MaskRCNNPredictor(c, c, cfg.num_classes + 1),
        )
        if not cfg.masks:  # MaskRCNN always builds the mask branch; without masks it is Faster R-CNN
            self.roi_heads.mask_roi_pool = self.roi_heads.mask_head = self.roi_heads.mask_predictor = None
        self.transform = SquareTransform(cfg.img_size, cfg.mean, cfg.std)
        self.cfg = cfg

    @property
    def vit(self) -> Eva02:
        return self.backbone.vit

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (the engine shards and counts layers by them)."""
        return self.backbone.vit.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone blocks' activations in the backward pass (the heads are small)."""
        self.backbone.vit.set_grad_checkpointing(enable)
