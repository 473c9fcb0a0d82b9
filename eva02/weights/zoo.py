"""The model zoo: every name of the reference page (mmpretrain's EVA-02 page) and its timm aliases.

Each entry carries the model config, preprocessing, the page's reported numbers and the weight sources
(official BAAI files on the Hugging Face hub, timm's hub copies, mmpretrain's URLs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eva02.model.config import VARIANTS, Eva02Config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize the short side to img_size / crop_pct (bicubic), then center-crop."""

    img_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    crop_mode: str = "center"  # 'center' or 'squash' (resize both sides to img_size, no crop)


@dataclass(frozen=True)
class WeightSource:
    """One place a checkpoint can be downloaded from."""

    kind: str  # 'official' | 'timm' | 'mmpretrain'
    url: str  # full https URL of the file
    filename: str  # file name in the cache
    sha256: str | None = None  # full hex digest where known; checked after download
    sha256_prefix: str | None = None  # leading hex digits where only those are published (mmpretrain file names)
    fmt: str = "auto"  # 'official' | 'timm' | 'mmpretrain' | 'eva02' | 'auto'


@dataclass(frozen=True)
class ZooEntry:
    """One named model of the zoo."""

    name: str  # the reference page's name, e.g. 'eva02-tiny-p14_in21k-pre_3rdparty_in1k'
    cfg: Eva02Config
    preprocess: Preprocess
    sources: tuple[WeightSource, ...] = ()
    aliases: tuple[str, ...] = ()  # timm-style names and mmpretrain's long metafile names
    pretrain_data: str = "in21k"  # 'in21k' | 'm38m'
    top1: float | None = None  # the page's reported accuracy
    top5: float | None = None
    page_params_m: float | None = None  # the page's Params (M) column (counts mmpretrain's zero k-bias)
    page_flops_g: float | None = None  # the page's Flops (G) column (multiply-adds)
    weights_patch_size: int | None = None  # checkpoint patch size when it differs (p16 from p14 weights)
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
