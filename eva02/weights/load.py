"""Reading, writing and loading checkpoints, and `get_model`: name or config -> ready `Eva02`.

Reading is safe by construction (`eva02.weights.files`: a file's first bytes are checked before any
loader sees it, pickles that want to run code are refused, NaN / Inf weights are refused). Our own format is
safetensors with the model config in its metadata, so `load_model(path)` needs nothing else; that config
is checked against the tensor shapes of the file's header before any model is built.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eva02.fileio import atomic_write
from eva02.hints import hint
from eva02.model.config import VARIANTS, Eva02Config
from eva02.model.vit import Eva02
from eva02.weights.convert import FORMATS, detect_clip_format, detect_format, fit_to_config, to_ours
from eva02.weights.download import DownloadError, cached_path, download
from eva02.weights.files import (  # noqa: F401 (part of this module's API)
    EMA_KEYS,
    PLAIN_KEYS,
    NotACheckpointError,
    UnsafeCheckpointError,
    check_checkpoint_file,
    check_finite,
    read_checkpoint,
    read_metadata,
    unwrap_state_dict,
)
from eva02.weights.official_seg import is_official_seg
from eva02.weights.zoo import ZooEntry

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------- our own format
def save_checkpoint(model: Eva02, path: PathLike, name: str | None = None) -> Path:
    """Write the model as safetensors with its config (and zoo name) in the metadata; atomic."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: our checkpoint format is safetensors; use a name ending in .safetensors")
    meta = {"format": "eva02", "config": json.dumps(model.cfg.to_dict())}
    if name:
        meta["name"] = name
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), suffix=".part")


