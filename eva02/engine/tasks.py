"""What the training loop trains: the `Task` protocol and the image-classification task.

The loop (`eva02.engine.train`) is the same for fine-tuning and masked-image-modelling pre-training;
a task supplies the model, the datasets and the loss. A batch is a dict of tensors (plus an optional
'bad' list of (path, reason) for images that failed to load).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from eva02.engine.config import RunConfig
from eva02.model import VARIANTS, Eva02, Eva02Config


class Task(Protocol):
    """The pieces of a training run that differ between fine-tuning and pre-training."""

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        """The single-device model on CPU, initial weights loaded (unless `load_init` is False)."""
        ...

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        """Train and (optional) validation datasets, checked: raise before training on bad data."""
        ...

    def collate(self, items: list) -> dict[str, Any]:
        """DataLoader collate_fn producing the batch dict given to `forward_loss`."""
        ...

    def forward_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss (mean over the local batch) and extra metrics to log."""
        ...

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None) -> dict:
        """Validation metrics ('top1' is used to pick the best checkpoint); {} when not applicable."""
        ...


def model_config(cfg: RunConfig) -> Eva02Config:
    """The Eva02Config of a run: the zoo entry's or variant's config with the run's overrides."""
    mc = cfg.model
    if mc.name in VARIANTS:
        base = VARIANTS[mc.name]
    else:
        from eva02.weights.zoo import resolve

        base = resolve(mc.name).cfg
    changes: dict[str, Any] = dict(
        num_classes=mc.num_classes, img_size=mc.img_size, drop_path=mc.drop_path, patch_grad_scale=mc.patch_grad_scale
    )
    for name in ("patch_size", "depth", "dim", "heads", "mlp_hidden"):
        if getattr(mc, name):
            changes[name] = getattr(mc, name)
    return base.replace(**changes)


def build_eva02(cfg: RunConfig, load_init: bool = True) -> Eva02:
    """Eva02 for the run; `model.init` weights loaded through the weights code (any known format)."""
    mc = cfg.model
    model = Eva02(model_config(cfg))
    if not (load_init and mc.init):
        return model
    from eva02.weights.load import get_model

    src_name: str | Eva02Config = mc.name if mc.name not in VARIANTS else model.cfg
    pretrained: bool | str = True if mc.init == "pretrained" else mc.init
    if mc.init == "pretrained" and mc.name in VARIANTS:
        raise ValueError(f"model.init='pretrained' needs a zoo name, but model.name={mc.name!r} is a variant")
    src = get_model(
        src_name, pretrained=pretrained, num_classes=mc.num_classes, img_size=mc.img_size, use_ema=mc.use_ema
    )
    # Copy into our own instance so the run's drop_path / patch_grad_scale / depth settings hold.
    model.load_state_dict(src.state_dict(), strict=True)
    return model


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


class ClassificationTask:
    """Fine-tuning / training a classifier: label-smoothed cross-entropy, optional mixup / cutmix."""

    def __init__(self) -> None:
        self.mixup: Callable | None = None
        self.num_classes = 0

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        if cfg.model.num_classes <= 0:
            raise ValueError("model.num_classes must be > 0 to train a classifier (headless configs are for init)")
        return build_eva02(cfg, load_init)

    def build_datasets(self, cfg: RunConfig):
        from eva02.data.datasets import build_dataset
        from eva02.data.mixup import Mixup
        from eva02.data.train_transforms import train_transform

        d = cfg.data
        tt = train_transform(
            cfg.model.img_size,
            d.mean,
            d.std,
            d.rrc_scale,
            d.rrc_ratio,
            d.hflip,
            d.randaug_n,
            d.randaug_m,
            d.randaug_mstd,
            d.reprob,
            d.interpolation,
        )
        train = build_dataset(d.root, d.train_split, d.train_list, d.class_names, tt)
        n = cfg.model.num_classes
        train.check_not_empty("train")
        if len(train.classes) != n:
            raise ValueError(
                f"the train dataset has {len(train.classes)} classes but model.num_classes={n}; "
                f"set model.num_classes={len(train.classes)}"
            )
        train.check(n, "train")
        val = self.build_val_dataset(cfg, train.classes) if d.val_split else None
        self.num_classes = n
        self.mixup = Mixup(n, d.mixup, d.cutmix, d.mix_prob, d.mix_switch_prob, d.smoothing)
        return train, val

    def build_val_dataset(self, cfg: RunConfig, train_classes: list[str] | None = None) -> Dataset:
        """The checked validation split with the eval transform (resize, center crop, normalise)."""
        from eva02.data.datasets import build_dataset
        from eva02.data.transforms import eval_transform
        from eva02.weights.zoo import Preprocess

        d, n = cfg.data, cfg.model.num_classes
        pre = Preprocess(img_size=cfg.model.img_size, mean=tuple(d.mean), std=tuple(d.std), crop_pct=d.crop_pct,
                         interpolation=d.interpolation)  # fmt: skip
        val = build_dataset(d.root, d.val_split, d.val_list, d.class_names, eval_transform(pre))
        val.check(n, "validation")
        if train_classes is not None and not (d.val_list or d.train_list) and val.classes != train_classes:
            _align_classes(val, train_classes)
        self.num_classes = n
        return val

    def collate(self, items: list) -> dict[str, Any]:
        from eva02.data.datasets import collate

        return collate(items)

    def forward_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = batch["images"], batch["targets"]
        # The loop seeds the global generator per step; mixup draws from a child of it.
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        images, soft = self.mixup(images, targets, g)
        logits = model(images)
        return soft_cross_entropy(logits, soft.to(logits.device)), {}

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None) -> dict:
        from eva02.engine.evaluate import evaluate_classifier

        return evaluate_classifier(model, loader, device, self.num_classes, amp)
