"""The model zoo: every name of the reference page (mmpretrain's EVA-02 page) and its timm aliases.

Each entry carries the model config, preprocessing, the page's reported numbers and the weight sources
(official BAAI files on the Hugging Face hub, timm's hub copies, mmpretrain's URLs), in that order.

Where the numbers come from:
- names, Params (M), Flops (G), top-1/top-5: the page (mmpretrain `configs/eva02/README.md`);
- mmpretrain's metafile names and URLs: `configs/eva02/metafile.yml` (its file names end in the first
  8 hex digits of the file's sha256, kept as `sha256_prefix`);
- official file names: `EVA-02/asuka/README.md` of github.com/baaivision/EVA (files on the hub repo
  `Yuxin-CV/EVA-02`); timm names and tags: `timm/models/eva.py` (files on the hub as `timm/<name>`);
- full sha256 digests: the "Git LFS Details" of the hub's file pages, recorded only for the files whose
  page could be read (`_OFFICIAL_SHA256`). The other hub files are checked against the sha256 the hub
  states at download time, and every download gets a format and size check (`weights/download.py`).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field

from eva02.model.config import CLIP_VARIANTS, VARIANTS, ClipConfig, Eva02Config

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
    # The official README reports this model with its EMA weights (`model_ema` in the official .pt),
    # so a loader of the official file should prefer that key when it is present.
    official_ema: bool = False

    @property
    def task(self) -> str:
        """'headless' (MIM pre-trained backbone, no classifier) or 'in1k' (ImageNet-1k classifier)."""
        return "in1k" if self.cfg.num_classes else "headless"


_HF_OFFICIAL = "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/"
_MMP = "https://download.openmmlab.com/mmpretrain/v1.0/eva02/"


# sha256 of official files, as the Git LFS details of their hub pages state them
# (huggingface.co/Yuxin-CV/EVA-02/blob/main/eva02/<path>; all uploaded in the repo's commit 92194f7).
# The files missing here had no page we could read: they get the hub's stated sha256 at download time.
_OFFICIAL_SHA256 = {
    "pt/eva02_B_pt_in21k_p14.pt": "e5950aad2b263ed6c5410dc6c73af3a9c0201e95d14db7e17f527251d792fa24",
    "pt/eva02_L_pt_in21k_p14.pt": "8b8de52c6bb561b6e8b82d3ad949784e315400a72c6c0303cfcacad01af51635",
    "pt/eva02_B_pt_in21k_p14to16.pt": "ba3d9c09683e4a8aea52e8575644102a8abab1786f8b7e5ead0c68d6a65b2d76",
    "pt/eva02_L_pt_in21k_p14to16.pt": "7ad33c9cad01f8f6a3dba32264cdafaa1731e2be267f5072afaa214eb3591ac4",
    "pt/eva02_L_pt_m38m_p14to16.pt": "9736d5e3e0c4b88081dd0615976e4d706ef5d7f8ed527a56e0a238c777a2b7e0",
}


def _official(path: str) -> WeightSource:
    """A file of the official hub repo, `path` relative to its `eva02/` folder (e.g. 'pt/x.pt')."""
    sha = _OFFICIAL_SHA256.get(path)
    return WeightSource("official", _HF_OFFICIAL + path, path.rsplit("/", 1)[-1], sha256=sha, fmt="official")


def _timm(name: str) -> WeightSource:
    # Every timm hub repo names its file model.safetensors, so the cache name carries the model name.
    url = f"https://huggingface.co/timm/{name}/resolve/main/model.safetensors"
    return WeightSource("timm", url, f"{name}.safetensors", fmt="timm")


def _mmp(stem: str, prefix: str) -> WeightSource:
    filename = f"{stem}_20230505-{prefix}.pth"
    return WeightSource("mmpretrain", _MMP + filename, filename, sha256_prefix=prefix, fmt="mmpretrain")


_HEADLESS_NOTE = (
    "MIM pre-trained backbone (224 px), no classifier; features come from the final per-token norm. "
    "mmpretrain's converted file drops that norm, so the official or timm file is preferred."
)
_MEDFT_NOTE = (
    "Fine-tuned MIM -> IN-21K -> IN-1K. The official README reports the EMA weights (top-1 {off}), "
    "as does timm's copy; the page's top-1 comes from mmpretrain's conversion of the non-EMA weights."
)


def _headless(
    name: str,
    size: str,
    patch: int,
    sources: tuple[WeightSource, ...],
    aliases: tuple[str, ...],
    params: float,
    flops: float,
    data: str = "in21k",
    notes: str = "",
    extra: dict | None = None,
) -> ZooEntry:
    cfg = VARIANTS[size].replace(img_size=224, patch_size=patch, num_classes=0)
    return ZooEntry(
        name=name,
        cfg=cfg,
        # Headless models have no evaluation protocol; crop_pct 1.0 follows the official fine-tuning
        # evaluation (timm's cards use 0.9 for these 224 px models).
        preprocess=Preprocess(img_size=224),
        sources=sources,
        aliases=aliases,
        pretrain_data=data,
        page_params_m=params,
        page_flops_g=flops,
        weights_patch_size=14 if patch != 14 else None,
        notes=" ".join(s for s in (_HEADLESS_NOTE, notes) if s),
        extra=extra or {},
    )


def _in1k(
    name: str,
    size: str,
    sources: tuple[WeightSource, ...],
    aliases: tuple[str, ...],
    acc: tuple[float, float],
    params: float,
    flops: float,
    data: str = "in21k",
    ema: bool = False,
    notes: str = "",
) -> ZooEntry:
    img = 336 if size in ("tiny", "small") else 448
    return ZooEntry(
        name=name,
        cfg=VARIANTS[size].replace(img_size=img, num_classes=1000),
        preprocess=Preprocess(img_size=img),  # official eval: crop_pct 1.0, center crop, bicubic
        sources=sources,
        aliases=aliases,
        pretrain_data=data,
        top1=acc[0],
        top5=acc[1],
        page_params_m=params,
        page_flops_g=flops,
        official_ema=ema,
        notes=notes,
    )


# Sources shared by a p14 headless entry and its p16 twin (which loads the p14 file and resamples it).
_PT = {
    "tiny": (_official("pt/eva02_Ti_pt_in21k_p14.pt"), _timm("eva02_tiny_patch14_224.mim_in22k"),
             _mmp("eva02-tiny-p14_pre_in21k", "d703e7b1")),
    "small": (_official("pt/eva02_S_pt_in21k_p14.pt"), _timm("eva02_small_patch14_224.mim_in22k"),
              _mmp("eva02-small-p14_pre_in21k", "3175f463")),
    "base": (_official("pt/eva02_B_pt_in21k_p14.pt"), _timm("eva02_base_patch14_224.mim_in22k"),
             _mmp("eva02-base-p14_pre_in21k", "2f2d4d3c")),
    "large": (_official("pt/eva02_L_pt_in21k_p14.pt"), _timm("eva02_large_patch14_224.mim_in22k"),
              _mmp("eva02-large-p14_pre_in21k", "9072de5d")),
    "large_m38m": (_official("pt/eva02_L_pt_m38m_p14.pt"), _timm("eva02_large_patch14_224.mim_m38m"),
                   _mmp("eva02-large-p14_pre_m38m", "b8a1a261")),
}  # fmt: skip

_P16_NOTE = (
    "Patch 16 at 224 px (14x14 grid): built from the p14 weights, whose patch kernel and position "
    "embedding are resampled at load. The official repo also ships its own p14to16 file ({url}), "
    "interpolated differently; it is listed under extra['official_p14to16'] and not used by default."
)


def _p16_extra(file: str) -> dict:
    """Keyword arguments (notes, extra) of a p16 entry whose official p14to16 file is `file`."""
    url = _HF_OFFICIAL + "pt/" + file
    extra = {"official_p14to16": url, "official_p14to16_sha256": _OFFICIAL_SHA256.get("pt/" + file)}
    return {"notes": _P16_NOTE.format(url=url), "extra": extra}


_ENTRIES = (
    # ---- Pretrained models (headless, MIM on IN-21K or Merged-38M, 224 px)
    _headless(
        "eva02-tiny-p14_in21k-pre_3rdparty_in21k", "tiny", 14, _PT["tiny"],
        ("eva02_tiny_patch14_224.mim_in22k", "eva02_tiny_patch14_224", "vit-tiny-p14_eva02-pre_in21k"),
        5.50, 1.70,
    ),
    _headless(
        "eva02-small-p14_in21k-pre_3rdparty_in21k", "small", 14, _PT["small"],
        ("eva02_small_patch14_224.mim_in22k", "eva02_small_patch14_224", "vit-small-p14_eva02-pre_in21k"),
        21.62, 6.14,
    ),
    _headless(
        "eva02-base-p14_in21k-pre_3rdparty_in21k", "base", 14, _PT["base"],
        ("eva02_base_patch14_224.mim_in22k", "eva02_base_patch14_224", "vit-base-p14_eva02-pre_in21k"),
        85.37, 23.22,
        notes="The page's 85.37 M is a typo: mmpretrain's metafile gives 85,766,400 (85.77 M).",
    ),
    _headless(
        "eva02-base-p16_in21k-pre_3rdparty_in21k", "base", 16, _PT["base"], (), 85.86, 17.61,
        **_p16_extra("eva02_B_pt_in21k_p14to16.pt"),
    ),
    _headless(
        "eva02-large-p14_in21k-pre_3rdparty_in21k", "large", 14, _PT["large"],
        ("eva02_large_patch14_224.mim_in22k", "eva02_large_patch14_224", "vit-large-p14_eva02-pre_in21k"),
        303.29, 81.15,
    ),
    _headless(
        "eva02-large-p16_in21k-pre_3rdparty_in21k", "large", 16, _PT["large"], (), 303.41, 61.66,
        **_p16_extra("eva02_L_pt_in21k_p14to16.pt"),
    ),
    _headless(
        "eva02-large-p14_m38m-pre_3rdparty_m38m", "large", 14, _PT["large_m38m"],
        ("eva02_large_patch14_224.mim_m38m", "vit-large-p14_eva02-pre_m38m"),
        303.29, 81.15, data="m38m",
    ),
    _headless(
        "eva02-large-p16_m38m-pre_3rdparty_m38m", "large", 16, _PT["large_m38m"], (), 303.41, 61.66, data="m38m",
        **_p16_extra("eva02_L_pt_m38m_p14to16.pt"),
    ),
    # ---- ImageNet-1k classifiers, fine-tuned directly from MIM
    _in1k(
        "eva02-tiny-p14_in21k-pre_3rdparty_in1k", "tiny",
        (_official("cls/in1k/eva02_Ti_pt_in21k_ft_in1k_p14.pt"), _timm("eva02_tiny_patch14_336.mim_in22k_ft_in1k"),
         _mmp("eva02-tiny-p14_in21k-pre_3rdparty_in1k-336px", "a4e8708a")),
        ("eva02_tiny_patch14_336.mim_in22k_ft_in1k", "eva02_tiny_patch14_336",
         "vit-tiny-p14_eva02-in21k-pre_3rdparty_in1k-336px"),
        (80.69, 95.54), 5.76, 4.68,
    ),
    _in1k(
        "eva02-small-p14_in21k-pre_3rdparty_in1k", "small",
        (_official("cls/in1k/eva02_S_pt_in21k_ft_in1k_p14.pt"), _timm("eva02_small_patch14_336.mim_in22k_ft_in1k"),
         _mmp("eva02-small-p14_in21k-pre_3rdparty_in1k-336px", "9c5b0e85")),
        ("eva02_small_patch14_336.mim_in22k_ft_in1k", "eva02_small_patch14_336",
         "vit-small-p14_eva02-in21k-pre_3rdparty_in1k-336px"),
        (85.77, 97.60), 22.13, 15.48,
    ),
    _in1k(
        "eva02-base-p14_in21k-pre_3rdparty_in1k", "base",
        (_official("cls/in1k/eva02_B_pt_in21k_ft_in1k_p14.pt"), _timm("eva02_base_patch14_448.mim_in22k_ft_in1k"),
         _mmp("eva02-base-p14_in21k-pre_3rdparty_in1k-448px", "8ad211c5")),
        ("eva02_base_patch14_448.mim_in22k_ft_in1k", "vit-base-p14_eva02-in21k-pre_3rdparty_in1k-448px"),
        (88.29, 98.53), 87.13, 107.11,
    ),
    _in1k(
        "eva02-large-p14_in21k-pre_3rdparty_in1k", "large",
        (_official("cls/in1k/eva02_L_pt_in21k_ft_in1k_p14.pt"), _timm("eva02_large_patch14_448.mim_in22k_ft_in1k")),
        ("eva02_large_patch14_448.mim_in22k_ft_in1k",),
        (89.51, 98.86), 305.10, 362.33, ema=True,
        notes="Not in mmpretrain's metafile (no mmpretrain file); official EMA weights, official top-1 89.6.",
    ),
    _in1k(
        "eva02-large-p14_m38m-pre_3rdparty_in1k", "large",
        (_official("cls/in1k/eva02_L_pt_m38m_ft_in1k_p14.pt"), _timm("eva02_large_patch14_448.mim_m38m_ft_in1k")),
        ("eva02_large_patch14_448.mim_m38m_ft_in1k",),
        (89.39, 98.80), 305.10, 362.33, data="m38m", ema=True,
        notes="Not in mmpretrain's metafile (no mmpretrain file); official EMA weights, official top-1 89.6.",
    ),
    # ---- ImageNet-1k classifiers with IN-21K intermediate fine-tuning
    _in1k(
        "eva02-base-p14_in21k-pre_in21k-medft_3rdparty_in1k", "base",
        (_official("cls/in21k_to_in1k/eva02_B_pt_in21k_medft_in21k_ft_in1k_p14.pt"),
         _timm("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k"),
         _mmp("eva02-base-p14_in21k-pre_in21k-medft_3rdparty_in1k-448px", "5cd4d87f")),
        ("eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", "eva02_base_patch14_448",
         "vit-base-p14_eva02-in21k-pre_in21k-medft_3rdparty_in1k-448px"),
        (88.47, 98.62), 87.13, 107.11, ema=True, notes=_MEDFT_NOTE.format(off="88.6"),
    ),
    _in1k(
        "eva02-large-p14_in21k-pre_in21k-medft_3rdparty_in1k", "large",
        (_official("cls/in21k_to_in1k/eva02_L_pt_in21k_medft_in21k_ft_in1k_p14.pt"),
         _timm("eva02_large_patch14_448.mim_in22k_ft_in22k_in1k"),
         _mmp("eva02-large-p14_in21k-pre_in21k-medft_3rdparty_in1k-448px", "926d1599")),
        ("eva02_large_patch14_448.mim_in22k_ft_in22k_in1k", "eva02_large_patch14_448",
         "vit-large-p14_eva02-in21k-pre_in21k-medft_3rdparty_in1k-448px"),
        (89.66, 98.95), 305.08, 362.33, ema=True,
        notes=_MEDFT_NOTE.format(off="89.9") + " The page's 305.08 M differs from the metafile's 305,104,808.",
    ),
    _in1k(
        "eva02-large-p14_m38m-pre_in21k-medft_3rdparty_in1k", "large",
        (_official("cls/in21k_to_in1k/eva02_L_pt_m38m_medft_in21k_ft_in1k_p14.pt"),
         _timm("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"),
         _mmp("eva02-large-p14_m38m-pre_in21k-medft_3rdparty_in1k-448px", "150dc5ed")),
        ("eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
         "vit-large-p14_eva02_m38m-pre_in21k-medft_3rdparty_in1k-448px"),
        (89.83, 99.00), 305.10, 362.33, data="m38m", ema=True, notes=_MEDFT_NOTE.format(off="90.0"),
    ),
)  # fmt: skip

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def _build_aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for e in _ENTRIES:
        for a in e.aliases:
            key = a.lower()
            if key in out or key in {n.lower() for n in ZOO}:
                raise RuntimeError(f"zoo alias {a!r} is not unique")  # a table error, caught by the tests
            out[key] = e.name
    return out


# alias (lower case) -> page name
ALIASES: dict[str, str] = _build_aliases()
_LOOKUP: dict[str, str] = {**{n.lower(): n for n in ZOO}, **ALIASES}


def resolve(name: str) -> ZooEntry:
    """The zoo entry of a page name or alias (case-insensitive); ValueError with suggestions otherwise."""
    key = name.strip().lower()
    if key in _LOOKUP:
        return ZOO[_LOOKUP[key]]
    spelled = {n.lower(): n for n in ZOO} | {a.lower(): a for e in ZOO.values() for a in e.aliases}
    close = difflib.get_close_matches(key, list(spelled), n=3, cutoff=0.0)
    hint = ", ".join(spelled[c] for c in close)
    raise ValueError(f"unknown model name {name!r}; closest: {hint} (run `eva02 list` for all names)")


def list_models(pattern: str | None = None) -> list[str]:
    """Page names matching a shell-style pattern (case-insensitive), in the page's order."""
    if not pattern:
        return list(ZOO)
    pat = pattern.strip().lower()
    return [n for n in ZOO if fnmatch.fnmatchcase(n.lower(), pat)]


