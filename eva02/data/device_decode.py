"""JPEG decoding on the run's device (`data.decode_on_device`): the train transform's crop and flip are drawn in
the DataLoader workers, the pixels are made where the model runs.

- `DeviceDecodeTransform` (in a worker) reads a JPEG's header only, draws the crop box and the flip with the
  random draws of `fast_transforms.FastTrainTransform`, in the same order (`plan`, then the flip of `finish`), and
  gives the file's bytes with that plan (`EncodedCrop`). What the device decoder does not take (PNG, WebP and
  other formats, CMYK or grayscale JPEGs, JPEGs with an EXIF rotation, a file without its scan or end marker:
  most often a truncated one) is decoded there by the fast transform's CPU path, as ready uint8 pixels, and
  fails there as any unreadable image does;
- `stack_images` (in the collate) stacks plain image tensors as `default_collate` does, and packs a batch holding
  `EncodedCrop`s as an `EncodedBatch`: all its JPEGs' bytes end to end in one tensor (one shared-memory segment
  from a worker and one pinned buffer, not one per image), the plans, and the ready pixels stacked;
- `decode_batch` (in the loop, after `to_device`) decodes the JPEGs with one batched `torchvision.io.decode_jpeg`
  call on the batch's device (nvJPEG on a GPU; libjpeg-turbo on the CPU), then crops, resizes (the fast
  transform's filters and passes, in float32), flips, and places them among the ready images, in batch order.
  `engine.loader.DeviceNormalize` normalises the result.

Nothing random runs outside the seeded worker, so data order and augmentation still depend only on (seed, epoch,
sample index). The pixels are the fast transform's (with `reduced_decode` off) up to the resize's rounding on the
CPU, and up to nvJPEG's decoding differences on a GPU. Tests: tests/test_device_decode.py.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as nnf
from torch.utils.data import default_collate

from eva02.data.images import EncodedImage, ImageError

if TYPE_CHECKING:
    from eva02.data.fast_transforms import FastTrainTransform

JPEG_END = b"\xff\xd9"  # the EOI marker a complete JPEG ends with
JPEG_SCAN = b"\xff\xda"  # the SOS marker before the image data
DECODE_BYTES = 2**30  # decoded pixels (bytes) held at once on the device: larger batches decode in parts


@dataclass(frozen=True)
class CropPlan:
    """What the device does with one JPEG: its full (height, width), the crop box (top, left, h, w) to resize to
    `size` with torch's `mode`, whether to flip it; `name` (its source) for errors."""

    full: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    size: int
    mode: str
    name: str


@dataclass(frozen=True)
class EncodedCrop:
    """One sample for the device: a JPEG's bytes (N,) uint8 and its `CropPlan`."""

    data: torch.Tensor
    plan: CropPlan


def device_decodable(img: Any) -> bool:
    """Whether `img` is a JPEG for the device decoder: 3-component colour, no EXIF rotation, and by its markers
    complete. A file with no scan or no end marker (truncated, or data after it) is left to the CPU path, which
    skips it as unreadable where it is (the loop cannot drop a sample after it has counted the batch)."""
    return (
        isinstance(img, EncodedImage)
        and img.img.mode == "RGB"
        and img.orientation == 1
        and img.data[-2:] == JPEG_END
        and JPEG_SCAN in img.data
    )


