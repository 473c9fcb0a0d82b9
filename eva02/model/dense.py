"""Dense prediction on EVA-02: the backbone as feature maps, and ViTDet's simple feature pyramid.

`DenseBackbone` runs an `Eva02` with the dense options (`cls_token=False`, `window_size` with
`global_blocks`, see `config.dense_config`) and returns the last block's tokens as a (B, D, H/p, W/p)
map, raw, without a final norm (ViTDet, EVA-02 `det/.../backbone/vit.py`). `SimpleFeaturePyramid`
turns that single stride-p map into maps at strides p/4, p/2, p and 2p (4, 8, 16, 32 for p = 16) by
deconvolutions and pooling, each projected to `out_channels` by a 1x1 and a 3x3 convolution with
channel LayerNorms (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object
Detection", sec. 3); `p6` (stride 64) is a stride-2 subsampling of p5 for detectors that want it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eva02.model.vit import Eva02


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, at every position."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
    """Convolution without bias, then a channel LayerNorm (detectron2's Conv2d with norm='LN')."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = LayerNorm2d(cout)


class SimpleFeaturePyramid(nn.Module):
    """One stride-`stride` map (B, D, h, w) -> {'p2': ..., 'p5': ...} maps of `out_channels` channels.

    The level names are log2 of the strides (p2 = stride 4 for a stride-16 backbone). `scales` are the
    resampling factors of the backbone map: 4 (two 2x2 deconvolutions with LayerNorm and GELU between),
    2 (one deconvolution), 1 (as is), 0.5 (2x2 max pooling).
    """

    def __init__(
        self,
        dim: int,
        stride: int = 16,
        out_channels: int = 256,
        scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5),
        top_level: bool = False,
    ) -> None:
        super().__init__()
        self.levels: list[str] = []
        self.stages = nn.ModuleDict()
        for scale in scales:
            if scale == 4.0:
                up: list[nn.Module] = [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ]
                width = dim // 4
            elif scale == 2.0:
                up, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                up, width = [], dim
            elif scale == 0.5:
                up, width = [nn.MaxPool2d(2, stride=2)], dim
            else:
                raise ValueError(f"pyramid scale {scale} is not one of 4, 2, 1, 0.5")
            level = f"p{int(math.log2(stride / scale))}"
            self.levels.append(level)
            self.stages[level] = nn.Sequential(
                *up, ConvNorm(width, out_channels, 1), ConvNorm(out_channels, out_channels, 3)
            )
        self.top_level = top_level
        if top_level:
            self.levels.append(f"p{int(math.log2(stride / scales[-1])) + 1}")
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {level: stage(x) for level, stage in self.stages.items()}
        if self.top_level:  # detectron2's LastLevelMaxPool: every other position of the coarsest map
            last = out[list(self.stages)[-1]]
            out[self.levels[-1]] = F.max_pool2d(last, kernel_size=1, stride=2)
        return out


class DenseBackbone(nn.Module):
    """An `Eva02` with the dense options as a feature-map backbone, optionally with the simple pyramid.

    `forward(images)` -> the pyramid's dict of maps, or without a pyramid {'last': (B, D, H/p, W/p)}.
    Image sides must be multiples of the patch size; grids that the windows or the pooling do not
    divide work (windows are padded, pooling rounds down).
    """

    def __init__(self, vit: Eva02, pyramid: SimpleFeaturePyramid | None = None) -> None:
        super().__init__()
        if vit.cfg.cls_token or vit.is_classifier:
            raise ValueError("a dense backbone is an Eva02 without class token nor head (see dense_config)")
        self.vit = vit
        self.pyramid = pyramid

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the last block's tokens as a map (B, D, H/p, W/p), no final norm."""
        grid = self.vit.grid_of(images)
        tokens, _ = self.vit.forward_tokens(self.vit.prepare_tokens(images), grid)  # (B, N, D)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.feature_map(images)
        return self.pyramid(fmap) if self.pyramid is not None else {"last": fmap}