# ------------------------------------------------------------------------------- EVA-02-CLIP
# Names are BAAI's model-config names (`EVA02-CLIP-B-16`, ...); open_clip's names (with or without its
# pretrained tag), timm's hub names and BAAI's file names are aliases. Weights: open_clip's copies on the
# hub (`timm/<tower>.<tag>`, open_clip's state dict), then BAAI's EVA-CLIP files (`QuanSun/EVA-CLIP`).
# zero_shot_top1: BAAI's reported ImageNet-1k zero-shot top-1 (80 prompt templates).
@dataclass(frozen=True)
class ClipEntry:
    """One named EVA-02-CLIP model."""

    name: str
    cfg: ClipConfig
    preprocess: Preprocess
    sources: tuple[WeightSource, ...] = ()
    aliases: tuple[str, ...] = ()
    pretrain_data: str = ""
    zero_shot_top1: float | None = None  # BAAI's reported ImageNet-1k zero-shot top-1
    notes: str = ""
    official_ema: bool = False  # (the loaders' interface; CLIP files hold one weight set)

    @property
    def task(self) -> str:
        return "clip"


def _open_clip(tower: str, tag: str) -> WeightSource:
    url = f"https://huggingface.co/timm/{tower}.{tag}/resolve/main/open_clip_pytorch_model.bin"
    return WeightSource("open_clip", url, f"{tower}.{tag}.open_clip.bin", fmt="open_clip")


