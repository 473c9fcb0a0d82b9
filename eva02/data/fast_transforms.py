"""The fast form of the train transform: the augmentation of `train_transforms.train_transform` (the
reference: torchvision v2 on PIL images), with the same random draws in the same order, in fewer and cheaper
steps:

- the crop is drawn before the image is decoded, on its full-size upright geometry (RandomResizedCrop's
  draws), so that a JPEG can be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling through
  `PIL.Image.draft`) when the crop still spans at least the output size at that scale (`reduced_decode`):
  the resize after it then only shrinks, as at full size, and PIL resamples the crop box scaled exactly
  (fractional pixels), so the crop is the reference's to the pixel's fraction;
- at full size, a colour JPEG is decoded by torchvision's libjpeg-turbo decoder (PIL's pixels, without
  PIL's packing copy), and crop + resize run on uint8 channels-last tensors (torch's antialiased
  bicubic / bilinear resampling has PIL's filters: values within 2 of PIL's, most equal), about 2.5x
  faster than PIL;
- RandAugment keeps the image a uint8 tensor where it can (`FastRandAugment`): the shears run as 1-D
  cubic filters with PIL's kernel, geometry and fill (`warp`; 6-7x faster than PIL's generic warp, pixels
  within 1 of PIL's, a few in a million off), the integer translations as slice copies and the sharpness as
  PIL's filter and blend in float32 (both bit for bit); rotations and the colour ops run in PIL as in the
  reference, the image converted only when one is drawn;
- the uint8 -> float conversion and the normalisation are one pass and one in-place pass.

A seed gives the reference's crop box, flip, RandAugment ops and erasing; the output differs from the
reference's by resize rounding, by 1 on a few pixels per million of a sheared image, and where the decoding
scale was reduced, by that (PSNR 35-48 dB against full-size decoding on a detailed photo).
Tests: tests/test_fast_transforms.py, tests/test_fast_warp.py; speed: benchmarks/loader_bench.py.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import v2

try:  # torchvision's own JPEG decoder (deprecated in 0.29 for torchcodec): PIL's decoder serves without it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

from eva02.data import warp
from eva02.data.images import EncodedImage, ImageError
from eva02.data.train_transforms import _INTERP, RandAugmentMstd, train_transform_from

if TYPE_CHECKING:
    from eva02.engine.config import DataCfg

_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}  # as PIL's resize
_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
REDUCTIONS = (8, 4, 2)  # the JPEG decoder's scale factors, largest first


def sample_crop(height: int, width: int, scale: tuple[float, float], log_ratio: torch.Tensor) -> tuple[int, ...]:
    """(top, left, h, w) of a random resized crop of a (height, width) image, drawn from torch's generator
    with the same calls, in the same order, as torchvision's RandomResizedCrop draws it: up to ten tries
    of (area fraction, log aspect ratio, top, left), then the central crop of the closest allowed ratio."""
    area = height * width
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1])).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    ratio_lo, ratio_hi = math.exp(float(log_ratio[0])), math.exp(float(log_ratio[1]))
    w, h = width, height
    if width / height < ratio_lo:
        h = int(round(w / ratio_lo))
    elif width / height > ratio_hi:
        w = int(round(h * ratio_hi))
    return (height - h) // 2, (width - w) // 2, h, w


def decode_reduction(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG decoding reduction (8, 4, 2, else 1) that leaves a (crop_h, crop_w) crop at least
    (out_h, out_w) pixels, so the resize after it still only shrinks (or keeps) what full decoding would."""
    for r in REDUCTIONS:
        if crop_h >= r * out_h and crop_w >= r * out_w:
            return r
    return 1


