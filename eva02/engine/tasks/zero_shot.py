"""EVA-02-CLIP on the engine: zero-shot evaluation (`train.task='zero_shot'`, run by `tools/test.py`) and
the zero-shot head that initialises a classifier fine-tuned from a CLIP model.

Class names and prompts come from the `clip` section of the config (`ClipCfg`). A zero-shot classifier
scores an image by the cosine between its embedding and each class's mean prompt embedding, times the
model's logit scale. The fine-tuning init folds the tower's projection and that head into one linear
layer on the pooled class token: `W = head^T P`, `b = head^T p` for the projection `P x + p`, so the
initial classifier predicts exactly the zero-shot labels (its logits skip the image embedding's
normalisation, a positive factor per image, so the argmax is the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from eva02.engine.evaluate import evaluate_classifier
from eva02.model.clip import Eva02Clip
from eva02.model.vit import Eva02

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig


def _lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def class_names(cfg: RunConfig, split: str) -> list[str]:
    """The class names prompts are made of, in label order (see `ClipCfg.class_names`)."""
    from eva02.clip import imagenet_classnames

    c, d = cfg.clip, cfg.data
    if c.class_names == "imagenet":
        return imagenet_classnames()
    if c.class_names:
        return _lines(c.class_names, "clip.class_names")
    if d.class_names:
        names = _lines(d.class_names, "data.class_names")
    else:
        folder = Path(d.root) / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"no class folders at {str(folder)!r} to name the classes; set clip.class_names to 'imagenet' or a file"
            )
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [n.replace("_", " ") for n in names]


def templates(cfg: RunConfig) -> list[str]:
    """The prompt templates (see `ClipCfg.templates`); each has one '{}' for the class name."""
    from eva02.clip import imagenet_templates

    t = cfg.clip.templates
    out = imagenet_templates() if t == "imagenet" else _lines(t, "clip.templates") if t.endswith(".txt") else [t]
    bad = [x for x in out if "{}" not in x]
    if bad:
        raise ValueError(f"clip.templates: {bad[0]!r} has no '{{}}' where the class name goes")
    return out


class ZeroShotClassifier(nn.Module):
    """Images -> logits over the classes of a zero-shot head: logit_scale * cos(image, class prompts)."""

    def __init__(self, clip: Eva02Clip, head: torch.Tensor) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("head", head)  # (E, C) normalised class embeddings

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.clip.encode_image(images, normalize=True)  # (B, E)
        return self.clip.logit_scale.exp() * emb @ self.head.to(emb.dtype)  # (B, C)


def zero_shot_model(cfg: RunConfig, clip: Eva02Clip, split: str) -> ZeroShotClassifier:
    from eva02.clip import zero_shot_classifier

    names = class_names(cfg, split)
    if cfg.model.num_classes and len(names) != cfg.model.num_classes:
        raise ValueError(
            f"{len(names)} class names for model.num_classes={cfg.model.num_classes}; "
            f"set model.num_classes={len(names)} or give clip.class_names"
        )
    return ZeroShotClassifier(clip, zero_shot_classifier(clip, names, templates(cfg)))


def init_from_clip(cfg: RunConfig, model: Eva02, clip: Eva02Clip) -> Eva02:
    """Give a classifier `model` (built from the CLIP tower's config) the tower's weights and, as its head,
    the projection folded with the zero-shot head of the run's train classes."""
    from eva02.clip import zero_shot_classifier
    from eva02.weights.convert import fit_to_config

    names = class_names(cfg, cfg.data.train_split)
    if len(names) != model.cfg.num_classes:
        raise ValueError(
            f"{len(names)} class names for model.num_classes={model.cfg.num_classes}; "
            f"set model.num_classes={len(names)} or give clip.class_names"
        )
    head = zero_shot_classifier(clip, names, templates(cfg)).T  # (C, E)
    proj = clip.visual.head
    sd = {k: v for k, v in clip.visual.state_dict().items() if not k.startswith("head.")}
    sd = fit_to_config(sd, model.cfg)  # another input size: position embedding resampled
    with torch.no_grad():
        sd["head.weight"] = head @ proj.weight  # (C, D)
        sd["head.bias"] = head @ proj.bias  # (C,)
    model.load_state_dict(sd, strict=True)
    return model


class ZeroShotTask:
    """Zero-shot classification with an EVA-02-CLIP model: evaluation only (`tools/test.py CONFIG CKPT`)."""

    best_metric = "top1"
    shown_metrics = ("top1", "top5")

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        from eva02.weights.clip import get_clip, resolve_clip

        entry = resolve_clip(cfg.model.name)
        init = cfg.model.init if load_init else ""
        clip = get_clip(entry, pretrained=(True if init == "pretrained" else init) if init else False)
        return zero_shot_model(cfg, clip, cfg.data.val_split)

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        raise ValueError(
            "train.task='zero_shot' has nothing to train: evaluate with `python tools/test.py CONFIG CHECKPOINT`, "
            "or fine-tune with train.task='classify' (the head starts as the zero-shot classifier)"
        )

    def collate(self, items: list) -> dict[str, Any]:
        raise NotImplementedError("zero-shot runs only evaluate")

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        raise NotImplementedError("zero-shot runs only evaluate")

    def evaluate(
        self, cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
    ) -> dict[str, Any]:
        return evaluate_classifier(model, loader, device, cfg.model.num_classes, amp)

    def export_model(self, cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError("zero-shot runs only evaluate")
