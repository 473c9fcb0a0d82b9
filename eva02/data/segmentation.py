"""Semantic segmentation data: image + label-map pairs, the official EVA-02 / mmseg ADE20K transforms.

Layouts under a root folder (pairs match by the path below the split folder, without extension):
- 'ade20k' (ADEChallengeData2016): `images/{training,validation}/*.jpg`, `annotations/{...}/*.png`;
  150 classes, label 0 is 'other' (see `reduce_zero_label`);
- 'folders': `images/SPLIT/*` (any image type) and `masks/SPLIT/*.png`.
A mask holds one class index per pixel (8-bit gray or palette PNG; 16-bit works too); 255 is ignored.
With `reduce_zero_label` (ADE20K) label 0 becomes 255 and every other label drops by one.

Transforms follow the official configs (`EVA-02/seg/configs/_base_/datasets/ade20k.py`, mmseg 0.29):
train: resize to a random multiple (ratio 0.5-2) of the (long, short) scale (2048, 512) keeping the aspect
ratio, a random crop of crop x crop in which no class takes more than `cat_max_ratio` of the labelled
pixels (10 tries), horizontal flip, photometric distortion (brightness, contrast, saturation, hue),
normalisation, zero padding to the crop (255 in the label map). Eval: resize within the scale keeping
the aspect ratio, normalise; the label map keeps its original size (metrics are computed there).
Resizing is bilinear without antialiasing for images (as OpenCV's) and nearest for labels.
A sample is drawn from a generator seeded by (seed, epoch, index), so augmentation is reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from eva02.data.datasets import BadSample, split_bad
from eva02.data.images import IMAGE_EXTENSIONS, ImageError, load_image

IGNORE = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the seg configs' normalisation (mmseg's 123.675, ... / 255)
IMAGENET_STD = (0.229, 0.224, 0.225)

LAYOUTS = {"ade20k": ("images", "annotations"), "folders": ("images", "masks")}

# ADE20K SceneParsing's 150 classes in label order (the short names of objectInfo150), as mmseg lists them.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, distinct for neighbouring labels: hues a golden angle apart, three
    saturation / value levels in turn."""
    i = np.arange(n)
    hue = (i * 0.618033988749895) % 1.0
    sat = np.array([0.9, 0.6, 0.75])[i % 3]
    val = np.array([0.95, 0.8, 0.65])[(i // 3) % 3]
    k = (hue[:, None] * 6 + np.array([5, 3, 1])) % 6  # HSV -> RGB, channel by channel
    rgb = val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------- files
class MaskError(ValueError):
    """A label map that cannot be used; one line naming the file and the reason."""


def find_pairs(root: str | os.PathLike, split: str, layout: str) -> list[tuple[str, str]]:
    """(image, mask) paths of a split, sorted; every image needs its mask (an error names the first missing)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown segmentation layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    img_dir, mask_dir = (Path(root) / sub / split for sub in LAYOUTS[layout])
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"folder {str(d)!r} does not exist; the {layout!r} layout is {LAYOUTS[layout][0]}/SPLIT and "
                f"{LAYOUTS[layout][1]}/SPLIT under data.root (set data.root, data.*_split or seg.layout)"
            )
    exts = (".jpg",) if layout == "ade20k" else IMAGE_EXTENSIONS
    images = _by_stem(img_dir, exts)
    masks = _by_stem(mask_dir, (".png",))
    missing = [p for stem, p in images.items() if stem not in masks]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(images)} images in {str(img_dir)!r} have no mask in {str(mask_dir)!r} "
            f"(same name, .png), e.g. {missing[0]!r}"
        )
    if not images:
        raise ValueError(f"no images found in {str(img_dir)!r} ({', '.join(sorted(exts))})")
    return [(images[s], masks[s]) for s in sorted(images)]


def _by_stem(folder: Path, exts: Sequence[str]) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                path = os.path.join(dirpath, f)
                out[os.path.splitext(os.path.relpath(path, folder))[0]] = path
    return out


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) as `load_image` will give it (EXIF rotations swap the sides), from the file's
    header only; None when the header cannot be read (the sample is then reported when it is loaded)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientation tag: a quarter turn
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None
    return (h, w) if turned else (w, h)


def check_sizes(pairs: Sequence[tuple[str, str]]) -> None:
    """Refuse a mask whose size differs from its image's (read from the headers), naming both files."""
    for img, mask in pairs:
        a, b = header_size(img), header_size(mask)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"mask {mask!r} is {b[0]}x{b[1]} but its image {img!r} is {a[0]}x{a[1]}; "
                "a mask must have its image's size"
            )


def load_mask(path: str) -> np.ndarray:
    """A label map file -> (H, W) int64 class indices; MaskError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise MaskError(
                    f"mask '{path}' is a {img.mode} image; a mask holds one class index per pixel "
                    "(8-bit gray or palette PNG)"
                )
            return np.asarray(img).astype(np.int64)
    except FileNotFoundError:
        raise MaskError(f"cannot load mask '{path}': no such file") from None
    except UnidentifiedImageError:
        raise MaskError(f"cannot load mask '{path}': not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, MaskError):
            raise
        raise MaskError(f"cannot load mask '{path}': truncated or corrupt ({' '.join(str(e).split())})") from None


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's labels: 0 ('other') -> ignored, 1..150 -> 0..149; 255 stays ignored."""
    out = label - 1
    out[(label == 0) | (label == IGNORE)] = IGNORE
    return out


# ----------------------------------------------------------------------------------- transforms
def resize_within(a: np.ndarray, scale: Sequence[int], nearest: bool = False) -> np.ndarray:
    """Resize (H, W[, C]) keeping the aspect ratio so that the long side is <= scale[0] and the short
    side <= scale[1], one of them reached (mmcv's `rescale_size`)."""
    h, w = a.shape[:2]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return resize(a, (int(h * f + 0.5), int(w * f + 0.5)), nearest)


def resize(a: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(H, W[, C]) array to `size` (h, w): bilinear without antialiasing (uint8 rounded), or nearest."""
    if a.shape[:2] == size:
        return a
    t = torch.from_numpy(np.array(a))  # a copy: PIL's arrays are read-only
    t = (t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]).float()
    if nearest:
        out = F.interpolate(t, size=size, mode="nearest")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)
        out = out.round().clamp(0, 255) if a.dtype == np.uint8 else out
    out = out[0, 0] if a.ndim == 2 else out[0].permute(1, 2, 0)
    return out.numpy().astype(a.dtype)


def random_crop(img: np.ndarray, label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """A crop x crop window (smaller where the image is) in which no class holds `cat_max_ratio` or more
    of the labelled pixels, if one of 10 random windows does (else the 10th)."""
    H, W = label.shape
    for _ in range(10):
        y = int(rng.integers(0, max(H - crop, 0) + 1))
        x = int(rng.integers(0, max(W - crop, 0) + 1))
        window = label[y : y + crop, x : x + crop]
        if cat_max_ratio >= 1:
            break
        counts = np.bincount(window[window != IGNORE].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return img[y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: each with probability 1/2, brightness +-32, contrast
    x0.5-1.5 (before or after the colour steps), saturation x0.5-1.5, hue +-18 of 180."""

    def coin() -> bool:
        return bool(rng.integers(2))

    def scaled(a: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if coin():
        img = scaled(img, beta=rng.uniform(-32, 32))
    contrast_first = coin()
    if contrast_first and coin():
        img = scaled(img, alpha=rng.uniform(0.5, 1.5))
    saturate, shift = coin(), coin()
    if saturate or shift:
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        if saturate:
            hsv[..., 1] = scaled(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        if shift:  # PIL's hue runs over 0..255 where OpenCV's runs over 0..179
            delta = int(rng.integers(-18, 18)) * 256 / 180
            hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + delta) % 256).astype(np.uint8)
        img = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and coin():
        img = scaled(img, alpha=rng.uniform(0.5, 1.5))
    return img


def to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float (3, H, W); mean and std on the 0-1 scale."""
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)
    return (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class SegTrainTransform:
    """(RGB image, label map, generator) -> (normalised image, long labels), both crop x crop."""

    def __init__(
        self,
        crop: int,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop, self.scale, self.ratio_range, self.cat_max_ratio = (
            crop,
            tuple(scale),
            tuple(ratio_range),
            cat_max_ratio,
        )
        self.hflip, self.photometric, self.mean, self.std = hflip, photometric, tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, label: np.ndarray, rng: np.random.Generator):
        a = np.asarray(img)
        r = rng.uniform(*self.ratio_range)
        scale = (int(self.scale[0] * r), int(self.scale[1] * r))
        a, label = resize_within(a, scale), resize_within(label, scale, nearest=True)
        a, label = random_crop(a, label, self.crop, self.cat_max_ratio, rng)
        if rng.uniform() < self.hflip:
            a, label = a[:, ::-1], label[:, ::-1]
        if self.photometric:
            a = photometric_distortion(np.ascontiguousarray(a), rng)
        x = to_tensor(a, self.mean, self.std)
        y = torch.from_numpy(np.ascontiguousarray(label))
        ph, pw = self.crop - y.shape[0], self.crop - y.shape[1]
        if ph or pw:  # an image smaller than the crop: zeros after normalisation, ignored labels
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
        return x, y


class SegEvalTransform:
    """(RGB image, label map, generator) -> (normalised image resized within `scale`, labels as they are)."""

    def __init__(self, scale: Sequence[int] = (2048, 512), mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.scale, self.mean, self.std = tuple(scale), tuple(mean), tuple(std)

    def image(self, img: Image.Image) -> torch.Tensor:
        """The model input of one image (also what `eva02 segment` feeds the model)."""
        return to_tensor(resize_within(np.asarray(img), self.scale), self.mean, self.std)

    def __call__(self, img: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None):
        return self.image(img), torch.from_numpy(np.ascontiguousarray(label))


# ------------------------------------------------------------------------------------ dataset
class SegDataset(Dataset):
    """(image, mask) pairs -> (image tensor, label tensor, index), or a BadSample naming the unusable file.

    A key is an index or an (index, seed) pair (`TrainSampler`); the seed drives the augmentation.
    Labels outside [0, num_classes) other than 255 make the sample bad (its reason says which label).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        transform: Callable,
        num_classes: int,
        reduce_zero: bool = False,
        classes: Sequence[str] = (),
    ) -> None:
        self.pairs = list(pairs)
        self.transform = transform
        self.num_classes = num_classes
        self.reduce_zero = reduce_zero
        self.classes = list(classes) or [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The image and its label map (reduced, checked); ImageError / MaskError otherwise."""
        img_path, mask_path = self.pairs[index]
        img = load_image(img_path)
        label = load_mask(mask_path)
        if label.shape != (img.height, img.width):
            raise MaskError(
                f"mask '{mask_path}' is {label.shape[1]}x{label.shape[0]} but its image is {img.width}x{img.height}"
            )
        if self.reduce_zero:
            label = reduce_zero_label(label)
        bad = ((label >= self.num_classes) & (label != IGNORE)) | (label < 0)
        if bad.any():
            raise MaskError(
                f"mask '{mask_path}' holds label {int(label[bad][0])}, outside [0, {self.num_classes}) and not "
                f"the ignored 255{' (after reduce_zero_label)' if self.reduce_zero else ''}"
            )
        return img, label

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            img, label = self.load(index)
        except (ImageError, MaskError, OSError) as e:
            return BadSample(self.pairs[index][0], str(e))
        x, y = self.transform(img, label, np.random.default_rng(seed))
        return x, y, index


def collate_seg(items: list) -> dict:
    """Stack samples of one size (training crops); images of several sizes (evaluation) stay lists.
    Unusable samples are listed under 'bad' as (path, reason)."""
    good, bad = split_bad(items)
    if not good:
        return {"images": None, "targets": None, "index": None, "bad": bad}
    images, targets, index = zip(*good, strict=True)
    same = len({tuple(x.shape) for x in images}) == 1 and len({tuple(y.shape) for y in targets}) == 1
    return {
        "images": torch.stack(images) if same else list(images),
        "targets": torch.stack(targets).long() if same else [y.long() for y in targets],
        "index": torch.as_tensor(index, dtype=torch.long),
        "bad": bad,
    }
