"""Using what a run produced: a checkpoint's weights in the run's model (`load_weights`), the test-time
evaluation behind `eva02 test` / `tools/test.py` (`run_test`), and the backbone of a pre-training
checkpoint (`export_backbone`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eva02 import hints
from eva02.data.datasets import collate
from eva02.engine import checkpoint as ckpt
from eva02.engine.config import RunConfig, override
from eva02.engine.dist import init_distributed
from eva02.engine.evaluate import evaluate_classifier
from eva02.engine.loader import eval_loader
from eva02.engine.tasks import MimTask, ZeroShotTask, build_eva02
from eva02.engine.tasks.classify import build_val_dataset
from eva02.engine.tasks.detect import evaluate_checkpoint as evaluate_detection
from eva02.engine.tasks.segment import evaluate_checkpoint as evaluate_segmentation
from eva02.weights.load import check_finite, load_checkpoint, save_checkpoint


def load_weights(cfg: RunConfig, checkpoint: str | os.PathLike, use_ema: bool | None = None) -> nn.Module:
    """The run's model with weights from a training checkpoint (ours) or any format the weights code reads."""
    model = build_eva02(cfg, load_init=False)
    if ckpt.is_training_checkpoint(checkpoint):
        state = ckpt.load(checkpoint)
        if use_ema and state.get("ema") is None:
            raise ValueError(f"{checkpoint} has no EMA weights (ema.enabled was off); drop --use-ema")
        weights = state["ema"] if use_ema else state["model"]
        check_finite(weights, checkpoint)  # NaN/Inf weights would print a meaningless top-1
        model.load_state_dict(weights, strict=True)
    else:
        load_checkpoint(model, checkpoint, use_ema=use_ema)
    return model


def run_test(
    cfg: RunConfig, checkpoint: str, use_ema: bool | None = None, amp: torch.dtype | None = None, batch_size: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """Evaluate a classifier checkpoint (or, for train.task='zero_shot', a CLIP checkpoint through its
    zero-shot classifier; for 'segment', a segmentor) on the config's validation split (torchrun-aware);
    returns (metrics, class names)."""
    if not cfg.data.val_split:
        raise ValueError("data.val_split is empty: nothing to evaluate; set --cfg-options data.val_split=val")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    info = init_distributed()
    if cfg.train.task == "detect":  # a detector checkpoint: COCO box / mask AP
        with hints.using(hints.CONFIG):
            return evaluate_detection(cfg, checkpoint, use_ema, amp, batch_size, info)
    if cfg.train.task == "segment":  # a segmentor checkpoint: mIoU / mAcc / aAcc, per-class IoU
        with hints.using(hints.CONFIG):
            return evaluate_segmentation(cfg, checkpoint, use_ema, amp, batch_size, info)
    with hints.using(hints.CONFIG):  # loading errors name config fields (model.num_classes=N, ...)
        if cfg.train.task == "zero_shot":  # an EVA-02-CLIP file of any format, prompts from the config
            run = override(cfg, {"model.init": str(checkpoint)}, "the checkpoint")
            model = ZeroShotTask().build_model(run).to(info.device)
        else:
            model = load_weights(cfg, checkpoint, use_ema).to(info.device)
    val = build_val_dataset(cfg)
    loader = eval_loader(val, cfg, batch_size, info.rank, info.world_size, collate)
    return evaluate_classifier(model, loader, info.device, cfg.model.num_classes, amp, len(val)), val.classes


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike, use_ema: bool = False) -> Path:
    """Write the headless backbone of a pre-training checkpoint (`checkpoints/*.pt`) in our safetensors format.

    The result loads with `get_model(None, pretrained=out)` and serves as `model.init` of fine-tune configs.
    """
    state = ckpt.load(checkpoint)
    cfg = RunConfig.from_dict(state["config"])
    weights = state["ema"] if use_ema else state["model"]
    if weights is None:
        raise ValueError(f"{checkpoint} holds no EMA weights; export without use_ema")
    if not any(k.startswith("backbone.") for k in weights):
        raise ValueError(f"{checkpoint} is not a pre-training checkpoint (no backbone.* weights)")
    return save_checkpoint(MimTask().export_model(cfg, weights), out)
