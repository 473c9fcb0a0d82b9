"""Semantic segmentation as a task of the training loop (`train.task='segment'`): EVA-02 + UperNet.

The official recipe (`EVA-02/seg`, mmseg 0.29 `EncoderDecoder`): the backbone starts from a MIM
checkpoint (any zoo name or weight file: the patch kernel and position embedding are resampled to
the run's patch and grid; a class token is dropped when the layout has none), the heads from scratch.
Loss: per-pixel cross-entropy on the decode logits upsampled to the label size, plus 0.4 x the same
on the auxiliary head's; ignored pixels (255) count as zero loss and the mean runs over all pixels
(mmseg's default `avg_non_ignore=False`). Validation: sliding windows of `model.img_size`,
`seg.stride` apart, on images resized within `seg.scale`; mIoU / mAcc / aAcc at the label maps' size.
The deliverable (final.safetensors) is the whole segmentor, its `SegmentorConfig` in the metadata.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eva02.data.segmentation import (
    ADE20K_CLASSES,
    IGNORE,
    SegDataset,
    SegEvalTransform,
    SegTrainTransform,
    check_sizes,
    collate_seg,
    find_pairs,
)
from eva02.engine import checkpoint as ckpt
from eva02.engine.dist import DistInfo
from eva02.engine.loader import eval_loader
from eva02.engine.optim import layer_id
from eva02.engine.seg_eval import evaluate_segmentor
from eva02.engine.tasks.base import model_config
from eva02.model.config import VARIANTS, Eva02Config, dense_config
from eva02.model.seg import Segmentor, SegmentorConfig
from eva02.weights.convert import fit_to_config
from eva02.weights.files import check_finite, read_checkpoint, read_metadata
from eva02.weights.load import get_model, state_mismatch
from eva02.weights.official_seg import is_official_seg, official_seg_to_ours

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig

# Final norms and heads of an init checkpoint: the segmentor reads raw block outputs.
_NOT_BACKBONE = ("norm.", "fc_norm.", "head.")


# -------------------------------------------------------------------------------------- model
def backbone_config(cfg: RunConfig) -> Eva02Config:
    """The backbone of the run: the model section's config, headless, in the seg layout's form."""
    s = cfg.seg
    base = model_config(cfg).replace(num_classes=0, pool="avg")
    if s.window_size:
        return dense_config(base, base.img_size, s.window_size, s.global_blocks or None, base.patch_size)
    return base.replace(cls_token=s.cls_token)


def segmentor_config(cfg: RunConfig) -> SegmentorConfig:
    s = cfg.seg
    if cfg.model.num_classes < 1:
        raise ValueError("model.num_classes must be the number of segmentation classes (150 for ADE20K)")
    return SegmentorConfig(backbone_config(cfg), cfg.model.num_classes, s.out_indices, s.channels, s.aux_channels,
                           s.pool_scales, s.dropout)  # fmt: skip


def init_backbone(cfg: RunConfig, model: Segmentor) -> None:
    """Load `model.init` (a zoo name's weights or a file of any known format) into the backbone."""
    mc = cfg.model
    if mc.init == "pretrained" and mc.name in VARIANTS:
        raise ValueError(f"model.init='pretrained' needs a zoo name, but model.name={mc.name!r} is a variant")
    source: str | Eva02Config = mc.name if mc.name not in VARIANTS else model_config(cfg).replace(num_classes=0)
    src = get_model(source, pretrained=True if mc.init == "pretrained" else mc.init, use_ema=mc.use_ema)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(_NOT_BACKBONE)}
    model.backbone.load_state_dict(fit_to_config(sd, model.backbone.cfg), strict=True)


def load_segmentor(cfg: RunConfig, checkpoint: str, use_ema: bool | None = None) -> Segmentor:
    """The run's segmentor with the weights of a training checkpoint (.pt), a final .safetensors or an
    official EVA-02 seg checkpoint (mmseg .pth, `weights/official_seg.py`)."""
    model = Segmentor(segmentor_config(cfg))
    if ckpt.is_training_checkpoint(checkpoint):
        state = ckpt.load(checkpoint)
        if use_ema and state.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights (ema.enabled was off); drop --use-ema")
        weights = state["ema"] if use_ema else state["model"]
        check_finite(weights, checkpoint)
    else:
        meta = read_metadata(checkpoint)
        if meta.get("config") and json.loads(meta["config"]).get("kind") != "segmentor":
            raise ValueError(f"{checkpoint} holds an EVA-02 backbone or classifier, not a segmentor; set it as "
                             "model.init to fine-tune a segmentor from it")  # fmt: skip
        weights = read_checkpoint(checkpoint, use_ema)
        if is_official_seg(weights):  # an official EVA-02 seg (mmseg) file: through its key table
            weights, _ = official_seg_to_ours(weights, model.cfg, checkpoint)  # (dropped: the RoPE tables)
    load_strict(model, weights, checkpoint)
    return model


