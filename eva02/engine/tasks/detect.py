"""Object detection and instance segmentation as a task of the training loop (`train.task='detect'`):
Mask R-CNN on the dense EVA-02 backbone (ViTDet; EVA-02 `det/`), COCO-format data, COCO box / mask AP.

The model section names the backbone (`model.name`, `model.init`: any zoo name or weight file the
weights code reads, `get_model`; the class token goes and the patch kernel and position embedding are
resampled to the dense layout, `fit_to_config`), `model.img_size` the square input, `model.num_classes`
the object classes (without the background). `model.init` may also be an official EVA-02 detectron2
checkpoint: its backbone (`backbone.net.*` ViT, `backbone.simfp_*` pyramid) is read through the key
table below, its RPN and Cascade R-CNN heads are reported as not used.
Images are `{data.root}/{split}/`, annotations `det.train_ann` / `det.val_ann` (default
`{data.root}/annotations/instances_{split}.json`, COCO's layout). The deliverable (final.safetensors)
is the whole detector, its `DetectorConfig` in the metadata.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from eva02.engine import checkpoint as ckpt
from eva02.engine.coco_eval import evaluate_detector
from eva02.engine.dist import DistInfo
from eva02.engine.loader import eval_loader
from eva02.engine.tasks.base import model_config
from eva02.model.config import VARIANTS, dense_config
from eva02.model.vit import Eva02
from eva02.weights.convert import fit_to_config, to_ours
from eva02.weights.files import check_finite, read_checkpoint
from eva02.weights.load import config_of, get_model, state_mismatch

if TYPE_CHECKING:  # torchvision's detection models load when a run builds its model, not with the config
    from eva02.data.coco import CocoDetection
    from eva02.engine.config import RunConfig
    from eva02.model.detect import DetectorConfig, Eva02MaskRCNN

StateDict = dict[str, torch.Tensor]

# ------------------------------------------------------------------------ official checkpoints
# EVA-02 `det/` checkpoints (detectron2): the ViT under `backbone.net.` in BAAI's layout (the OFFICIAL
# table of weights/convert.py: q/k/v_proj, q/v_bias, w1/w2/ffn_ln/w3; RoPE buffers dropped there), the
# simple pyramid as `backbone.simfp_{level}.{layer}`, the RPN and heads under the prefixes not used here.
D2_VIT = "backbone.net."
# The layers of each pyramid stage as ViTDet's SimpleFeaturePyramid builds them (nn.Sequential
# indices): 'deconv' and 'norm' keep their names; 'conv_norm' is detectron2's Conv2d with a norm
# (`weight`, `norm.weight`, `norm.bias`), ours a ConvNorm (`conv.weight`, `norm.*`); None has no weights.
D2_PYRAMID: dict[int, tuple[str | None, ...]] = {
    2: ("deconv", "norm", None, "deconv", "conv_norm", "conv_norm"),
    3: ("deconv", "conv_norm", "conv_norm"),
    4: ("conv_norm", "conv_norm"),
    5: (None, "conv_norm", "conv_norm"),
}
D2_NOT_USED = ("proposal_generator.", "roi_heads.", "pixel_mean", "pixel_std")  # Cascade heads: start fresh


def d2_pyramid_keys() -> dict[str, str]:
    """Their pyramid key -> ours, for every tensor of the four stages (from `D2_PYRAMID`)."""
    out = {}
    for level, layers in D2_PYRAMID.items():
        theirs, ours = f"backbone.simfp_{level}.", f"backbone.pyramid.stages.p{level}."
        for j, kind in enumerate(layers):
            if kind in ("deconv", "norm"):
                out.update({f"{theirs}{j}.{p}": f"{ours}{j}.{p}" for p in ("weight", "bias")})
            elif kind == "conv_norm":
                out[f"{theirs}{j}.weight"] = f"{ours}{j}.conv.weight"
                out.update({f"{theirs}{j}.norm.{p}": f"{ours}{j}.norm.{p}" for p in ("weight", "bias")})
    return out


def is_detectron2(sd: StateDict) -> bool:
    return any(k.startswith(D2_VIT) for k in sd)


def from_detectron2(sd: StateDict, cfg: DetectorConfig) -> tuple[StateDict, list[str]]:
    """Our backbone keys (`backbone.vit.*`, `backbone.pyramid.*`) from an official EVA-02 det state dict,
    fitted to `cfg`, and the keys not used (RPN and heads). A key of no known part is an error."""
    pyramid = d2_pyramid_keys()
    unknown = [k for k in sd if not (k.startswith(D2_VIT) or k in pyramid or k.startswith(D2_NOT_USED))]
    if unknown:
        raise ValueError(f"keys of no part of an EVA-02 det checkpoint: {', '.join(unknown[:6])}")
    missing = [k for k in pyramid if k not in sd]
    if missing:
        raise ValueError(f"the EVA-02 det checkpoint lacks pyramid tensors: {', '.join(missing[:6])}")
    vit = to_ours({k[len(D2_VIT) :]: v for k, v in sd.items() if k.startswith(D2_VIT)}, "official")
    out = {f"backbone.vit.{k}": v for k, v in fit_to_config(vit, cfg.backbone).items()}
    out.update({ours: sd[theirs] for theirs, ours in pyramid.items()})
    return out, sorted(k for k in sd if k.startswith(D2_NOT_USED))


def load_backbone(model: Eva02MaskRCNN, sd: StateDict, where: str) -> None:
    """Load backbone weights (`backbone.*` keys, every one of them) into the detector; heads stay as they are."""
    want = {k: v.shape for k, v in model.state_dict().items() if k.startswith("backbone.")}
    found = state_mismatch(want, sd)
    if found is not None:
        raise ValueError(f"{where} does not fit the detector's backbone: {found[0]}; check model.name and its options")
    model.load_state_dict(sd, strict=False)


# -------------------------------------------------------------------------------------- model
def detector_config(cfg: RunConfig) -> DetectorConfig:
    """The detector of a run: the model section's backbone in the dense layout, the det section's heads."""
    from eva02.model.detect import DetectorConfig

    mc, d = cfg.model, cfg.det
    # ViTDet's pyramid (strides 4-64) is built for 16 px patches: the default unless model.patch_size says
    base = model_config(dataclasses.replace(cfg, model=dataclasses.replace(mc, patch_size=mc.patch_size or 16)))
    backbone = dense_config(base, mc.img_size, d.window_size, d.global_blocks or None, base.patch_size)
    return DetectorConfig(
        backbone, mc.num_classes, out_channels=d.out_channels, roi_batch_per_image=d.roi_batch_per_image,
        anchor_sizes=d.anchor_sizes, aspect_ratios=d.aspect_ratios, mean=cfg.data.mean, std=cfg.data.std,
        masks=d.masks, score_thresh=d.score_thresh, nms_thresh=d.nms_thresh, detections_per_img=d.detections_per_img,
        rpn_pre_nms_top_n=d.rpn_pre_nms_top_n, rpn_post_nms_top_n=d.rpn_post_nms_top_n,
    )  # fmt: skip


def _source_backbone(cfg: RunConfig) -> Eva02:
    """The init model of `model.init` through the weights code: a zoo name's weights, or a file (ours with
    its config; other formats as the variant `model.name` with the model section's overrides)."""
    mc = cfg.model
    if mc.name not in VARIANTS:
        return get_model(mc.name, pretrained=True if mc.init == "pretrained" else mc.init, use_ema=mc.use_ema)
    if config_of(mc.init) is not None:
        return get_model(None, pretrained=mc.init, use_ema=mc.use_ema)
    arch = {n: getattr(mc, n) for n in ("depth", "dim", "heads", "mlp_hidden") if getattr(mc, n)}
    return get_model(VARIANTS[mc.name].replace(**arch), pretrained=mc.init, use_ema=mc.use_ema)


