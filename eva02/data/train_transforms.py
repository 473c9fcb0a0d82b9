"""Training transforms of the official EVA-02 fine-tuning (timm 0.5.4 `create_transform` as called by
`EVA-02/asuka/datasets.py`), built from torchvision transforms v2:
RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment 'rand-m9-mstd0.5-inc1' -> tensor ->
normalise -> optional random erasing.

RandAugment here follows timm's semantics on torchvision's op set: each of the n ops is applied with
probability 0.5, its magnitude drawn per use from N(m, mstd) clipped to [0, 10] on a 0..10 scale, and
fill is the mean colour. torchvision's op table is already the 'increasing' one (stronger posterize and
solarize at higher magnitude); its ranges differ slightly from timm's for posterize (8->4 bits vs 4->0)
and translate (0.45 of the size in both).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

_INTERP = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}
_BINS = 101  # magnitude resolution: 0..10 in steps of 0.1


class RandAugmentMstd(v2.RandAugment):
    """RandAugment with per-op probability and Gaussian magnitude noise (timm's 'mstd' and 'inc1')."""

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        mstd: float = 0.5,
        prob: float = 0.5,
        interpolation=v2.InterpolationMode.BICUBIC,
        fill=None,
    ) -> None:
        super().__init__(num_ops=num_ops, magnitude=0, num_magnitude_bins=_BINS, interpolation=interpolation, fill=fill)
        self.level, self.mstd, self.prob = float(magnitude), float(mstd), float(prob)
        self._tables: dict = {}

    def draw(self, height: int, width: int) -> list[tuple[str, float]]:
        """The ops for one (height, width) image and their signed magnitudes, drawn from torch's generator:
        per op, its choice, whether it applies, its magnitude, its sign (ops that do not apply are left out)."""
        ops = []
        for _ in range(self.num_ops):
            op, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            if torch.rand(()) >= self.prob:
                continue
            key = (op, height, width)  # the table of an op and image size, built once
            if key not in self._tables:
                self._tables[key] = magnitudes_fn(self.num_magnitude_bins, height, width)
            magnitudes = self._tables[key]
            magnitude = 0.0
            if magnitudes is not None:
                level = self.level + (float(torch.randn(())) * self.mstd if self.mstd > 0 else 0.0)
                level = min(10.0, max(0.0, level))
                magnitude = float(magnitudes[round(level * (_BINS - 1) / 10)])
                if signed and torch.rand(()) <= 0.5:
                    magnitude = -magnitude
            ops.append((op, magnitude))
        return ops

    def forward(self, *inputs):
        flat, image = self._flatten_and_extract_image_or_video(inputs)
        height, width = v2.functional.get_size(image)
        for op, magnitude in self.draw(height, width):  # the ops draw nothing: drawing first keeps the order
            image = self.apply_op(image, op, magnitude)
        return self._unflatten_and_insert_image_or_video(flat, image)

    def apply_op(self, image: Any, op: str, magnitude: float) -> Any:
        """Op `op` of torchvision's RandAugment table at `magnitude` (signed), on a PIL image or tensor."""
        return self._apply_image_or_video_transform(image, op, magnitude, interpolation=self.interpolation,
                                                    fill=self._fill)  # fmt: skip


def train_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaug_n: int = 2,
    randaug_m: float = 9.0,
    randaug_mstd: float = 0.5,
    reprob: float = 0.0,
    interpolation: str = "bicubic",
) -> Callable:
    """PIL RGB image -> normalised float tensor (3, img_size, img_size) with the recipe's augmentation."""
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(_INTERP)}")
    interp = _INTERP[interpolation]
    ops: list = [
        v2.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interp, antialias=True)
    ]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaug_n > 0:
        fill = [round(255 * m) for m in mean]
        ops.append(RandAugmentMstd(randaug_n, randaug_m, randaug_mstd, interpolation=interp, fill=fill))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if reprob > 0:
        # timm's 'pixel' mode: erased areas get per-pixel normal noise (in normalised units).
        ops.append(v2.RandomErasing(p=reprob, value="random"))
    return v2.Compose(ops)


def train_transform_from(data: Any, img_size: int) -> Callable:
    """The train transform of a run's `data` section (an engine `DataCfg`): its fast form
    (`fast_transforms.FastTrainTransform`, with `data.reduced_decode`) when `data.fast_transforms`, else
    `train_transform`, the reference; the same augmentation either way."""
    d = data
    args = (img_size, d.mean, d.std, d.rrc_scale, d.rrc_ratio, d.hflip,
            d.randaug_n, d.randaug_m, d.randaug_mstd, d.reprob, d.interpolation)  # fmt: skip
    if d.fast_transforms:
        from eva02.data.fast_transforms import FastTrainTransform  # it builds on this module

        return FastTrainTransform(*args, reduced_decode=d.reduced_decode)
    return train_transform(*args)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive Python's seed from torch's per-worker seed."""
    random.seed(torch.initial_seed() % 2**32)
