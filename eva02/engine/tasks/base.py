"""The `Task` protocol the training loop calls, and the model of a run (`model_config`, `build_eva02`)
that every task starts from. See `eva02.engine.tasks` for the contract in words."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from eva02.engine.tasks.zero_shot import init_from_clip
from eva02.model import VARIANTS, Eva02, Eva02Config
from eva02.weights.clip import get_clip
from eva02.weights.load import get_model
from eva02.weights.zoo import find_clip, resolve

if TYPE_CHECKING:  # the config imports the task table: tasks read a config, never import it at run time
    from eva02.engine.config import RunConfig


class Task(Protocol):
    """What differs between kinds of training (fine-tuning, pre-training, ...); the loop is the same.

    Methods are functions of their arguments: none sets state on the task, so they may run in any order
    and one task object serves any number of runs.
    """

    best_metric: str | None
    """The evaluation metric that picks `best.pt` (higher is better, live or EMA weights); None: no best."""

    shown_metrics: tuple[str, ...]
    """The metrics printed after each evaluation (all of them go to metrics.jsonl)."""

    def build_model(self, cfg: RunConfig, load_init: bool = True) -> nn.Module:
        """The single-device model to train, on CPU, initial weights loaded (unless `load_init` is False)."""
        ...

    def build_datasets(self, cfg: RunConfig) -> tuple[Dataset, Dataset | None]:
        """Train and (optional) validation datasets, checked: raise before training on bad data."""
        ...

    def collate(self, items: list) -> dict[str, Any]:
        """DataLoader collate_fn: samples -> the batch dict given to the loss ('bad' lists unreadable images)."""
        ...

    def build_loss(self, cfg: RunConfig) -> nn.Module:
        """`loss(model, batch)` -> scalar loss tensor (mean over the local batch); the loop moves it to the
        training device. It holds what the loss needs besides the model (mixup, a frozen teacher)."""
        ...

    def evaluate(
        self, cfg: RunConfig, model: nn.Module, loader: Any, device: torch.device, amp: torch.dtype | None
    ) -> dict[str, Any]:
        """Validation metrics summed over processes (every rank calls it); {} when the task has none."""
        ...

    def export_model(self, cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """The deliverable of a run (what final.safetensors holds, loadable by `get_model`) from the full
        state dict of the trained model (or of its EMA)."""
        ...


def model_config(cfg: RunConfig) -> Eva02Config:
    """The Eva02Config of a run: the zoo entry's or variant's config with the run's overrides."""
    mc = cfg.model
    clip = find_clip(mc.name)
    if clip is not None:  # a classifier on an EVA-02-CLIP image tower (class-token pooling kept)
        base = clip.cfg.vision
    else:
        base = VARIANTS[mc.name] if mc.name in VARIANTS else resolve(mc.name).cfg
    changes: dict[str, Any] = dict(
        num_classes=mc.num_classes, img_size=mc.img_size, drop_path=mc.drop_path, patch_grad_scale=mc.patch_grad_scale
    )
    for name in ("patch_size", "depth", "dim", "heads", "mlp_hidden"):
        if getattr(mc, name):
            changes[name] = getattr(mc, name)
    return base.replace(**changes)


def build_eva02(cfg: RunConfig, load_init: bool = True) -> Eva02:
    """Eva02 for the run; `model.init` weights loaded through the weights code (any known format). From an
    EVA-02-CLIP model (`model.name` a CLIP name), the image tower with the zero-shot head as classifier."""
    mc = cfg.model
    model = Eva02(model_config(cfg))
    if not (load_init and mc.init):
        return model
    clip = find_clip(mc.name)
    if clip is not None:  # the tower's weights, and the zero-shot head of the train classes
        return init_from_clip(cfg, model, get_clip(clip, pretrained=True if mc.init == "pretrained" else mc.init))
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