def init_backbone(cfg: RunConfig, model: Eva02MaskRCNN) -> list[str]:
    """Load `model.init` into the detector's backbone; returns the keys of the file not used (heads)."""
    mc = cfg.model
    if mc.init != "pretrained":
        sd = read_checkpoint(mc.init, mc.use_ema)
        if is_detectron2(sd):
            weights, unused = from_detectron2(sd, model.cfg)
            load_backbone(model, weights, mc.init)
            return unused
    src = _source_backbone(cfg).state_dict()
    # A classifier's head and the final norms go: the pyramid reads the last block's raw tokens.
    vit = {k: v for k, v in src.items() if not k.startswith(("head.", "fc_norm.", "norm."))}
    weights = {f"backbone.vit.{k}": v for k, v in fit_to_config(vit, model.cfg.backbone).items()}
    pyramid = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.pyramid.")}
    load_backbone(model, {**weights, **pyramid}, mc.init)
    return []


def load_detector(cfg: RunConfig, checkpoint: str | os.PathLike, use_ema: bool | None = None) -> Eva02MaskRCNN:
    """The run's detector with the weights of a training checkpoint (.pt) or of its final.safetensors."""
    model = build_detector(cfg)
    if ckpt.is_training_checkpoint(checkpoint):
        state = ckpt.load(checkpoint)
        if use_ema and state.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights (ema.enabled was off); drop --use-ema")
        weights = state["ema"] if use_ema else state["model"]
        check_finite(weights, str(checkpoint))
    else:
        weights = read_checkpoint(checkpoint, use_ema)
        if is_detectron2(weights):
            raise ValueError(
                f"{checkpoint} is an official EVA-02 detectron2 checkpoint: its Cascade R-CNN heads do not fit "
                "torchvision's Mask R-CNN, so it cannot detect here; fine-tune from it (model.init) instead"
            )
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        shown = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ValueError(f"{checkpoint} is not a detector of this config ({shown}); check the config and the file")
    model.load_state_dict(weights, strict=True)
    return model