def config_mismatch(cfg: Eva02Config, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why tensors of these shapes (our layout) cannot be a model of `cfg`, or None when they can.

    The block count, the width and the stem are compared first, so that an absurd config is refused
    before even a meta-device model (one module per block, RoPE tables of its grid) is built to compare
    every shape.
    """
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if cfg.depth != len(blocks) or blocks != set(range(len(blocks))):
        return f"the config says depth={cfg.depth}, the file holds {len(blocks)} blocks"
    embed = shapes.get("patch_embed.proj.weight")
    if embed and embed[0] != cfg.dim:
        return f"the config says dim={cfg.dim}, the patch embedding gives {embed[0]}"
    # The grid sizes the RoPE tables that even a meta-device build computes on the CPU.
    p = cfg.patch_size
    stem = {"patch_embed.proj.weight": (cfg.dim, cfg.in_chans, p, p), "pos_embed": (1, 1 + cfg.grid**2, cfg.dim)}
    for k, shape in stem.items():
        if shapes.get(k) != shape:
            return f"{k} is {shapes.get(k)} in the file but the config needs {shape}"
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in Eva02(cfg).state_dict().items()}
    except (ValueError, TypeError, RuntimeError) as e:
        return f"the config cannot be built: {e}"
    for k, shape in want.items():
        if k not in shapes:
            return f"the config needs a tensor {k} that the file does not hold"
        if shapes[k] != shape:
            return f"{k} is {shapes[k]} in the file but the config needs {shape}"
    extra = sorted(set(shapes) - set(want))
    return f"the file holds tensors the config has no place for: {extra[:4]}" if extra else None


def _task_model(path: PathLike, stored: object) -> None:
    """Refuse, naming the command that reads it, a file of a whole task model (a detector or segmentor
    saved by the engine, whose stored config holds its backbone's)."""
    if not isinstance(stored, dict) or "backbone" not in stored:
        return
    what, cmd = ("a detector", "eva02 detect") if stored.get("task") == "detect" else ("a segmentor", "eva02 segment")
    raise ValueError(
        f"{path} holds {what}, not a classifier or backbone: use `{cmd} IMAGES --config CONFIG --checkpoint "
        f"{path}` or `tools/test.py CONFIG {path}`"
    )


def _stored_config(path: PathLike, meta: dict[str, str]) -> Eva02Config:
    try:
        stored = json.loads(meta["config"])
    except ValueError as e:
        raise ValueError(f"{path}: its stored config is invalid ({e}); the file is damaged or was altered") from None
    _task_model(path, stored)
    try:
        cfg = Eva02Config.from_dict(stored)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, unknown or mistyped fields
        raise ValueError(f"{path}: its stored config is invalid ({e}); the file is damaged or was altered") from None
    with safe_open(str(path), framework="pt") as f:  # the header only: no tensor data is read
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problem = config_mismatch(cfg, shapes)
    if problem:
        raise ValueError(
            f"{path}: its stored config does not match its tensors ({problem}); the file is damaged or was "
            "altered: re-save the model with save_checkpoint or convert the original with `eva02 convert`"
        )
    return cfg


def refuse_clip_file(path: PathLike) -> None:
    """ValueError naming what to use instead if `path` is one of our EVA-02-CLIP files (image and text
    towers), where a classifier or backbone is expected."""
    if read_metadata(path).get("format") == "eva02-clip":
        raise ValueError(
            f"{path} holds an EVA-02-CLIP model, not a classifier or backbone: classify with `eva02 zero-shot "
            f"IMAGES --checkpoint {path} --labels A,B`, or load it with eva02.get_clip(None, pretrained=FILE)"
        )


def config_of(path: PathLike) -> Eva02Config | None:
    """The config stored in one of our checkpoints (checked against its tensor shapes), or None for other files."""
    meta = read_metadata(path)
    if meta.get("format") != "eva02" or "config" not in meta:
        return None
    return _stored_config(path, meta)


def load_model(path: PathLike, device: str | torch.device | None = None) -> Eva02:
    """Build and load a model from one of our checkpoints (config from its metadata); eval mode."""
    cfg = config_of(path)
    if cfg is None:
        refuse_clip_file(path)
        raise ValueError(
            f"{path} is not an eva02 checkpoint (no config in its metadata), so the model it is for must be "
            f"named: {hint('model_name')}; or convert it once with `eva02 convert SRC DST --model NAME`"
        )
    model = load_checkpoint(Eva02.uninitialized(cfg), path, fmt="eva02")
    return model.to(device).eval() if device is not None else model.eval()


# ----------------------------------------------------------------------------------------- loading
def _read_ours(
    path_or_sd: PathLike | StateDict, fmt: str, cfg: Eva02Config, use_ema, mim, prefer_ema: bool = True
) -> StateDict:
    if isinstance(path_or_sd, dict):
        sd, where = path_or_sd, "the checkpoint"
        check_finite(sd)
    else:
        sd, where = read_checkpoint(path_or_sd, use_ema, prefer_ema), path_or_sd
        if fmt == "auto" and read_metadata(path_or_sd).get("format") == "eva02":
            fmt = "eva02"
    if is_official_seg(sd):
        raise ValueError(
            f"{where} holds an official EVA-02 segmentation model (UperNet, mmsegmentation), not a classifier or "
            "backbone: use `eva02 segment IMAGES --config CONFIG --checkpoint FILE` or `tools/test.py CONFIG FILE` "
            "with a segmentation config (configs/eva02_seg/)"
        )
    if fmt == "auto":
        try:  # a whole CLIP model (image and text towers): its tower alone is not what is asked for here
            clip_fmt = detect_clip_format(sd)
        except ValueError:
            clip_fmt = None
        if clip_fmt is not None:
            raise ValueError(
                f"{where} holds an EVA-02-CLIP model ({clip_fmt} format: image and text towers), not a classifier "
                "or backbone: use `eva02 zero-shot IMAGES -m CLIP-NAME --checkpoint FILE --labels A,B`, or load it "
                "with eva02.get_clip(CLIP-NAME, pretrained=FILE)"
            )
        fmt = detect_format(sd)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS} or 'auto'")
    return to_ours(sd, fmt, cfg, mim=mim)


def num_classes_of(sd: StateDict) -> int:
    """Classes of a state dict in our layout (0 for a headless one)."""
    head = sd.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def describe(sd: StateDict) -> str:
    """A short description of a checkpoint in our layout, naming the matching size where there is one."""
    dim = sd["cls_token"].shape[-1] if "cls_token" in sd else "?"
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    sizes = [n for n, c in VARIANTS.items() if (c.dim, c.depth) == (dim, depth)]
    n = num_classes_of(sd)
    kind = f"{n}-class classifier" if n else "headless"
    return f"dim {dim}, depth {depth}, {kind}" + (f" (a {sizes[0]} model)" if sizes else "")


def state_mismatch(want: dict[str, torch.Tensor | torch.Size], sd: StateDict) -> tuple[str, list[str]] | None:
    """How a state dict differs from the tensors (or shapes) a model wants: (the first difference in
    words, every differing key), or None when every key is there with its shape and nothing else."""
    shape = {k: v.shape if isinstance(v, torch.Tensor) else torch.Size(v) for k, v in want.items()}
    missing = [k for k in shape if k not in sd]
    extra = [k for k in sd if k not in shape]
    shapes = [k for k in shape if k in sd and shape[k] != sd[k].shape]
    if not (missing or extra or shapes):
        return None
    if shapes:
        k = shapes[0]
        detail = f"{k} is {tuple(sd[k].shape)} in the checkpoint but {tuple(shape[k])} in the model"
    else:
        detail = f"missing {missing[:4]}" if missing else f"unexpected {extra[:4]}"
    return detail, missing + extra + shapes


def _load_strict(model: Eva02, sd: StateDict) -> None:
    want = model.state_dict()
    found = state_mismatch(want, sd)
    if found is None:
        model.load_state_dict(sd, strict=True)
        return
    detail, keys = found
    have = f"the checkpoint ({describe(sd)}) does not fit the model ({describe(want)})"
    if {k.split(".")[0] for k in keys} <= {"head", "fc_norm", "norm"}:
        fix = f"the head differs: use {hint('num_classes')}"
    else:
        fix = f"use {hint('matching_model')}"
    raise ValueError(f"{have}: {detail}; {fix}")


def load_checkpoint(
    model: Eva02,
    path_or_sd: PathLike | StateDict,
    fmt: str = "auto",
    use_ema: bool | None = None,
    mim: dict | None = None,
) -> Eva02:
    """Load a checkpoint of any format into `model`: convert, resample patch kernel / pos_embed, load strictly.

    `mim`, if a dict, receives the MIM-only tensors of official pre-training checkpoints.
    """
    sd = fit_to_config(_read_ours(path_or_sd, fmt, model.cfg, use_ema, mim), model.cfg)
    _load_strict(model, sd)
    return model


def _entry_and_cfg(model: str | ZooEntry | Eva02Config) -> tuple[ZooEntry | None, Eva02Config]:
    if isinstance(model, ZooEntry):
        return model, model.cfg
    if isinstance(model, Eva02Config):
        return None, model
    if isinstance(model, str):
        from eva02.weights import zoo

        entry = zoo.resolve(model)
        return entry, entry.cfg
    raise TypeError(f"model must be a zoo name, a ZooEntry or an Eva02Config, got {type(model).__name__}")


def fetch_weights(entry: ZooEntry, source: str | None = None, progress: bool = True) -> tuple[Path, str]:
    """Download (or find in the cache) the first working weight source of a zoo entry: (path, format)."""
    sources = [s for s in entry.sources if source is None or s.kind == source]
    if not sources:
        kinds = sorted({s.kind for s in entry.sources})
        if not kinds:
            raise ValueError(f"{entry.name} has no published weights; pass pretrained='FILE' (--checkpoint FILE)")
        raise ValueError(f"{entry.name} has no {source!r} weights; choose source from {kinds}")
    # A file already in the cache (downloaded before, or dropped there by hand) wins over any download.
    sources = sorted(sources, key=lambda s: not cached_path(s).is_file())
    errors: list[DownloadError] = []
    for s in sources:
        was_cached = cached_path(s).is_file()
        try:
            return download(s, progress=progress), s.fmt
        except DownloadError as e:
            errors.append(e)
            if was_cached:  # a damaged file in the cache is never passed over in silence
                print(f"warning: {e}", file=sys.stderr)
    if len(errors) == 1:
        raise errors[0]
    if all(e.dest is not None for e in errors):  # every source unreachable: one offline recipe
        tried = "; ".join(f"{e.url} ({e.reason})" for e in errors)
        names = ", ".join(e.dest.name for e in errors)
        raise DownloadError(
            f"cannot download {entry.name} from any source: {tried}; if this machine is offline, fetch one of "
            f"these files elsewhere and put it in {errors[0].dest.parent} under its name ({names}), or load a "
            f"local file directly with {hint('local_file')}"
        )
    raise DownloadError(f"no source of {entry.name} worked: " + " | ".join(str(e) for e in errors))


def get_model(
    model: str | ZooEntry | Eva02Config | None,
    pretrained: bool | PathLike = False,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    device: str | torch.device | None = None,
    use_ema: bool | None = None,
    source: str | None = None,
    fmt: str = "auto",
) -> Eva02:
    """Build an EVA-02 by zoo name / entry / config, optionally with weights; returned in eval mode.

    Args:
        pretrained: True downloads the entry's weights (first working source, or the `source` kind);
            a path loads that file (any format). With `model=None` the path must be one of our files.
        num_classes: replace the checkpoint's head by a new one with this many classes (fine-tuning).
        img_size: input size; the position embedding is resampled to its grid.
    """
    if model is None:
        stored = None if isinstance(pretrained, bool) or pretrained is None else config_of(pretrained)
        if stored is None:
            if pretrained is not None and not isinstance(pretrained, bool):
                refuse_clip_file(pretrained)
            raise ValueError("model=None needs pretrained=PATH of an eva02 checkpoint (written by save_checkpoint)")
        entry, cfg = None, stored
    else:
        entry, cfg = _entry_and_cfg(model)
    if img_size is not None:
        cfg = cfg.replace(img_size=img_size)
    if pretrained is False or pretrained is None:
        net = Eva02(cfg if num_classes is None else cfg.replace(num_classes=num_classes))
        return net.to(device).eval() if device is not None else net.eval()
    if pretrained is True:
        if entry is None:
            raise ValueError("pretrained=True needs a zoo model name; for a config pass pretrained='FILE'")
        path, fmt = fetch_weights(entry, source)
    else:
        path = Path(pretrained)
    # Official files may hold both weight sets: by default take the ones the official README reports.
    sd = _read_ours(path, fmt, cfg, use_ema, None, prefer_ema=entry.official_ema if entry is not None else True)
    have = num_classes_of(sd)
    net = Eva02.uninitialized(cfg.replace(num_classes=have))  # every tensor comes from the checkpoint
    _load_strict(net, fit_to_config(sd, net.cfg))
    if num_classes is not None and num_classes != have:
        if num_classes == 0:
            raise ValueError(
                f"num_classes=0 asks for a headless model but {path} is a {have}-class classifier; for its "
                "features use model.forward_head(x, pre_logits=True) or model.extract_feat(x)"
            )
        old = f"replacing the checkpoint's {have}-class head by" if have else "adding to the headless checkpoint"
        warnings.warn(f"{old} a new {num_classes}-class head (randomly initialised, to be fine-tuned)", stacklevel=2)
        net.reset_classifier(num_classes)
    return net.to(device).eval() if device is not None else net.eval()
