"""Reading, writing and loading checkpoints, and `get_model`: name or config -> ready `Eva02`.

Reading is safe by construction: `.pt`/`.pth`/`.bin` go through `torch.load(weights_only=True)`, and a
pickle that wants to run code is refused. Containers are unwrapped the way the official BAAI files
(`module` / `model` / `model_ema`), mmpretrain (`state_dict`) and timm (flat) store weights. Our own
format is safetensors with the model config in its metadata, so `load_model(path)` needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from eva02.model.config import VARIANTS, Eva02Config
from eva02.model.vit import Eva02
from eva02.weights.convert import FORMATS, detect_format, fit_to_config, to_ours
from eva02.weights.download import LOCAL_FILE_HINT, DownloadError, cached_path, download
from eva02.weights.zoo import ZooEntry

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

# Where each upstream keeps the weights inside a saved dict, in order of preference (EMA first by default).
EMA_KEYS = ("model_ema",)
PLAIN_KEYS = ("model", "module", "state_dict")


class UnsafeCheckpointError(ValueError):
    """A pickle checkpoint that would execute code when loaded."""


# ----------------------------------------------------------------------------------------- reading
def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files or none)."""
    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from e


def _torch_load(path: Path):
    try:
        # argparse.Namespace is plain data (attribute values); official training checkpoints carry one.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the refused callable as "GLOBAL module.name"; other failures are plain corruption.
        what = re.search(r"GLOBAL (\S+)", str(e))
        if what:
            raise UnsafeCheckpointError(
                f"{path} is refused: loading it would execute code (it calls {what.group(1)}); if you trust its "
                "origin, convert it to safetensors in a separate trusted step (torch.load(..., weights_only=False) "
                "then safetensors.torch.save_file) and load that file"
            ) from None
        detail = " ".join(line for line in str(e).splitlines() if "error" in line.lower() or "operand" in line)
        raise ValueError(f"cannot read {path}: not a valid checkpoint ({detail.strip() or 'unpickling failed'})") from e
    except RuntimeError as e:
        raise ValueError(f"cannot read {path}: not a valid torch checkpoint ({str(e).splitlines()[0]})") from e


def unwrap_state_dict(
    obj: object, use_ema: bool | None = None, where: str = "checkpoint", prefer_ema: bool = True
) -> StateDict:
    """Find the flat {name: tensor} weights inside a loaded checkpoint object.

    use_ema: None takes `model_ema` or the plain weights, whichever `prefer_ema` says, if both are
    present; True requires the EMA weights, False the plain ones.
    """
    took_ema = False
    for _ in range(4):  # containers nest a level or two at most ({'state_dict': {...}})
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        ema = [k for k in EMA_KEYS if isinstance(obj.get(k), dict)]
        plain = [k for k in PLAIN_KEYS if isinstance(obj.get(k), dict)]
        if use_ema is False and ema and not plain:
            raise ValueError(f"{where} holds only EMA weights ('model_ema'); use --ema / use_ema=True")
        order = plain if use_ema is False else ema + plain if use_ema or prefer_ema else plain + ema
        if not order:
            break
        took_ema = took_ema or order[0] in EMA_KEYS
        obj = obj[order[0]]
    if use_ema and not took_ema:
        raise ValueError(f"{where} has no EMA weights (no 'model_ema' entry); leave out --ema / use_ema=True")
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{where} holds no state dict (expected a dict of tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where} has entries that are not tensors: {bad[:8]}; is it a model checkpoint?")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def read_checkpoint(path: PathLike, use_ema: bool | None = None, prefer_ema: bool = True) -> StateDict:
    """Read .safetensors / .pt / .pth / .bin weights safely and unwrap their container into a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from e
    return unwrap_state_dict(_torch_load(path), use_ema, where=str(path), prefer_ema=prefer_ema)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def config_of(path: PathLike) -> Eva02Config | None:
    """The config stored in one of our checkpoints, or None for other files."""
    meta = read_metadata(path)
    if meta.get("format") != "eva02" or "config" not in meta:
        return None
    return Eva02Config.from_dict(json.loads(meta["config"]))


def load_model(path: PathLike, device: str | torch.device | None = None) -> Eva02:
    """Build and load a model from one of our checkpoints (config from its metadata); eval mode."""
    cfg = config_of(path)
    if cfg is None:
        raise ValueError(
            f"{path} is not an eva02 checkpoint (no config in its metadata); load it with "
            "get_model(NAME, pretrained=path) or convert it with `eva02 convert SRC DST --model NAME`"
        )
    model = load_checkpoint(Eva02.uninitialized(cfg), path, fmt="eva02")
    return model.to(device).eval() if device is not None else model.eval()


# ----------------------------------------------------------------------------------------- loading
def _read_ours(
    path_or_sd: PathLike | StateDict, fmt: str, cfg: Eva02Config, use_ema, mim, prefer_ema: bool = True
) -> StateDict:
    if isinstance(path_or_sd, dict):
        sd = path_or_sd
    else:
        sd = read_checkpoint(path_or_sd, use_ema, prefer_ema)
        if fmt == "auto" and read_metadata(path_or_sd).get("format") == "eva02":
            fmt = "eva02"
    if fmt == "auto":
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


def _load_strict(model: Eva02, sd: StateDict) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [k for k in want if k in sd and want[k].shape != sd[k].shape]
    if not (missing or extra or shapes):
        model.load_state_dict(sd, strict=True)
        return
    have = f"the checkpoint ({describe(sd)}) does not fit the model ({describe(want)})"
    if shapes:
        k = shapes[0]
        detail = f"{k} is {tuple(sd[k].shape)} in the checkpoint but {tuple(want[k].shape)} in the model"
    else:
        detail = f"missing {missing[:4]}" if missing else f"unexpected {extra[:4]}"
    if {k.split(".")[0] for k in missing + extra + shapes} <= {"head", "fc_norm", "norm"}:
        fix = "set num_classes (--num-classes) to replace the head, or use get_model, which does it"
    else:
        fix = "choose the --model / config that matches the checkpoint (see `eva02 list`)"
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
        try:
            return download(s, progress=progress), s.fmt
        except DownloadError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if all(e.dest is not None for e in errors):  # every source unreachable: one offline recipe
        tried = "; ".join(f"{e.url} ({e.reason})" for e in errors)
        names = ", ".join(e.dest.name for e in errors)
        raise DownloadError(
            f"cannot download {entry.name} from any source: {tried}; if this machine is offline, fetch one of "
            f"these files elsewhere and put it in {errors[0].dest.parent} under its name ({names}), or load a "
            f"local file directly with {LOCAL_FILE_HINT}"
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
        if isinstance(pretrained, bool) or pretrained is None or config_of(pretrained) is None:
            raise ValueError("model=None needs pretrained=PATH of an eva02 checkpoint (written by save_checkpoint)")
        entry, cfg = None, config_of(pretrained)
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
