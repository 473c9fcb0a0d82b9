"""Image classification inference: `inference_model(name_or_model, image)` and the reusable `Predictor`.

Mirrors mmpretrain's `inference_model` result (`pred_label`, `pred_score`, `pred_class`, `pred_scores`)
and adds `topk`. A zoo name loads its released weights and its own preprocessing; an `Eva02` instance
is preprocessed from its config (CLIP mean/std, crop_pct 1.0 at `model.cfg.img_size`, the official
EVA-02 evaluation) unless a `Preprocess` is given. Also holds the batched file loop shared by the
`eva02 predict` and `eva02 features` commands, and the top-k drawing of `eva02 predict --out`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from eva02.data.images import ImageError, ImageSource, load_image
from eva02.data.transforms import eval_transform, preprocess_for_model
from eva02.dtypes import DTYPES, autocast, autocast_dtype, canonical
from eva02.imagenet import IMAGENET_CLASSES
from eva02.model.vit import Eva02
from eva02.weights.load import get_model, load_model, read_metadata
from eva02.weights.zoo import Preprocess, resolve

NO_HEAD = (
    "has no classifier head (num_classes=0), so it cannot predict classes; "
    "extract features with model.extract_feat(x) or `eva02 features`"
)


def resolve_device(device: str | torch.device | None, model: torch.nn.Module | None = None) -> torch.device:
    """`None`: the model's device if it has one, else CUDA when available, else CPU."""
    if device is None:
        if model is not None:
            return next(model.parameters()).device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
    return dev


def load_for_inference(
    model: str | Eva02 | None,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    preprocess: Preprocess | None = None,
    img_size: int | None = None,
    need_head: bool = False,
) -> tuple[Eva02, Preprocess]:
    """Model (eval mode, on `device`) and its eval preprocessing, from a zoo name, an `Eva02` or a checkpoint.

    With a name and `checkpoint`, the file is loaded into that zoo architecture; with only `checkpoint`,
    it must be an eva02 checkpoint that embeds its config. `need_head` refuses headless models before
    any weights are downloaded.
    """
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint file '{checkpoint}' does not exist")
    if isinstance(model, Eva02):
        if checkpoint is not None:
            raise ValueError("pass either an Eva02 instance or a checkpoint file, not both")
        dev = resolve_device(device, model)
        net, pre = model, preprocess or preprocess_for_model(model)
    elif isinstance(model, str):
        entry = resolve(model)
        if need_head and entry.cfg.num_classes == 0 and checkpoint is None:  # a checkpoint may bring a head
            raise ValueError(f"model '{entry.name}' {NO_HEAD}")  # before any download
        dev = resolve_device(device)
        net = get_model(entry, pretrained=checkpoint if checkpoint is not None else True, device=dev)
        pre = preprocess or entry.preprocess
    elif model is None and checkpoint is not None:
        dev = resolve_device(device)
        net = load_model(checkpoint)
        pre = preprocess or _zoo_preprocess_of(checkpoint, net) or preprocess_for_model(net)
    else:
        raise ValueError(f"model must be a zoo name or an Eva02 instance, got {type(model).__name__}")
    if need_head and not net.is_classifier:
        raise ValueError(f"this model {NO_HEAD}")
    if img_size is not None:
        if img_size <= 0 or img_size % net.cfg.patch_size:
            raise ValueError(f"img_size={img_size} must be a positive multiple of the patch size {net.cfg.patch_size}")
        pre = replace(pre, img_size=img_size)
    return net.to(dev).eval(), pre


def _zoo_preprocess_of(checkpoint: str | os.PathLike, net: Eva02) -> Preprocess | None:
    """The zoo preprocessing of a checkpoint saved with a zoo name, if it is for the same input size."""
    name = read_metadata(checkpoint).get("name")
    try:
        pre = resolve(name).preprocess if name else None
    except ValueError:  # a custom name, not one of the zoo
        return None
    return pre if pre is not None and pre.img_size == net.cfg.img_size else None


