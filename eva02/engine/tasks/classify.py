"""Image classification (fine-tuning): label-smoothed cross-entropy with optional mixup / cutmix, top-1 /
top-5 validation; the official EVA-02 fine-tuning recipe (`asuka/engine_for_finetuning.py`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eva02.data.datasets import build_dataset, collate
from eva02.data.hf import hf_dataset
from eva02.data.mixup import Mixup
from eva02.data.shards import RecordDataset, shard_dataset
from eva02.engine.evaluate import evaluate_classifier
from eva02.engine.tasks.base import build_eva02
from eva02.weights.zoo import Preprocess

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)), in fp32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _align_classes(val, classes: list[str]) -> None:
    """Give validation folders the train label of the same name (a split may lack some classes)."""
    unknown = sorted(set(val.classes) - set(classes))
    if unknown:
        raise ValueError(
            f"validation class folders {unknown[:5]} are not train classes; both splits need the same class names"
        )
    index = {c: i for i, c in enumerate(classes)}
    val.samples = [(p, index[val.classes[lab]]) for p, lab in val.samples]
    val.classes = list(classes)


def build_split(cfg: RunConfig, which: str, transform: Callable) -> Dataset:
    """Split `which` ('train' or 'val') in the run's `data.format`: folders or a list file, tar shards, or a
    Hugging Face dataset; every one indexable, so order and augmentation follow (seed, epoch, index), except
    train shards with data.streaming (a stream dealt out by (seed, epoch), `eva02.data.shard_stream`)."""
    d = cfg.data
    split = d.train_split if which == "train" else d.val_split
    if d.format == "wds":
        spec = (d.train_shards if which == "train" else d.val_shards) or os.path.join(d.root, split)
        stream = d.streaming and which == "train"  # validation is always indexed (fetched when named by URL)
        return shard_dataset(spec, transform, d.shard_cache, d.class_names, stream, d.shuffle_buffer)
    if d.format == "hf":
        return hf_dataset(d.hf_name, split, transform, d.hf_image, d.hf_label, d.class_names)
    list_file = d.train_list if which == "train" else d.val_list
    if d.format == "list" and not (list_file or os.path.isfile(os.path.join(d.root, "meta", f"{split}.txt"))):
        raise FileNotFoundError(f"data.format='list' needs a list file: set data.{which}_list or write "
                                f"{os.path.join(d.root, 'meta', split + '.txt')}")  # fmt: skip
    return build_dataset(d.root, split, list_file, d.class_names, transform)


def build_val_dataset(cfg: RunConfig, train_classes: list[str] | None = None) -> Dataset:
    """The checked validation split with the eval transform (resize, center crop, normalise)."""
    from eva02.data.transforms import eval_transform  # torchvision: loaded when a run builds data, not with the config

    d, n = cfg.data, cfg.model.num_classes
    pre = Preprocess(img_size=cfg.model.img_size, mean=tuple(d.mean), std=tuple(d.std), crop_pct=d.crop_pct,
                     interpolation=d.interpolation)  # fmt: skip
    val = build_split(cfg, "val", eval_transform(pre))
    val.check(n, "validation")
    if train_classes is not None and val.classes != train_classes:
        if isinstance(val, RecordDataset):  # shards and HF datasets: labels follow the class names
            val.align_classes(train_classes)
        elif not (d.val_list or d.train_list):
            _align_classes(val, train_classes)
    return val


class ClassificationLoss(nn.Module):
    """Cross-entropy against mixed, label-smoothed soft targets."""

    def __init__(self, mixup: Mixup) -> None:
        super().__init__()
        self.mixup = mixup

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        # The loop seeds the global generator per step; mixup draws from a child of it.
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        images, soft = self.mixup(batch["images"], batch["targets"], g)
        logits = model(images)
        return soft_cross_entropy(logits, soft.to(logits.device))


class ClassificationTask:
    """Fine-tuning / training a classifier of `model.num_classes` classes."""

    best_metric = "top1"
    shown_metrics = ("top1", "top5")

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        if cfg.model.num_classes <= 0:
            raise ValueError("model.num_classes must be > 0 to train a classifier (headless configs are for init)")
        return build_eva02(cfg, load_init)

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        from eva02.data.fast_transforms import train_transform_for  # torchvision, as in build_val_dataset

        d, n = cfg.data, cfg.model.num_classes
        tt = train_transform_for(d, cfg.model.img_size)
        train = build_split(cfg, "train", tt)
        train.check_not_empty("train")
        if len(train.classes) != n:
            raise ValueError(
                f"the train dataset has {len(train.classes)} classes but model.num_classes={n}; "
                f"set model.num_classes={len(train.classes)}"
            )
        train.check(n, "train")
        return train, build_val_dataset(cfg, train.classes) if d.val_split else None

    def collate(self, items: list) -> dict[str, Any]:
        return collate(items)

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        d = cfg.data
        return ClassificationLoss(Mixup(cfg.model.num_classes, d.mixup, d.cutmix, d.mix_prob, d.mix_switch_prob,
                                        d.smoothing))  # fmt: skip

    def evaluate(
        self, cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
    ) -> dict[str, Any]:
        return evaluate_classifier(model, loader, device, cfg.model.num_classes, amp)

    def export_model(self, cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = build_eva02(cfg, load_init=False)
        model.load_state_dict(state_dict, strict=True)
        return model
