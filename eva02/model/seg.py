"""Semantic segmentation on EVA-02: multi-level features, UperNet decode head, FCN auxiliary head.

Mirrors the official `EVA-02/seg` model (mmsegmentation 0.29 `EncoderDecoder` with the `EVA2` backbone,
`UPerHead` and `FCNHead`; configs `upernet_eva02_*`):
- the backbone's raw outputs (no final norm) of four blocks (`out_indices`, official B 3/5/7/11 and
  L 7/11/15/23), each a (B, D, H/16, W/16) map, resampled to strides 4, 8, 16, 32 by `MultiLevelNeck`:
  two 2x2 deconvolutions with BatchNorm and GELU between, one deconvolution, identity, 2x2 max pooling
  (all keep D channels);
- UperNet (Xiao et al. 2018): a pyramid pooling module (scales 1, 2, 3, 6) on the stride-32 map,
  1x1 lateral convolutions on the others, top-down sums, 3x3 convolutions, every level upsampled to
  stride 4 and fused by a 3x3 bottleneck, then dropout and a 1x1 classifier (logits at stride 4);
- an FCN head on the stride-16 map (one 3x3 convolution) whose loss weighs 0.4 in training.
Convolutions of the heads are conv (no bias) -> BatchNorm -> ReLU, as mmcv's ConvModule; under DDP
the engine may turn the BatchNorms into SyncBatchNorm.

The backbone is an `Eva02` in either layout: the official seg one (class token kept in the sequence,
global attention in every block) or the dense one of `config.dense_config` (no class token, window
attention with global blocks). `Segmentor.predict` is the test-time inference: whole image or sliding
windows, optionally over several scales and flips (mmseg's `slide_inference` and `aug_test`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from eva02.model.config import Eva02Config
from eva02.model.vit import Eva02


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks whose outputs feed the pyramid: the last of each third and of each half, as the official
    configs (depth 12: 3, 5, 7, 11; depth 24: 7, 11, 15, 23); shallow test models repeat blocks."""
    return tuple(max(0, i - 1) for i in (depth // 3, depth // 2, 2 * depth // 3, depth))


@dataclass(frozen=True)
class SegmentorConfig:
    """Everything needed to build a `Segmentor`: the backbone's config and the heads' sizes."""

    backbone: Eva02Config
    num_classes: int
    out_indices: tuple[int, ...] = ()  # () = default_out_indices(backbone.depth)
    channels: int = 768  # UperNet width (official: B 768, L 1024, L at 640 px 1536)
    aux_channels: int = 256  # FCN auxiliary head width; 0: no auxiliary head
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    kind: str = field(default="segmentor", init=False)  # tells a stored segmentor config from an Eva02Config

    def __post_init__(self) -> None:
        problems = []
        if self.backbone.num_classes or self.backbone.pool != "avg":
            problems.append("the backbone must be headless (num_classes=0, pool='avg')")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.out_indices:
            object.__setattr__(self, "out_indices", default_out_indices(self.backbone.depth))
        if len(self.out_indices) != 4 or not all(0 <= i < self.backbone.depth for i in self.out_indices):
            problems.append(f"out_indices must be 4 blocks of the {self.backbone.depth}-block backbone, got "
                            f"{list(self.out_indices)}")  # fmt: skip
        if self.channels < 1 or self.aux_channels < 0 or not self.pool_scales or min(self.pool_scales) < 1:
            problems.append("channels >= 1, aux_channels >= 0 and pool_scales >= 1 are needed")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid SegmentorConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SegmentorConfig:
        d = dict(d)
        if d.pop("kind", "segmentor") != "segmentor":
            raise ValueError("not a segmentor config")
        tuples = {k: tuple(d[k]) for k in ("out_indices", "pool_scales") if k in d}
        return cls(backbone=Eva02Config.from_dict(d.pop("backbone")), **{**d, **tuples})


# ------------------------------------------------------------------------------------ blocks
class ConvBNReLU(nn.Sequential):
    """k x k convolution without bias (the norm has one), BatchNorm, ReLU: mmcv's ConvModule."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class MultiLevelNeck(nn.Module):
    """Four stride-16 maps (B, D, h, w) -> maps at strides 4, 8, 16, 32, all of D channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps, strict=True)]