def class_names_for(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Given names, else ImageNet-1k names for 1000 classes, else 'class_<i>'."""
    if class_names is not None:
        names = list(class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names but the model has {num_classes} classes")
        return names
    if num_classes == len(IMAGENET_CLASSES):
        return list(IMAGENET_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]


# The autocast dtype of each word of `eva02.dtypes` (None: full precision), for `eva02.serve.runner`.
AUTOCAST_DTYPES = {None: None, **{word: autocast_dtype(word) for word in DTYPES}}


class Predictor:
    """A classifier loaded once, with its preprocessing; predicts images or preprocessed batches."""

    def __init__(
        self,
        model: str | Eva02 | None,
        *,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        preprocess: Preprocess | None = None,
        img_size: int | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = 16,
        amp: bool = False,
        dtype: str | None = None,
        compile: bool = False,
        threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.model, self.preprocess = load_for_inference(
            model, checkpoint=checkpoint, device=device, preprocess=preprocess, img_size=img_size, need_head=True
        )
        self.device = next(self.model.parameters()).device
        self.transform = eval_transform(self.preprocess)
        self.class_names = class_names_for(self.model.cfg.num_classes, class_names)
        self.batch_size = batch_size
        self.set_dtype("bf16" if amp and dtype is None else dtype)
        # torch.compile specialises on the input shape: the grid is fixed per model, so at most the last,
        # smaller batch of a run compiles a second graph.
        self.forward = torch.compile(self.model) if compile else self.model
        # On CPU, inductor's freezing (weights folded as constants and prepacked for oneDNN) is what makes
        # compiled inference pay; it applies to inference graphs only. See docs/performance.md.
        self.compile_options = {"freezing": True} if compile and self.device.type == "cpu" else {}

    def set_dtype(self, dtype: str | None) -> None:
        """Compute precision: None/'fp32', or 'bf16' / 'fp16' autocast (fp16 on CUDA only)."""
        if canonical(dtype) == "fp16" and self.device.type != "cuda":
            raise ValueError("dtype 'fp16' needs a CUDA device; on CPU use 'bf16' or 'fp32'")
        self.autocast_dtype = autocast_dtype(dtype)

    @property
    def amp(self) -> bool:
        return self.autocast_dtype is not None

    @amp.setter
    def amp(self, on: bool) -> None:  # bfloat16 autocast: faster on GPUs, probabilities differ at ~1e-3
        self.set_dtype("bf16" if on else None)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, S, S) -> class probabilities (B, C) float32."""
        x = batch.to(self.device, non_blocking=True)
        with autocast(self.device.type, self.autocast_dtype):
            if self.compile_options:
                import torch._inductor.config as inductor_config  # loads inductor: only when compiling

                with inductor_config.patch(self.compile_options):
                    logits = self.forward(x)  # (B, C)
            else:
                logits = self.forward(x)  # (B, C)
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def result(self, probs: np.ndarray, topk: int = 5) -> dict[str, Any]:
        """One image's probabilities (C,) -> the result dict."""
        k = min(max(int(topk), 1), probs.shape[-1])
        order = np.argsort(-probs, kind="stable")[:k]
        label = int(order[0])
        return {
            "pred_label": label,
            "pred_score": float(probs[label]),
            "pred_class": self.class_names[label],
            "pred_scores": probs.astype(np.float32, copy=False),
            "topk": [(int(i), self.class_names[i], float(probs[i])) for i in order],
        }

    def predict(self, images: Sequence[ImageSource], topk: int = 5) -> list[dict[str, Any]]:
        """Images (paths, PIL, arrays, tensors) -> one result dict each, in batches of `batch_size`."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack([self.transform(load_image(img)) for img in chunk])  # (B, 3, S, S)
            out.extend(self.result(p, topk) for p in self.probabilities(batch))
        return out


def inference_model(
    model: str | Eva02,
    image: ImageSource | Sequence[ImageSource],
    topk: int = 5,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    dtype: str | None = None,
    compile: bool = False,
    threads: int | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Classify one image (-> dict) or a list of images (-> list of dicts) with a zoo name or a model.

    Each dict: pred_label (int), pred_score (float), pred_class (str), pred_scores (float32 array of
    all class probabilities) and topk [(label, class, score), ...] sorted by score. `dtype` 'bf16' or
    'fp16' (CUDA) runs under autocast, `compile=True` through torch.compile, `threads` sets torch's
    CPU thread count.
    """
    predictor = Predictor(
        model, device=device, preprocess=preprocess, class_names=class_names, batch_size=batch_size,
        dtype=dtype, compile=compile, threads=threads,
    )  # fmt: skip
    if isinstance(image, (list, tuple)):
        return predictor.predict(list(image), topk)
    return predictor.predict([image], topk)[0]


# ------------------------------------------------------------------------------- file batches (CLI)
class ImageFileDataset(torch.utils.data.Dataset):
    """Paths -> (index, tensor or None, error or None); errors are returned, so one bad file skips only itself."""

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # a decoder bug must not end the whole run: report it against the file
            return i, None, f"cannot load image '{self.paths[i]}': {type(e).__name__}: {e}"


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, failed


def iter_file_batches(
    paths: Sequence[Path], transform, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Yield (indices, batch (B, 3, S, S) or None, [(index, error)]) in input order; decoding runs in workers."""
    loader = torch.utils.data.DataLoader(
        ImageFileDataset(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
    )
    yield from loader


def auto_workers(num_images: int, batch_size: int) -> int:
    """Worker processes only pay off beyond one batch; leave a core for the model."""
    if num_images <= batch_size:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


# ------------------------------------------------------------------------------------- drawing
def draw_topk(image: Image.Image, result: dict[str, Any], width: int = 512) -> Image.Image:
    """The image scaled to `width`, above a panel with one labelled horizontal bar per top-k class."""
    img = image.convert("RGB")
    scale = width / img.width
    img = img.resize((width, max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    rows = result["topk"]
    font = ImageFont.load_default(size=15)
    row_h, pad = 24, 8
    canvas = Image.new("RGB", (width, img.height + pad * 2 + row_h * len(rows)), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    bar_x, bar_w = width // 2, width // 2 - pad - 56
    for r, (label, name, score) in enumerate(rows):
        y = img.height + pad + r * row_h
        text = name if len(name) <= 30 else name[:29] + "…"
        draw.text((pad, y + 3), f"{text} ({label})", fill=(0, 0, 0), font=font)
        draw.rectangle((bar_x, y + 4, bar_x + bar_w, y + row_h - 4), fill=(232, 232, 232))
        colour = (33, 150, 83) if r == 0 else (66, 133, 244)
        draw.rectangle((bar_x, y + 4, bar_x + max(1, round(bar_w * score)), y + row_h - 4), fill=colour)
        draw.text((bar_x + bar_w + 6, y + 3), f"{100 * score:.1f}%", fill=(0, 0, 0), font=font)
    return canvas