def build_detector(cfg: RunConfig) -> Eva02MaskRCNN:
    """The run's detector, randomly initialised."""
    from eva02.model.detect import Eva02MaskRCNN

    return Eva02MaskRCNN(detector_config(cfg))


# --------------------------------------------------------------------------------------- data
def annotation_file(cfg: RunConfig, split: str, given: str) -> str:
    return given or os.path.join(cfg.data.root, "annotations", f"instances_{split}.json")


def build_val_dataset(cfg: RunConfig) -> CocoDetection:
    from eva02.data.coco import CocoDetection

    d = cfg.data
    val = CocoDetection(os.path.join(d.root, d.val_split), annotation_file(cfg, d.val_split, cfg.det.val_ann),
                        train=False, size=cfg.model.img_size, masks=cfg.det.masks)  # fmt: skip
    val.check_not_empty("validation")
    return val


class DetectionLoss(nn.Module):
    """The sum of torchvision's losses (RPN objectness and boxes, box classes and boxes, masks)."""

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        from eva02.data.coco import unpad

        images = unpad(batch)
        device = images[0].device
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]
        return sum(model(images, targets).values())


# --------------------------------------------------------------------------------------- task
class DetectionTask:
    """Mask R-CNN (or Faster R-CNN with det.masks=False) on the dense backbone; COCO AP validation."""

    best_metric = "bbox_AP"
    shown_metrics = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        model = build_detector(cfg)
        if load_init and cfg.model.init:
            unused = init_backbone(cfg, model)
            if unused:
                warnings.warn(f"{cfg.model.init}: backbone loaded; {len(unused)} tensors of its RPN and heads "
                              "(proposal_generator.*, roi_heads.*) are not used", stacklevel=2)  # fmt: skip
        return model

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        from eva02.data.coco import CocoDetection

        d, det = cfg.data, cfg.det
        train = CocoDetection(os.path.join(d.root, d.train_split), annotation_file(cfg, d.train_split, det.train_ann),
                              train=True, size=cfg.model.img_size, scale=det.lsj_scale, hflip=d.hflip,
                              masks=det.masks)  # fmt: skip
        train.check_not_empty("train")
        if len(train.classes) != cfg.model.num_classes:
            raise ValueError(
                f"{train.ann_file} has {len(train.classes)} categories but model.num_classes="
                f"{cfg.model.num_classes}; set model.num_classes={len(train.classes)}"
            )
        return train, build_val_dataset(cfg) if d.val_split else None

    def collate(self, items: list) -> dict[str, Any]:
        from eva02.data.coco import collate

        return collate(items)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        return DetectionLoss()

    def evaluate(
        self, cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
    ) -> dict[str, Any]:
        return evaluate_detector(model, loader, device, amp, cfg.det.masks)[0]

    def export_model(self, cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = build_detector(cfg)
        model.load_state_dict(state_dict, strict=True)
        return model


def evaluate_checkpoint(
    cfg: RunConfig, checkpoint: str, use_ema: bool | None, amp: torch.dtype | None, batch_size: int, info: DistInfo
) -> tuple[dict[str, Any], list[str]]:
    """`eva02 test` for a detector: COCO AP of a checkpoint on the validation split; (metrics, class names)."""
    from eva02.data.coco import collate

    model = load_detector(cfg, checkpoint, use_ema).to(info.device)
    val = build_val_dataset(cfg)
    loader = eval_loader(val, cfg, batch_size, info.rank, info.world_size, collate)
    metrics, _ = evaluate_detector(model, loader, info.device, amp, cfg.det.masks)
    return metrics, val.classes