def _baai(file: str) -> WeightSource:
    return WeightSource(
        "official", f"https://huggingface.co/QuanSun/EVA-CLIP/resolve/main/{file}", file, fmt="eva_clip"
    )


def _entry(name, variant, oc_name, tag, tower, file, data, top1) -> ClipEntry:
    cfg = CLIP_VARIANTS[variant]
    return ClipEntry(
        name=name,
        cfg=cfg,
        preprocess=Preprocess(img_size=cfg.vision.img_size),  # open_clip: shortest side, bicubic, center crop
        sources=(_open_clip(tower, tag), _baai(file)),
        aliases=(oc_name, f"{oc_name}/{tag}", f"{oc_name}.{tag}", f"{tower}.{tag}", file.rsplit(".", 1)[0]),
        pretrain_data=data,
        zero_shot_top1=top1,
    )


_CLIP_ENTRIES = (
    _entry("EVA02-CLIP-B-16", "B-16", "EVA02-B-16", "merged2b_s8b_b131k", "eva02_base_patch16_clip_224",
           "EVA02_CLIP_B_psz16_s8B.pt", "merged-2b", 74.7),
    _entry("EVA02-CLIP-L-14", "L-14", "EVA02-L-14", "merged2b_s4b_b131k", "eva02_large_patch14_clip_224",
           "EVA02_CLIP_L_psz14_s4B.pt", "merged-2b", 79.8),
    _entry("EVA02-CLIP-L-14-336", "L-14-336", "EVA02-L-14-336", "merged2b_s6b_b61k", "eva02_large_patch14_clip_336",
           "EVA02_CLIP_L_336_psz14_s6B.pt", "merged-2b", 80.4),
    _entry("EVA02-CLIP-bigE-14", "E-14", "EVA02-E-14", "laion2b_s4b_b115k", "eva02_enormous_patch14_clip_224",
           "EVA02_CLIP_E_psz14_s4B.pt", "laion-2b", 81.9),
    _entry("EVA02-CLIP-bigE-14-plus", "E-14-plus", "EVA02-E-14-plus", "laion2b_s9b_b144k",
           "eva02_enormous_patch14_plus_clip_224", "EVA02_CLIP_E_psz14_plus_s9B.pt", "laion-2b", 82.0),
)  # fmt: skip