class Classifier(nn.Module):
    """Dropout2d then a 1x1 convolution to class logits (mmseg's `cls_seg`)."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map averaged to s x s for each scale, projected, upsampled back."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels, 1)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_upsample(stage(x), x.shape[-2:]) for stage in self.stages]


class UPerHead(nn.Module):
    """UperNet: pyramid pooling on the coarsest map, FPN fusion of all four, logits at the finest stride."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        top = in_channels[-1]
        self.psp = PyramidPooling(top, channels, pool_scales)
        self.bottleneck = ConvBNReLU(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.cls = Classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps finest first -> logits (B, classes, h0, w0) at the finest map's size."""
        top = feats[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0], *(_upsample(x, size) for x in outs[1:])], dim=1)  # (B, 4C, h0, w0)
        return self.cls(self.fpn_bottleneck(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = ConvBNReLU(cin, channels, 3)
        self.cls = Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.convs(x))


# ---------------------------------------------------------------------------------- segmentor
class Segmentor(nn.Module):
    """Backbone + neck + UperNet (+ FCN auxiliary head): `model(images)` -> logits at stride 4.

    For the training engine it looks like an `Eva02` where that matters: `blocks` (layer-wise lr decay,
    FSDP2 sharding), `set_grad_checkpointing`, `cfg` (saved with the final weights).
    """

    def __init__(self, cfg: SegmentorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.backbone.dim
        self.backbone = Eva02(cfg.backbone)
        self.backbone.norm = nn.Identity()  # the features are raw block outputs: no final norm to train
        self.neck = MultiLevelNeck(D)
        self.decode_head = UPerHead([D] * 4, cfg.channels, cfg.num_classes, cfg.pool_scales, cfg.dropout)
        self.auxiliary_head = FCNHead(D, cfg.aux_channels, cfg.num_classes, cfg.dropout) if cfg.aux_channels else None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    @property
    def patch_size(self) -> int:
        return self.cfg.backbone.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) -> four maps (B, D, H/p * 4/s, ...) at strides 4, 8, 16, 32 for p = 16."""
        vit = self.backbone
        grid = vit.grid_of(images)
        _, outs = vit.forward_tokens(vit.prepare_tokens(images), grid, self.cfg.out_indices)
        prefix = vit.cfg.num_prefix  # the class token takes part in attention but is no position of the map
        maps = [t[:, prefix:].transpose(1, 2).reshape(t.shape[0], -1, *grid) for t in outs]  # 4 x (B, D, h, w)
        return self.neck(maps)

    def forward(self, images: torch.Tensor, aux: bool = False):
        """Logits (B, classes, H/4, W/4); with `aux` (training), also the auxiliary head's (B, classes, H/16, W/16)."""
        feats = self.features(images)
        logits = self.decode_head(feats)
        if not aux:
            return logits
        return logits, self.auxiliary_head(feats[2]) if self.auxiliary_head is not None else None

    # ------------------------------------------------------------------------------ inference
    def _padded_logits(self, tiles: torch.Tensor) -> torch.Tensor:
        """Logits of images padded (bottom, right) to a multiple of the patch, upsampled to their size."""
        H, W = tiles.shape[-2:]
        p = self.patch_size
        ph, pw = -H % p, -W % p
        x = F.pad(tiles, (0, pw, 0, ph)) if ph or pw else tiles
        return _upsample(self(x), x.shape[-2:])[..., :H, :W]

    def slide(self, image: torch.Tensor, crop: int, stride: int, max_batch: int = 8) -> torch.Tensor:
        """One image (1, 3, H, W) -> logits (1, classes, H, W): the mean over overlapping crop x crop
        windows `stride` apart, the last window of a row or column flush with the border. Windows
        hanging over a border (images smaller than the crop) are zero-padded, as in training."""
        H, W = image.shape[-2:]

        def starts(n: int) -> list[int]:
            count = max(n - crop + stride - 1, 0) // stride + 1
            return sorted({min(i * stride, max(n - crop, 0)) for i in range(count)})

        windows = [(y, x) for y in starts(H) for x in starts(W)]
        total = image.new_zeros(1, self.cfg.num_classes, H, W)
        hits = image.new_zeros(1, 1, H, W)
        for i in range(0, len(windows), max_batch):
            chunk = windows[i : i + max_batch]
            tiles = [image[..., y : y + crop, x : x + crop] for y, x in chunk]
            tiles = [F.pad(t, (0, crop - t.shape[-1], 0, crop - t.shape[-2])) for t in tiles]
            logits = self._padded_logits(torch.cat(tiles)).float()  # (n, classes, crop, crop)
            for (y, x), tile in zip(chunk, logits, strict=True):
                h, w = min(crop, H - y), min(crop, W - x)
                total[..., y : y + h, x : x + w] += tile[:, :h, :w]
                hits[..., y : y + h, x : x + w] += 1
        return total / hits

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        size: Sequence[int] | None = None,
        crop: int = 0,
        stride: int = 0,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        min_side: int = 0,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) -> class scores (B, classes, *size), `size` defaulting to (H, W).

        One view (a scale of 1, no flip): the logits, upsampled bilinearly. Several views: the mean of
        their softmax probabilities, each view's logits upsampled to `size` first (mmseg's aug_test).
        `crop` and `stride` > 0 select sliding windows, else the whole (padded) image goes through at once.
        `min_side`: no view's short side is made smaller than this (the official multi-scale test resizes
        a view to the crop size where its ratio would go below it: its 0.5 and 0.75 views are the 1.0 one).
        """
        size = tuple(size) if size is not None else tuple(images.shape[-2:])
        views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
        short = min(images.shape[-2:])
        out = None
        for scale, flipped in views:
            scale = max(scale, min_side / short)
            x = images if scale == 1.0 else _rescale(images, scale)
            x = x.flip(-1) if flipped else x
            if crop and stride:
                logits = torch.cat([self.slide(im[None], crop, stride) for im in x])
            else:
                logits = self._padded_logits(x).float()
            logits = logits.flip(-1) if flipped else logits
            logits = _upsample(logits, size) if logits.shape[-2:] != size else logits
            scores = logits if len(views) == 1 else logits.softmax(dim=1)
            out = scores if out is None else out + scores
        return out if len(views) == 1 else out / len(views)


def _rescale(images: torch.Tensor, scale: float) -> torch.Tensor:
    H, W = images.shape[-2:]
    return _upsample(images, (max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))))
