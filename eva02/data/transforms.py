"""Evaluation transforms built from a zoo entry's `Preprocess` (or from a model's own config).

The official EVA-02 evaluation (`asuka/datasets.py: build_transform`) resizes the short side to
int(img_size / crop_pct) with PIL bicubic, center-crops img_size, and normalises with the CLIP mean/std;
timm's 'squash' mode (its in21k-intermediate fine-tuned models) resizes both sides to img_size instead.
Resizing runs on PIL images through torchvision, so it is PIL's antialiased filter, as upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from PIL import Image

from eva02.weights.zoo import CLIP_MEAN, CLIP_STD, Preprocess

CROP_MODES = ("center", "squash")
# The values of torchvision's InterpolationMode, by name: torchvision's transforms take seconds to import, so
# this module imports them only when it builds a transform (a command that fails its checks never waits).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def preprocess_for_model(model: torch.nn.Module, img_size: int | None = None) -> Preprocess:
    """Default preprocessing of a model without zoo metadata: CLIP mean/std, crop_pct 1.0, its img_size."""
    return Preprocess(img_size=img_size or model.cfg.img_size, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0)


def resize_size(pre: Preprocess) -> int:
    """Short-side length before the center crop."""
    return int(pre.img_size / pre.crop_pct)


def eval_transform(pre: Preprocess, img_size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised float tensor (3, S, S); `img_size` overrides `pre.img_size`."""
    if img_size is not None:
        pre = replace(pre, img_size=img_size)
    _check(pre)
    from torchvision.transforms import v2

    interp = v2.InterpolationMode(pre.interpolation)
    if pre.crop_mode == "squash":
        geometry = [v2.Resize((pre.img_size, pre.img_size), interpolation=interp, antialias=True)]
    else:
        geometry = [
            v2.Resize(resize_size(pre), interpolation=interp, antialias=True),
            v2.CenterCrop(pre.img_size),
        ]
    return v2.Compose(
        [
            *geometry,
            v2.PILToTensor(),  # (3, S, S) uint8
            v2.ToDtype(torch.float32, scale=True),  # [0, 1]
            v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )


def _check(pre: Preprocess) -> None:
    if pre.img_size <= 0:
        raise ValueError(f"img_size must be positive, got {pre.img_size}")
    if not 0.0 < pre.crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {pre.crop_pct}")
    if pre.crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {pre.crop_mode!r}")
    if pre.interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {pre.interpolation!r}")
    if len(pre.mean) != 3 or len(pre.std) != 3 or min(pre.std) <= 0:
        raise ValueError(f"mean/std must be 3 values with std > 0, got mean={pre.mean} std={pre.std}")
