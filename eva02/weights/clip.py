"""EVA-02-CLIP weights: `get_clip` (name or config -> ready model), reading and writing CLIP files.

The zoo entries (`CLIP_ZOO`) live in `zoo.py`, torch-free like the rest of the zoo. Their weights, from
open_clip's copies on the hub or BAAI's EVA-CLIP files, are converted by the declarative tables of
`convert.py` (`CLIP_TABLES`) and loaded strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from eva02.fileio import atomic_write
from eva02.model.clip import ClipConfig, Eva02Clip
from eva02.weights.convert import CLIP_FORMATS, clip_to_ours, detect_clip_format, fit_to_config
from eva02.weights.files import read_checkpoint, read_metadata
from eva02.weights.load import fetch_weights, state_mismatch
from eva02.weights.zoo import (  # noqa: F401 (part of this module's API)
    CLIP_ZOO,
    ClipEntry,
    find_clip,
    list_clip_models,
    resolve_clip,
)

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike


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


def refuse_image_model_file(path: PathLike) -> None:
    """ValueError naming what to use instead if `path` is one of our image-model files (a classifier,
    backbone or task model, `save_checkpoint`), where an EVA-02-CLIP model is expected."""
    if read_metadata(path).get("format") == "eva02":
        raise ValueError(
            f"{path} holds an EVA-02 image model (classifier, backbone or task model), not an EVA-02-CLIP "
            "model: give a CLIP checkpoint (in Python, eva02.get_model(None, pretrained=FILE) loads this one)"
        )


def read_clip_checkpoint(path_or_sd: PathLike | StateDict, fmt: str = "auto") -> StateDict:
    """Read a CLIP checkpoint of any known format into our `Eva02Clip` layout."""
    if not isinstance(path_or_sd, dict):
        refuse_image_model_file(path_or_sd)
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
    found = state_mismatch(model.state_dict(), sd)
    if found is not None:
        raise ValueError(f"{where} does not fit this CLIP model: {found[0]}; pick the model name that matches the file")
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
    entry: ClipEntry | None = None
    if name is None:
        cfg = None if isinstance(pretrained, bool) else clip_config_of(pretrained)
        if cfg is None and pretrained is not None and not isinstance(pretrained, bool):
            refuse_image_model_file(pretrained)
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
