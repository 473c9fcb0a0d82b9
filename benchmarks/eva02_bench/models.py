"""The implementations side by side: benchmark sizes and the builders of ours, timm's `Eva` and mmpretrain's
`ViTEVA02` with one architecture, randomly initialised.

timm and mmpretrain are imported here only when a model of theirs is built; the eva02 package never
imports them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from eva02 import flops
from eva02.dtypes import DTYPES  # noqa: F401 (the dtype words, re-exported for the harness's callers)
from eva02.extras import need
from eva02.model.config import VARIANTS, Eva02Config
from eva02.model.vit import Eva02
from eva02.weights.convert import to_ours

IMPLS = ("ours", "timm", "mmpretrain")


@dataclass(frozen=True)
class BenchSize:
    """One benchmark point: a variant at an input size and batch size."""

    variant: str
    img_size: int
    batch: int

    def config(self, num_classes: int = 1000) -> Eva02Config:
        return VARIANTS[self.variant].replace(img_size=self.img_size, num_classes=num_classes)


# The sizes the released classifiers run at, with batches that fit a small CPU machine.
SIZES: dict[str, BenchSize] = {
    "test-56": BenchSize("test", 56, 2),
    "tiny-336": BenchSize("tiny", 336, 8),
    "small-336": BenchSize("small", 336, 8),
    "base-448": BenchSize("base", 448, 2),
    "large-448": BenchSize("large", 448, 1),
}


def get_size(name: str) -> BenchSize:
    """Look a size up by name ('tiny-336'); a clear error lists the valid ones."""
    if name not in SIZES:
        raise ValueError(f"unknown benchmark size {name!r}; choose from {', '.join(SIZES)}")
    return SIZES[name]


# ------------------------------------------------------------------------------------------ models
def build_timm(cfg: Eva02Config) -> nn.Module:
    """timm's `Eva` with the architecture of `cfg` (what timm's eva02_*_patch14_* constructors build)."""
    Eva = need("timm.models.eva", "bench", "benchmarking against timm").Eva
    # timm keeps separate q/k/v projections for base/large (qkv_fused=False) and takes the hidden
    # width as int(dim * mlp_ratio): the +0.5 keeps float rounding from landing one below.
    return Eva(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_classes, embed_dim=cfg.dim,
        depth=cfg.depth, num_heads=cfg.heads, qkv_fused=not cfg.sub_ln, mlp_ratio=(cfg.mlp_hidden + 0.5) / cfg.dim,
        swiglu_mlp=True, scale_mlp=cfg.sub_ln, use_rot_pos_emb=True, ref_feat_shape=(cfg.ref_grid, cfg.ref_grid),
    )  # fmt: skip


class _MmpClassifier(nn.Module):
    """mmpretrain's backbone with the linear head of its EVA-02 classifier configs."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1])


def build_mmpretrain(cfg: Eva02Config) -> nn.Module:
    """mmpretrain's `ViTEVA02` as configured by its eva02-*-p14_in1k configs, plus the linear head."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mmpretrain.models.backbones import ViTEVA02
    except ImportError as e:
        raise ImportError(
            f"mmpretrain cannot be imported ({e}); install it or pass its site folder (--mmp-site DIR)"
        ) from e
    arch = {
        "embed_dims": cfg.dim,
        "num_layers": cfg.depth,
        "num_heads": cfg.heads,
        "feedforward_channels": cfg.mlp_hidden,
    }
    backbone = ViTEVA02(
        arch=arch, img_size=cfg.img_size, patch_size=cfg.patch_size, sub_ln=cfg.sub_ln, final_norm=False,
        out_type="avg_featmap",
    )  # fmt: skip
    return _MmpClassifier(backbone, cfg.dim, cfg.num_classes)


def build_model(impl: str, cfg: Eva02Config) -> nn.Module:
    """One implementation of the architecture `cfg`, randomly initialised, on the CPU in fp32."""
    if impl == "ours":
        return Eva02(cfg)
    if impl == "timm":
        return build_timm(cfg)
    if impl == "mmpretrain":
        return build_mmpretrain(cfg)
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def load_timm_weights(ours: Eva02, timm_model: nn.Module) -> bool:
    """Give `ours` timm's random weights through eva02.weights.convert; True once loaded."""
    ours.load_state_dict(to_ours(timm_model.state_dict(), "timm", ours.cfg), strict=True)
    return True


def forward_flops(cfg: Eva02Config, img_size: int | None = None) -> float:
    """Forward FLOPs of one image (2 x the multiply-adds of the matrix products and the patch convolution)."""
    return flops.forward_flops(cfg, img_size)