def to_hwc(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image's pixels as an (H, W, 3) uint8 tensor (a writable copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


def decode_hwc(enc: EncodedImage) -> torch.Tensor:
    """The pixels (H, W, 3) uint8 of `enc`, decoded at full size. A colour JPEG without EXIF rotation goes
    through torchvision's libjpeg-turbo decoder where there is one: it writes the pixels straight into a
    tensor (PIL's decoder gives the same pixels, then packs and copies them)."""
    if decode_jpeg is not None and enc.img.mode == "RGB" and enc.orientation == 1:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                chw = decode_jpeg(torch.frombuffer(bytearray(enc.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise ImageError(f"cannot load image '{enc.name}': truncated or corrupt image data ({e})") from None
        return chw.permute(1, 2, 0)  # the decoder's buffer is (H, W, 3)
    return to_hwc(enc.decode()[0])


class FastRandAugment(RandAugmentMstd):
    """`RandAugmentMstd` on uint8 (H, W, 3) tensors, with the reference's draws: the shears, translations and
    sharpness run on the tensor (`warp`: PIL's geometry, fill and rounding; the shears' pixels within 1 of PIL's,
    the others' equal), the other ops on a PIL image as in the reference; the image changes form only when an op
    needs it."""

    def __init__(self, *args: Any, fill: list[int], **kwargs: Any) -> None:
        super().__init__(*args, fill=fill, **kwargs)
        self.fill_rgb = tuple(int(f) for f in fill)

    def __call__(self, hwc: torch.Tensor) -> torch.Tensor:
        img: torch.Tensor | Image.Image = hwc
        for op, magnitude in self.draw(hwc.shape[0], hwc.shape[1]):
            if op == "Identity":
                continue
            if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Sharpness"):
                img = to_hwc(img) if isinstance(img, Image.Image) else img
                if op.startswith("Shear"):
                    img = warp.shear(img, op, magnitude, self.fill_rgb)
                elif op == "Sharpness":
                    img = warp.sharpness(img, 1.0 + magnitude)  # torchvision's factor
                else:
                    shift = int(magnitude)  # torchvision's whole pixels
                    img = warp.translate(img, shift * (op == "TranslateX"), shift * (op == "TranslateY"), self.fill_rgb)
            else:
                img = img if isinstance(img, Image.Image) else Image.fromarray(img.contiguous().numpy(), "RGB")
                img = self.apply_op(img, op, magnitude)
        return to_hwc(img) if isinstance(img, Image.Image) else img


class FastTrainTransform:
    """PIL image or `EncodedImage` -> normalised float tensor (3, size, size): `train_transform`'s augmentation,
    fast (module docstring). `takes_encoded` tells datasets to defer JPEG decoding to it. With
    `normalize=False` it returns the uint8 pixels (3, size, size) instead, a quarter of the bytes to collate and
    move, for a loop that normalises batches on the device ((x / 255 - mean) / std)."""

    takes_encoded = True

    def __init__(
        self,
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
        reduced_decode: bool = True,
        normalize: bool = True,
    ) -> None:
        if interpolation not in _INTERP:
            raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(_INTERP)}")
        if not normalize and reprob > 0:
            raise ValueError("random erasing (reprob > 0) works on normalised images: keep normalize=True")
        self.normalize = normalize
        self.size, self.scale, self.hflip = int(img_size), tuple(scale), float(hflip)
        self.log_ratio = torch.log(torch.tensor(tuple(ratio)))  # float32, as the reference's
        self.mode, self.reduced_decode = _TORCH_MODES[interpolation], reduced_decode
        self.pil_filter = _PIL_FILTERS[interpolation]
        self.randaug = None
        if randaug_n > 0:
            fill = [round(255 * m) for m in mean]
            self.randaug = FastRandAugment(randaug_n, randaug_m, randaug_mstd, interpolation=_INTERP[interpolation],
                                           fill=fill)  # fmt: skip
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.mul = 1.0 / (255.0 * std_t)  # (x / 255 - mean) / std = x * mul + add
        self.add = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t
        self.erase = v2.RandomErasing(p=reprob, value="random") if reprob > 0 else None

    def plan(self, width: int, height: int) -> tuple[int, int, int, int, int]:
        """(top, left, h, w, reduce): the crop of a (width, height) image, drawn from torch's generator, and
        the decoding reduction it allows (1 without `reduced_decode`)."""
        top, left, h, w = sample_crop(height, width, self.scale, self.log_ratio)
        return top, left, h, w, decode_reduction(h, w, self.size, self.size) if self.reduced_decode else 1

    def __call__(self, img: Image.Image | EncodedImage) -> torch.Tensor:
        top, left, h, w, reduce = self.plan(*img.size)
        if isinstance(img, EncodedImage) and reduce > 1:
            img, factor = img.decode(reduce)  # upright RGB at 1 / factor of the full size
            if factor > 1:  # the crop box scaled exactly (sub-pixel): PIL resamples a fractional box
                box = (left / factor, top / factor, (left + w) / factor, (top + h) / factor)
                return self.finish(to_hwc(img.resize((self.size, self.size), self.pil_filter, box=box)))
        hwc = decode_hwc(img) if isinstance(img, EncodedImage) else to_hwc(img)
        crop = hwc[top : top + h, left : left + w].permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w)
        crop = crop.contiguous(memory_format=torch.channels_last)  # torch's vectorised uint8 resampling layout
        x = nnf.interpolate(crop, size=(self.size, self.size), mode=self.mode, antialias=self.mode != "nearest-exact")
        return self.finish(x[0].permute(1, 2, 0))  # (S, S, 3) uint8, contiguous

    def draw_flip(self) -> bool:
        """Whether to flip this image: the draw after `plan` (none when flips are off), as the reference makes it."""
        return bool(self.hflip > 0 and torch.rand(1) < self.hflip)

    def finish(self, hwc: torch.Tensor) -> torch.Tensor:
        """The cropped (S, S, 3) uint8 pixels -> flip, RandAugment, normalised (3, S, S) float, erasing."""
        if self.draw_flip():
            hwc = hwc.flip(1)
        if self.randaug is not None:
            hwc = self.randaug(hwc)
        if not self.normalize:
            return hwc.permute(2, 0, 1).contiguous()
        out = torch.empty((3, self.size, self.size), dtype=torch.float32)
        o = out.numpy()  # numpy converts, transposes and multiplies in one pass (torch: two); the same float32 values
        np.multiply(hwc.numpy().transpose(2, 0, 1), self.mul.numpy(), out=o, casting="unsafe")
        o += self.add.numpy()
        return self.erase(out) if self.erase is not None else out


def train_transform_for(d: DataCfg, img_size: int) -> Any:
    """The train transform of a run's data settings (`train_transforms.train_transform_from`); with
    `d.device_normalize` (the default), the fast one gives uint8 pixels (a quarter of the bytes through collation,
    shared and pinned memory and the copy to the device), which the loop normalises there
    (`engine.loader.DeviceNormalize`), as timm's prefetcher does. The reference transform and random erasing
    (which fills with normalised noise) normalise in the workers; the loop's step lets float images pass.
    With `d.decode_on_device`, the fast one leaves JPEG decoding to the device
    (`device_decode.DeviceDecodeTransform`)."""
    tf = train_transform_from(d, img_size)
    if d.decode_on_device:
        from eva02.data.device_decode import DeviceDecodeTransform

        if not isinstance(tf, FastTrainTransform):
            raise ValueError("data.decode_on_device needs data.fast_transforms=true")
        return DeviceDecodeTransform(tf)
    if d.device_normalize and isinstance(tf, FastTrainTransform) and tf.erase is None:
        tf.normalize = False
    return tf
