"""Image loading: any path, PIL image, array or tensor -> an RGB PIL image, with clear errors.

Every source ends as 8-bit RGB, the input the eval transforms expect:
- EXIF orientation is applied, so a phone photo is upright as any viewer shows it;
- transparency (RGBA, LA, palette with a transparent colour) is composited on a white background,
  because the hidden colour of fully transparent pixels is arbitrary (often black) and would be seen
  by the model if the alpha channel were simply dropped;
- 16-bit images (PIL modes I;16*, I) are scaled from 0..65535 to 0..255 (value / 257), not clipped;
- CMYK, grayscale, bilevel and palette images are converted with PIL's own conversions.
Files are fully decoded on load, so a truncated or corrupt file fails here, naming the file, instead
of later inside a batch. Over-large images (PIL's decompression-bomb limit) are refused.

One exception, for training transforms that pick their crop before decoding: inside
`deferred_jpeg_decoding()`, `load_image` and `decode_image` give a JPEG as an `EncodedImage` (header read,
upright size known, pixels not decoded); its `decode(reduce)` then decodes it, at 1/2, 1/4 or 1/8 of its size
when asked (libjpeg's DCT scaling, PIL's `Image.draft`), with the same conversions and the same errors.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from eva02.fileio import atomic_write

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
BACKGROUND = (255, 255, 255)  # what transparent pixels become

ImageSource = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the source and the reason."""


def load_image(src: ImageSource) -> Image.Image:
    """Load a path, PIL image, numpy array (HW, HWC) or tensor (CHW, HW) as an RGB PIL image (a JPEG file
    inside `deferred_jpeg_decoding()`: an `EncodedImage`)."""
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, torch.Tensor):
        return _from_array(_tensor_to_hwc(src), "tensor")
    if isinstance(src, np.ndarray):
        return _from_array(src, "array")
    if isinstance(src, (str, os.PathLike)):
        return _open_path(Path(src))
    raise ImageError(f"cannot load an image from a {type(src).__name__}: pass a path, PIL image, array or tensor")


def read_bytes(path: str | os.PathLike, name: str = "") -> bytes:
    """The bytes of image file `path`; ImageError naming `name` (default: the path) when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot load image '{name or path}': {e.strerror or e}") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Image bytes (an image file's contents) -> upright RGB, with the checks and errors of loading the
    file itself; `name` names the source in the error (a path, a shard sample, a dataset row). A JPEG
    inside `deferred_jpeg_decoding()` comes back as an `EncodedImage`."""
    if not data:
        raise ImageError(f"cannot load image '{name}': no image data (0 bytes)")
    return _decode(data, name)


def _open_path(path: Path) -> Image.Image:
    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load image '{path}': {reason}")

    if not path.exists():
        raise fail("no such file")
    if path.is_dir():
        raise fail("it is a directory (pass the files, or the directory to a command that expands it)")
    if path.stat().st_size == 0:
        raise fail("the file is empty (0 bytes)")
    if _DEFER_JPEG.get():  # the file's bytes in memory: an EncodedImage holds no open file
        return _decode(read_bytes(path), str(path))
    return _decode(path, str(path))