def load_strict(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with a one-line error naming the first tensor that does not fit."""
    found = state_mismatch(model.state_dict(), weights)
    if found is not None:
        raise ValueError(f"{where} does not fit the segmentor of this config ({found[0]}); use the run's config")
    model.load_state_dict(weights, strict=True)


# --------------------------------------------------------------------------------------- data
def class_names(cfg: RunConfig) -> list[str]:
    """seg.class_names (a file, one name a line), else ADE20K's for its layout and 150 classes, else class_<i>."""
    s, n = cfg.seg, cfg.model.num_classes
    if s.class_names:
        p = Path(s.class_names)
        if not p.is_file():
            raise FileNotFoundError(f"seg.class_names file {s.class_names!r} does not exist")
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != n:
            raise ValueError(f"seg.class_names has {len(names)} names for model.num_classes={n}")
        return names
    if s.layout == "ade20k" and n == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f"class_{i}" for i in range(n)]


def val_dataset(cfg: RunConfig) -> SegDataset:
    d, s = cfg.data, cfg.seg
    pairs = find_pairs(d.root, d.val_split, s.layout)
    check_sizes(pairs)
    transform = SegEvalTransform(s.scale, d.mean, d.std)
    return SegDataset(pairs, transform, cfg.model.num_classes, s.reduce_zero_label, class_names(cfg))


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits (B, C, h, w) upsampled to the labels (B, H, W); cross-entropy per pixel, 0 where ignored,
    averaged over all pixels (fp32)."""
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none").mean()


class SegLoss(nn.Module):
    """Decode-head loss + aux_weight x auxiliary-head loss."""

    def __init__(self, aux_weight: float) -> None:
        super().__init__()
        self.aux_weight = aux_weight

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images, target = batch["images"], batch["targets"]
        if images.shape[0] == 1:  # the rest of the batch was unreadable: BatchNorm needs two values per
            images, target = images.repeat(2, 1, 1, 1), target.repeat(2, 1, 1)  # channel; the mean is the same
        logits, aux = model(images, aux=True)
        loss = pixel_cross_entropy(logits, target)
        if aux is not None:
            loss = loss + self.aux_weight * pixel_cross_entropy(aux, target)
        return loss


# --------------------------------------------------------------------------------------- task
class SegmentTask:
    """Semantic segmentation: `Segmentor` (EVA-02 + UperNet + FCN auxiliary head), mIoU validation."""

    best_metric = "mIoU"
    shown_metrics = ("mIoU", "mAcc", "aAcc")

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        model = Segmentor(segmentor_config(cfg))
        depth = len(model.blocks)
        if cfg.optim.layer_decay < 1 and layer_id("backbone.blocks.0.attn.qkv.weight", depth) != 1:
            warnings.warn(
                f"optim.layer_decay={cfg.optim.layer_decay} does not reach the segmentor's backbone: the engine's "
                "layer ids (eva02/engine/optim.py) read no 'backbone.' prefix, so every parameter trains at optim.lr",
                stacklevel=2,
            )
        if load_init and cfg.model.init:
            init_backbone(cfg, model)
        return model

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        d, s = cfg.data, cfg.seg
        pairs = find_pairs(d.root, d.train_split, s.layout)
        check_sizes(pairs)
        transform = SegTrainTransform(cfg.model.img_size, s.scale, s.ratio_range, s.cat_max_ratio, d.hflip,
                                      s.photometric, d.mean, d.std)  # fmt: skip
        train = SegDataset(pairs, transform, cfg.model.num_classes, s.reduce_zero_label, class_names(cfg))
        return train, val_dataset(cfg) if d.val_split else None

    def collate(self, items: list) -> dict[str, Any]:
        return collate_seg(items)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return SegLoss(cfg.seg.aux_weight)

    def evaluate(
        self, cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
    ) -> dict[str, Any]:
        return _evaluate(cfg, model, loader, device, amp)

    def export_model(self, cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = Segmentor(segmentor_config(cfg))
        load_strict(model, state_dict, "the trained state")
        return model


def evaluate_checkpoint(
    cfg: RunConfig, checkpoint: str, use_ema: bool | None, amp: torch.dtype | None, batch_size: int, info: DistInfo
) -> tuple[dict[str, Any], list[str]]:
    """`eva02 test` of a segmentation run: mIoU / mAcc / aAcc of a checkpoint on data.val_split."""
    model = load_segmentor(cfg, checkpoint, use_ema).to(info.device)
    val = val_dataset(cfg)
    loader = eval_loader(val, cfg, batch_size, info.rank, info.world_size, collate_seg)
    return _evaluate(cfg, model, loader, info.device, amp, len(val)), val.classes


def _evaluate(cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None,
              n_total: int | None = None) -> dict[str, Any]:  # fmt: skip
    """mIoU / mAcc / aAcc with the config's test settings (sliding windows of model.img_size, scales, flip)."""
    s = cfg.seg
    return evaluate_segmentor(model, loader, device, cfg.model.num_classes, amp, n_total, cfg.model.img_size,
                              s.stride, s.test_scales, s.test_flip)  # fmt: skip