CLIP_ZOO: dict[str, ClipEntry] = {e.name: e for e in _CLIP_ENTRIES}
_CLIP_LOOKUP = {**{n.lower(): n for n in CLIP_ZOO}, **{a.lower(): e.name for e in _CLIP_ENTRIES for a in e.aliases}}


def find_clip(name: str) -> ClipEntry | None:
    """The CLIP entry of a name or alias (case-insensitive), or None. `EVA02-CLIP-test` names the small
    test architecture of `CLIP_VARIANTS` (random weights or a file only; not listed in the zoo)."""
    key = _CLIP_LOOKUP.get(name.strip().lower())
    if key:
        return CLIP_ZOO[key]
    if name.strip().lower() == "eva02-clip-test":
        cfg = CLIP_VARIANTS["test"]
        return ClipEntry("EVA02-CLIP-test", cfg, Preprocess(img_size=cfg.vision.img_size))
    return None


def resolve_clip(name: str) -> ClipEntry:
    """The CLIP entry of a name or alias; ValueError with the closest names otherwise."""
    entry = find_clip(name)
    if entry is not None:
        return entry
    spelled = {n.lower(): n for n in CLIP_ZOO} | {a.lower(): a for e in _CLIP_ENTRIES for a in e.aliases}
    close = difflib.get_close_matches(name.strip().lower(), list(spelled), n=3, cutoff=0.0)
    raise ValueError(
        f"unknown CLIP model {name!r}; closest: {', '.join(spelled[c] for c in close)} (run `eva02 list clip`)"
    )


def list_clip_models(pattern: str | None = None) -> list[str]:
    if not pattern:
        return list(CLIP_ZOO)
    return [n for n in CLIP_ZOO if fnmatch.fnmatchcase(n.lower(), pattern.strip().lower())]