@contextlib.contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """PIL's errors while opening or decoding -> ImageError naming `name`; decompression bombs refused."""

    def fail(reason: str) -> ImageError:
        return ImageError(f"cannot load image '{name}': {reason}")

    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; a bomb is refused either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise fail(
            f"too many pixels ({e}); if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS before loading"
        ) from None
    except UnidentifiedImageError:
        raise fail("not an image format PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise fail(f"truncated or corrupt image data ({reason})") from None


def _decode(src: Path | bytes, name: str) -> Image.Image:
    """Fully decode (truncated or corrupt data fails here) to RGB; decompression bombs refused."""
    with _decode_errors(name):
        in_memory = not isinstance(src, Path)
        img = Image.open(io.BytesIO(src) if in_memory else src)
        if _DEFER_JPEG.get() and img.format == "JPEG" and in_memory:
            return EncodedImage(img, name, bytes(src))
        with img:
            img.load()  # full decode now: truncated or corrupt data fails here
            return to_rgb(img)


# ------------------------------------------------------------------------------------ deferred JPEG decoding
_DEFER_JPEG: contextvars.ContextVar[bool] = contextvars.ContextVar("eva02_defer_jpeg", default=False)
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@contextlib.contextmanager
def deferred_jpeg_decoding() -> Iterator[None]:
    """Within it, `load_image(path)` and `decode_image` give JPEGs as `EncodedImage`s; other images as always."""
    token = _DEFER_JPEG.set(True)
    try:
        yield
    finally:
        _DEFER_JPEG.reset(token)


class EncodedImage:
    """A JPEG opened but not decoded (`img`, from the file's bytes `data`): `size` is its upright (width, height),
    as `load_image` would give it, and `decode` gives the RGB image, at a reduced size when asked. Decode it once."""

    def __init__(self, img: Image.Image, name: str, data: bytes) -> None:
        self.img, self.name, self.data = img, name, data
        self.orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        w, h = img.size
        self.size = (h, w) if self.orientation in _TRANSPOSED else (w, h)

    def decode(self, reduce: int = 1) -> tuple[Image.Image, int]:
        """(upright RGB image, factor): the image at 1/factor of its size in each side, rounded up; `factor` is
        `reduce` (1, 2, 4 or 8) when the decoder can scale this file (baseline and progressive JPEGs), else 1.
        Image coordinates x of the full image are x / factor in the reduced one."""
        img, factor = self.img, 1
        with _decode_errors(self.name):
            if reduce > 1:
                w, h = img.size
                drafted = img.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))
                if drafted is not None:
                    factor = round(w / drafted[1][2])
            img.load()
        if img.mode == "RGB" and self.orientation == 1:
            return img, factor  # to_rgb would only copy it
        rgb = to_rgb(img)
        img.close()
        return rgb, factor


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB copy of any PIL image (EXIF orientation, alpha, 16-bit, CMYK handled)."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img  # exif_transpose already returned a new image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert a {mode} image to RGB ({e})") from None


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float gray -> 8-bit RGB; 16-bit ranges are scaled, not clipped."""
    a = np.asarray(img)
    if img.mode == "F":
        # Float images: [0, 1] when they look normalised, else treated as 0..255 values.
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        a8 = np.clip(np.nan_to_num(a) * scale, 0, 255).round()
    elif img.mode.startswith("I;16") or a.size and a.max() > 255:
        # 16-bit data: 65535 -> 255 exactly (257 = 65535 / 255). Wider 'I' values are clipped to 16 bits.
        a8 = (np.clip(a.astype(np.float64), 0, 65535) / 257.0).round()
    else:
        a8 = np.clip(a, 0, 255)
    return Image.fromarray(a8.astype(np.uint8), "L").convert("RGB")


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dim() == 3:
        if t.shape[0] not in (1, 3, 4):
            raise ImageError(f"tensor of shape {tuple(t.shape)} is not CHW with 1, 3 or 4 channels")
        t = t.permute(1, 2, 0)
    elif t.dim() != 2:
        raise ImageError(f"tensor of shape {tuple(t.shape)} is not one image (CHW or HW); pass images one by one")
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    return t.numpy()


def _from_array(a: np.ndarray, what: str) -> Image.Image:
    """HW or HWC (C = 1, 3, 4) array, uint8 / uint16 / float in [0, 1] / bool -> RGB image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{what} of shape {a.shape} is not an image: expected HW or HWC with 1, 3 or 4 channels")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < 0.0 or np.nanmax(a) > 1.0):
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            raise ImageError(f"float {what} has values in [{lo:.3g}, {hi:.3g}]; float images must be in [0, 1]")
        a = (np.nan_to_num(a) * 255.0).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ImageError(
                f"{what} of dtype {a.dtype} has values outside 0..255; pass uint8, uint16 or [0, 1] floats"
            )
        a = a.astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[2] if a.ndim == 3 else 2]
    return to_rgb(Image.fromarray(np.ascontiguousarray(a), mode))


def iter_image_paths(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files given as they are, directories expanded recursively (sorted, image extensions only).

    Duplicates are dropped, first occurrence kept. Missing paths are kept, so the caller reports them
    with the same per-file error as any other unreadable image.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not _hidden(f, p)
            )
        else:
            found = [p]
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def _hidden(f: Path, root: Path) -> bool:
    """Dot-files and files inside dot-directories below `root` (e.g. .ipynb_checkpoints) are skipped."""
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def save_image_atomic(img: Image.Image, path: str | os.PathLike, **save_kwargs) -> Path:
    """Save through `eva02.fileio.atomic_write` (a temporary file, then a rename): never a half-written image."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"cannot save '{path}': unknown image extension {path.suffix!r}; use .png or .jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **save_kwargs))
