"""The model side of retrieval: images and texts to unit-norm EVA-02-CLIP embeddings, and the record that
identifies an index's model (zoo name, checkpoint, config, preprocessing, and the embedding of a fixed
synthetic probe image), compared so that embeddings of two models never mix in one index.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eva02.data.images import ImageSource, load_image
from eva02.data.transforms import eval_transform
from eva02.dtypes import autocast, autocast_dtype
from eva02.fileio import PathLike
from eva02.model.clip import ClipConfig, Eva02Clip
from eva02.weights.zoo import Preprocess

PROBE_MIN_COSINE = 0.999  # the same weights agree far closer (fp32, any device); other weights far less


class IndexMismatch(ValueError):
    """An index (or an unfinished build) at `where` holds embeddings of `stored`, not of the `current` model,
    whose `why` ('config', 'preprocessing' or 'weights') differs."""

    def __init__(self, where: str, stored: dict[str, Any], current: dict[str, Any], why: str, fix: str) -> None:
        super().__init__(
            f"{where} holds embeddings of {describe_model(stored)}, not of {describe_model(current)} (other {why}; "
            f"models are never mixed in one index); {fix}"
        )
        self.where, self.stored, self.current, self.why = where, stored, current, why


def clip_preprocess(clip: Eva02Clip) -> Preprocess:
    """The CLIP models' eval preprocessing at the model's size (every zoo entry uses it)."""
    return Preprocess(img_size=clip.cfg.vision.img_size)


def _probe_image() -> Image.Image:
    """A fixed synthetic picture (gradients and a ripple) whose embedding identifies a model's weights."""
    y, x = np.mgrid[0:256, 0:256] / 255.0
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * np.pi * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@torch.inference_mode()
def embed_batch(clip: Eva02Clip, batch: torch.Tensor, dtype: str | None = None) -> torch.Tensor:
    """Preprocessed images (B, 3, S, S) -> unit-norm embeddings (B, E), fp32 on the CPU; `dtype` 'bf16' or
    'fp16' runs the tower under autocast."""
    device = next(clip.parameters()).device
    with autocast(device.type, autocast_dtype(dtype)):
        x = clip.encode_image(batch.to(device))
    return F.normalize(x.float(), dim=-1).cpu()


def embed_images(clip: Eva02Clip, images: Sequence[ImageSource], preprocess: Preprocess | None = None) -> torch.Tensor:
    """Image files, PIL images, arrays or tensors -> unit-norm embeddings (N, E), fp32."""
    tf = eval_transform(preprocess or clip_preprocess(clip))
    return embed_batch(clip, torch.stack([tf(load_image(im)) for im in images]))


@torch.inference_mode()
def embed_texts(clip: Eva02Clip, texts: Sequence[str]) -> torch.Tensor:
    """Texts -> unit-norm embeddings (N, E), fp32 (tokenized by `eva02.clip.tokenize`, the `clip` extra)."""
    ids = clip.tokenize(list(texts)).to(next(clip.parameters()).device)
    return clip.encode_text(ids, normalize=True).float().cpu()


def model_info(
    clip: Eva02Clip, preprocess: Preprocess | None = None, name: str | None = None, checkpoint: PathLike | None = None
) -> dict[str, Any]:
    """What an index records of its model: how to load it again, and what identifies it."""
    pre = preprocess or clip_preprocess(clip)
    probe = embed_batch(clip, eval_transform(pre)(_probe_image())[None])[0]  # (E,), always fp32
    info = {
        "name": name,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "config": clip.cfg.to_dict(),
        "preprocess": asdict(pre),
        "probe": [round(v, 6) for v in probe.tolist()],
    }
    return json.loads(json.dumps(info))  # tuples as lists: what a reloaded index holds


def describe_model(info: dict[str, Any]) -> str:
    if info.get("name") and info.get("checkpoint"):
        return f"{info['name']} with {info['checkpoint']}"
    return info.get("name") or info.get("checkpoint") or "a CLIP model without a name"


def _canonical(d: dict[str, Any], cls: Any) -> str:
    """A record's config or preprocessing as sorted JSON, with the fields added since it was written
    filled in with their defaults (so an older index still matches its model)."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        d = cls.from_dict(d).to_dict() if cls is ClipConfig else asdict(cls(**d))
    return json.dumps(d, sort_keys=True)


def check_same_model(stored: dict[str, Any], current: dict[str, Any], where: str, fix: str) -> None:
    """IndexMismatch (one line naming `where`, both models and `fix`) unless both are the same model:
    same config, same preprocessing and, where both records have one, the same probe embedding."""
    why = ""
    if _canonical(stored["config"], ClipConfig) != _canonical(current["config"], ClipConfig):
        why = "config"
    elif _canonical(stored["preprocess"], Preprocess) != _canonical(current["preprocess"], Preprocess):
        why = "preprocessing"
    elif "probe" in stored and "probe" in current:
        a, b = torch.tensor(stored["probe"]), torch.tensor(current["probe"])
        why = "weights" if F.cosine_similarity(a, b, dim=0).item() < PROBE_MIN_COSINE else ""
    if why:
        raise IndexMismatch(where, stored, current, why, fix)
