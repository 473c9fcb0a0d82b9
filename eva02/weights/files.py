"""What a checkpoint file holds, read safely: a file's first bytes say what it is (torch zip, legacy torch
pickle, safetensors; whole or cut short) before any loader sees it, so what failed downloads leave (empty
files, web pages, images, truncated files) gets a one-line error naming the file. Torch files go through
`torch.load(weights_only=True)`, and a pickle that wants to run code is refused. Containers are unwrapped
the way the official BAAI files (`module` / `model` / `model_ema`), mmpretrain (`state_dict`) and timm
(flat) store weights; NaN / Inf weights are refused in every format.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike

# Where each upstream keeps the weights inside a saved dict, in order of preference (EMA first by default).
EMA_KEYS = ("model_ema",)
PLAIN_KEYS = ("model", "module", "state_dict")


class UnsafeCheckpointError(ValueError):
    """A pickle checkpoint that would execute code when loaded."""


class NotACheckpointError(ValueError):
    """A file that holds no weights at all: empty, a web page, an image, cut short (what failed downloads leave)."""


# ------------------------------------------------------------------------------- what a file holds
# The weights files we read: torch.save's zip, its legacy pickle (protocol 2, then torch's magic number)
# and safetensors (an 8-byte little-endian header length, then a JSON header opening with '{').
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
)


def _not_a_checkpoint(path: Path, what: str) -> NotACheckpointError:
    return NotACheckpointError(
        f"cannot read {path}: {path.name} is not a checkpoint ({what}); re-download it or pass the right file"
    )


def _text_kind(head: bytes) -> str | None:
    """'an HTML page', 'a Git LFS pointer' or 'a text file' when the first bytes are text, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut by the end of the sample
            return None
        text = head[: e.start].decode("utf-8")
    if not all(c.isprintable() or c in "\t\n\r\f" for c in text.lstrip("\ufeff")):
        return None
    low = text.lower()
    if "<html" in low or "<!doctype" in low or "<head" in low:
        return "an HTML page, e.g. an error or login page saved in place of the download"
    if low.startswith("version https://git-lfs"):
        return "a Git LFS pointer file, not the file itself: fetch it with `git lfs pull`"
    return "a text file"


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:  # reads the central directory at the end only
            names = z.namelist()
    except zipfile.BadZipFile:
        raise _not_a_checkpoint(path, "a torch zip file cut short: its end record is missing") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise _not_a_checkpoint(path, "a zip archive without torch's data.pkl, not written by torch.save")


def _check_safetensors(path: Path, f, size: int, header_len: int) -> None:
    if 8 + header_len > size:
        need = 8 + header_len
        raise _not_a_checkpoint(path, f"a safetensors file cut short: {size} bytes, its header alone needs {need}")
    f.seek(8)
    try:
        header = json.loads(f.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise _not_a_checkpoint(path, "a safetensors file with a damaged header") from None
    if 8 + header_len + end > size:
        raise _not_a_checkpoint(path, f"a safetensors file cut short: {size} of {8 + header_len + end} bytes")


def check_checkpoint_file(path: PathLike) -> str:
    """The container of a weights file, 'torch' or 'safetensors', told from its first bytes (and whether it
    is whole) before any loader sees it; NotACheckpointError for empty files, web pages, images, ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise _not_a_checkpoint(path, "an empty file")
    with open(path, "rb") as f:
        head = f.read(512)
        if head.startswith(ZIP_MAGIC):
            _check_zip(path)
            return "torch"
        if head.startswith(LEGACY_TORCH_MAGIC):
            return "torch"
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise UnsafeCheckpointError(
                f"{path} contains Python objects other than tensors (a plain Python pickle, not written by "
                "torch.save); only weights files are accepted: save the weights with torch.save or safetensors"
            )
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and header_len <= SAFETENSORS_MAX_HEADER:
            _check_safetensors(path, f, size, header_len)
            return "safetensors"
    image = next((what for magic, what in IMAGE_MAGIC if head.startswith(magic)), None)
    if image is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        image = "a WebP image"
    kind = image or _text_kind(head)
    if kind is None:
        if len(head) < 9:
            kind = f"only {size} bytes long"
        else:
            kind = f"its first bytes {head[:8].hex(' ')} are no weights format: torch zip, torch pickle or safetensors"
    raise _not_a_checkpoint(path, kind)


# ----------------------------------------------------------------------------------------- reading
def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for torch files or none); NotACheckpointError for others."""
    if check_checkpoint_file(path) != "safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from e


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


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
                f"{path} contains Python objects other than tensors (it calls {what.group(1)}); only weights files "
                "are accepted, and this one is refused: loading it would execute code. If you trust its origin, "
                "convert it to safetensors in a separate trusted step (torch.load(..., weights_only=False) then "
                "safetensors.torch.save_file) and load that file"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))  # torch's reason, not its advice
        reason = detail.group(1).strip() if detail else "unpickling failed"
        raise ValueError(f"cannot read {path}: not a valid checkpoint ({reason})") from None
    except EOFError:
        raise _not_a_checkpoint(path, "a torch file cut short") from None
    except (MemoryError, OSError):
        raise
    except Exception as e:  # torch.load of a damaged file raises anything (KeyError, RuntimeError, ...)
        if "EOF" in str(e):
            raise _not_a_checkpoint(path, "a torch file cut short") from None
        raise ValueError(f"cannot read {path}: not a valid torch checkpoint ({_first_line(e)})") from None


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
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{where} holds no state dict ({what} where a dict of tensors was expected)")
    names = [k for k in obj if not isinstance(k, str)]
    if names:
        raise ValueError(
            f"{where} has keys that are not parameter names: {names[:4]}; only state dicts "
            "{name: tensor} are accepted"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where} has entries that are not tensors: {bad[:8]}; is it a model checkpoint?")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def read_checkpoint(path: PathLike, use_ema: bool | None = None, prefer_ema: bool = True) -> StateDict:
    """Read .safetensors / .pt / .pth / .bin weights safely and unwrap their container into a flat dict."""
    path = Path(path)
    if check_checkpoint_file(path) == "safetensors":  # by content: the suffix of a download may lie
        try:
            sd = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from e
    else:
        sd = unwrap_state_dict(_torch_load(path), use_ema, where=str(path), prefer_ema=prefer_ema)
    check_finite(sd, str(path))
    return sd


def check_finite(sd: StateDict, where: str = "state dict") -> None:
    """Refuse NaN / Inf weights (a diverged run or a damaged file), naming the first bad tensor."""
    for k, v in sd.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise ValueError(
                f"{where} holds non-finite weights: {k} has {n} NaN/Inf value(s) of {v.numel()} (a diverged "
                "training run or a damaged file); load another checkpoint"
            )