class DeviceDecodeTransform:
    """Image or `EncodedImage` -> `EncodedCrop` (a JPEG for the device) or the fast transform's uint8 pixels
    (3, S, S) for everything else; the crop and flip come from the same draws either way (module docstring)."""

    takes_encoded = True

    def __init__(self, fast: FastTrainTransform) -> None:
        if fast.randaug is not None or fast.erase is not None:
            raise ValueError("decoding on the device needs a train transform without RandAugment and random "
                             "erasing (data.randaug_n=0, data.reprob=0): both work per image on the CPU")  # fmt: skip
        self.fast = fast
        fast.normalize = False  # the fallback's pixels stay uint8, as the decoded ones; the loop normalises both

    def __call__(self, img: Any) -> EncodedCrop | torch.Tensor:
        if not device_decodable(img):
            return self.fast(img)
        f = self.fast
        top, left, h, w, _ = f.plan(*img.size)  # the reduction is the CPU decoder's business only
        flip = f.draw_flip()  # the draw `FastTrainTransform.finish` makes
        data = torch.frombuffer(bytearray(img.data), dtype=torch.uint8)
        width, height = img.size
        return EncodedCrop(data, CropPlan((height, width), (top, left, h, w), flip, f.size, f.mode, img.name))


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of `EncodedCrop`s and ready uint8 images: `data` holds the JPEGs' bytes end to end (JPEG j is
    data[ends[j-1]:ends[j]]), `plans` their `CropPlan`s, `at` their places in the batch; `ready` (R, 3, S, S)
    the other images, in batch order. `device`: where to decode them (set by `to`)."""

    data: torch.Tensor
    ends: tuple[int, ...]
    plans: tuple[CropPlan, ...]
    at: tuple[int, ...]
    ready: torch.Tensor
    device: torch.device | None = None

    @property
    def shape(self) -> torch.Size:
        """The shape of the decoded batch, (B, 3, S, S)."""
        return torch.Size((len(self.at) + self.ready.shape[0], *self.ready.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def jpegs(self) -> list[torch.Tensor]:
        """The JPEGs' bytes, each a view of `data`."""
        starts = (0, *self.ends[:-1])
        return [self.data[a:b] for a, b in zip(starts, self.ends, strict=True)]

    def pin_memory(self) -> EncodedBatch:
        """Page-locked copies (the DataLoader's pin_memory thread calls this)."""
        return replace(self, data=self.data.pin_memory(), ready=self.ready.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedBatch:
        """The batch to decode on `device`: the ready images copied there; the JPEGs' bytes stay in host memory,
        where the decoder reads them."""
        return replace(self, ready=self.ready.to(device, non_blocking=non_blocking), device=torch.device(device))


def stack_images(images: Sequence[Any]) -> torch.Tensor | EncodedBatch:
    """A batch's images: stacked by `default_collate` (in a worker, into shared memory), or, when some are
    `EncodedCrop`s, an `EncodedBatch` of them and the stacked others."""
    at = tuple(i for i, x in enumerate(images) if isinstance(x, EncodedCrop))
    if not at:
        return default_collate(list(images))
    encoded = [images[i] for i in at]
    ready = [x for x in images if not isinstance(x, EncodedCrop)]
    s = encoded[0].plan.size
    stacked = default_collate(ready) if ready else torch.empty((0, 3, s, s), dtype=torch.uint8)
    ends = tuple(itertools.accumulate(e.data.numel() for e in encoded))
    data = torch.cat([e.data for e in encoded])
    return EncodedBatch(data, ends, tuple(e.plan for e in encoded), at, stacked)


def decode_batch(batch: EncodedBatch, max_bytes: int = DECODE_BYTES) -> torch.Tensor:
    """The images (B, 3, S, S) float32 of whole pixel values 0..255 on `batch.device`: the JPEGs decoded there,
    cropped, resized, flipped; the ready images converted. JPEGs are decoded in parts of at most `max_bytes`
    of pixels (at least one image a part)."""
    device = batch.device or torch.device("cpu")
    out = torch.empty(batch.shape, dtype=torch.float32, device=device)
    jpegs, plans = batch.jpegs(), batch.plans
    start = 0
    while start < len(jpegs):
        stop, held = start + 1, _pixel_bytes(plans[start])
        while stop < len(jpegs) and held + _pixel_bytes(plans[stop]) <= max_bytes:
            held += _pixel_bytes(plans[stop])
            stop += 1
        for j, img in zip(range(start, stop), _decode(jpegs[start:stop], plans[start:stop], device), strict=True):
            out[batch.at[j]] = _crop_resize(img, plans[j])  # (3, S, S)
        start = stop
    placed = set(batch.at)
    ready_at = [i for i in range(out.shape[0]) if i not in placed]
    for i, img in zip(ready_at, batch.ready, strict=True):
        out[i].copy_(img)
    return out


def _pixel_bytes(p: CropPlan) -> int:
    return 3 * p.full[0] * p.full[1]


def _crop_resize(img: torch.Tensor, p: CropPlan) -> torch.Tensor:
    """A decoded (3, H, W) uint8 image -> its crop resized to (3, S, S) float32 of whole values, flipped when
    planned. The resize is the CPU path's (torch's uint8 resampling, PIL's order): a horizontal pass, then a
    vertical one, each rounded and clamped to 0..255; float32 arithmetic instead of its fixed-point weights."""
    top, left, h, w = p.box
    s, aa = p.size, p.mode != "nearest-exact"
    x = img[:, top : top + h, left : left + w].unsqueeze(0).to(torch.float32)  # (1, 3, h, w)
    if w != s:
        x = nnf.interpolate(x, size=(h, s), mode=p.mode, antialias=aa).round_().clamp_(0, 255)  # (1, 3, h, S)
    if h != s:
        x = nnf.interpolate(x, size=(s, s), mode=p.mode, antialias=aa).round_().clamp_(0, 255)  # (1, 3, S, S)
    return x[0].flip(-1) if p.flip else x[0]


def _decode(jpegs: list[torch.Tensor], plans: Sequence[CropPlan], device: torch.device) -> list[torch.Tensor]:
    """The JPEGs decoded to (3, H, W) uint8 on `device`, in one call; when that fails (the call gives no partial
    results), one by one, and a JPEG the device's decoder refuses by the CPU's (then copied to the device)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: Any, dev: torch.device) -> Any:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)

    try:
        return list(decode(jpegs, device))
    except RuntimeError:
        pass
    out = []
    for data, p in zip(jpegs, plans, strict=True):
        try:
            out.append(decode(data, device))
            continue
        except RuntimeError as e:
            reason = str(e).rsplit(", ", 1)[-1].strip()  # torchvision's message ends with the decoder's reason
        try:
            out.append(decode(data, torch.device("cpu")).to(device))
        except RuntimeError:
            fix = "remove or re-encode the file, or decode in the workers (data.decode_on_device=false)"
            msg = f"cannot load image '{p.name}': truncated or corrupt JPEG data ({reason}); {fix}"
            raise ImageError(msg) from None
    return out
