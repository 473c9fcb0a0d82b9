"""EVA-02-CLIP in the zoo: names, weight sources, reported zero-shot accuracy, and `get_clip`.

Names are BAAI's model-config names (`EVA02-CLIP-B-16`, ...); open_clip's names (`EVA02-B-16`, with or
without its pretrained tag), timm's hub names and the official file names are aliases. Weights come from
open_clip's copies on the hub (`timm/<tower>.<tag>`, open_clip's state dict) or BAAI's EVA-CLIP files
(hub repo `QuanSun/EVA-CLIP`); both are converted by the declarative tables of `convert.py`
(`CLIP_TABLES`) and loaded strictly. Zero-shot ImageNet-1k top-1 is BAAI's reported figure (80 prompt
templates); open_clip's own measurements agree to 0.1 point.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from eva02.fileio import atomic_write
from eva02.model.clip import CLIP_VARIANTS, ClipConfig, Eva02Clip
from eva02.weights.convert import CLIP_FORMATS, clip_to_ours, detect_clip_format, fit_to_config
from eva02.weights.files import read_checkpoint, read_metadata
from eva02.weights.zoo import Preprocess, WeightSource

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike


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


_ENTRIES = (
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

CLIP_ZOO: dict[str, ClipEntry] = {e.name: e for e in _ENTRIES}
_LOOKUP = {**{n.lower(): n for n in CLIP_ZOO}, **{a.lower(): e.name for e in _ENTRIES for a in e.aliases}}


def find_clip(name: str) -> ClipEntry | None:
    """The CLIP entry of a name or alias (case-insensitive), or None."""
    key = _LOOKUP.get(name.strip().lower())
    return CLIP_ZOO[key] if key else None


def resolve_clip(name: str) -> ClipEntry:
    """The CLIP entry of a name or alias; ValueError with the closest names otherwise."""
    entry = find_clip(name)
    if entry is not None:
        return entry
    spelled = {n.lower(): n for n in CLIP_ZOO} | {a.lower(): a for e in _ENTRIES for a in e.aliases}
    close = difflib.get_close_matches(name.strip().lower(), list(spelled), n=3, cutoff=0.0)
    raise ValueError(
        f"unknown CLIP model {name!r}; closest: {', '.join(spelled[c] for c in close)} (run `eva02 list clip`)"
    )


def list_clip_models(pattern: str | None = None) -> list[str]:
    if not pattern:
        return list(CLIP_ZOO)
    return [n for n in CLIP_ZOO if fnmatch.fnmatchcase(n.lower(), pattern.strip().lower())]


# ------------------------------------------------------------------------------------- files
def save_clip(model: Eva02Clip, path: PathLike) -> Path:
    """Write our format: safetensors with the `ClipConfig` as JSON metadata (atomic; the parent must exist)."""

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "eva02-clip", "config": json.dumps(model.cfg.to_dict())}
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta), suffix=".part")


def clip_config_of(path: PathLike) -> ClipConfig | None:
    """The `ClipConfig` stored in one of our CLIP files, or None for other files."""

    meta = read_metadata(path)
    if meta.get("format") != "eva02-clip" or "config" not in meta:
        return None
    try:
        return ClipConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: its stored CLIP config is invalid ({e}); the file is damaged") from e


def read_clip_checkpoint(path_or_sd: PathLike | StateDict, fmt: str = "auto") -> StateDict:
    """Read a CLIP checkpoint of any known format into our `Eva02Clip` layout."""
    sd = path_or_sd if isinstance(path_or_sd, dict) else read_checkpoint(path_or_sd)
    where = "state dict" if isinstance(path_or_sd, dict) else str(path_or_sd)
    if fmt != "auto" and fmt not in CLIP_FORMATS:
        raise ValueError(f"unknown CLIP checkpoint format {fmt!r}; use one of {CLIP_FORMATS} or 'auto'")
    try:
        return clip_to_ours(sd, detect_clip_format(sd) if fmt == "auto" else fmt)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def load_clip_state(model: Eva02Clip, sd: StateDict, where: str = "checkpoint") -> Eva02Clip:
    """Load our-layout weights strictly, resampling the image tower's position embedding to its grid."""
    visual = fit_to_config({k[7:]: v for k, v in sd.items() if k.startswith("visual.")}, model.cfg.vision)
    sd = {**sd, **{"visual." + k: v for k, v in visual.items()}}
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [k for k in want if k in sd and want[k].shape != sd[k].shape]
    if missing or extra or shapes:
        if shapes:
            k = shapes[0]
            detail = f"{k} is {tuple(sd[k].shape)} there but {tuple(want[k].shape)} in the model"
        else:
            detail = f"missing {missing[:4]}" if missing else f"unexpected {extra[:4]}"
        raise ValueError(f"{where} does not fit this CLIP model: {detail}; pick the model name that matches the file")
    model.load_state_dict(sd, strict=True)
    return model


def get_clip(
    name: str | ClipEntry | ClipConfig | None,
    pretrained: bool | PathLike = False,
    *,
    device: str | torch.device | None = None,
    source: str | None = None,
    fmt: str = "auto",
) -> Eva02Clip:
    """Build an EVA-02-CLIP by zoo name (or alias), entry or config, optionally with weights; eval mode.

    pretrained: True downloads the entry's weights (open_clip's copy first, or the `source` kind:
    'open_clip' / 'official'); a path loads that file (open_clip, BAAI EVA-CLIP or ours). With
    `name=None` the path must be one of our files (its config is stored in it).
    """
    from eva02.weights.load import fetch_weights

    entry: ClipEntry | None = None
    if name is None:
        cfg = None if isinstance(pretrained, bool) else clip_config_of(pretrained)
        if cfg is None:
            raise ValueError("get_clip(None, ...) needs pretrained=PATH of a CLIP file written by eva02 (save_clip)")
    elif isinstance(name, ClipConfig):
        cfg = name
    else:
        entry = name if isinstance(name, ClipEntry) else resolve_clip(name)
        cfg = entry.cfg
    if pretrained is False or pretrained is None:
        model = Eva02Clip(cfg)
    else:
        if pretrained is True:
            if entry is None:
                raise ValueError("pretrained=True needs a CLIP model name; for a config pass pretrained='FILE'")
            path, fmt = fetch_weights(entry, source)
        else:
            path = Path(pretrained)
        sd = read_clip_checkpoint(path, fmt)
        model = load_clip_state(Eva02Clip.uninitialized(cfg), sd, str(path))
    return model.to(device).eval() if device is not None else model.eval()
