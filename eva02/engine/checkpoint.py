"""Training checkpoints: full (unsharded) state written atomically by rank 0, resumable on any world size.

Layout under `{work_dir}/checkpoints/`: `step_XXXXXXXX.pt` (periodic, the oldest pruned beyond
`keep_last`), `last.pt` (the newest) and `best.pt` (best validation top-1). A file is a dict with the
marker `format: 'eva02-train'`, the config, model / optimizer (keyed by parameter name, so DDP, FSDP2
and one process read each other's files), schedule, EMA, loss scaler, RNG states, epoch and step.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FORMAT = "eva02-train"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def ckpt_dir(work_dir: str | os.PathLike) -> Path:
    return Path(work_dir) / "checkpoints"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np.random.get_state()[1].tolist(), int(np.random.get_state()[2])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    keys, pos = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on CPU (collective under FSDP2: call on every rank)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: dict) -> None:
    """Load full state dicts into a possibly DDP-wrapped or FSDP2-sharded model (every rank)."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=opts)


def save(
    work_dir: str | os.PathLike, state: dict[str, Any], global_step: int, keep_last: int, best: bool = False
) -> Path:
    """Write `step_<n>.pt`, point `last.pt` (and `best.pt` if `best`) at it, prune old periodic files."""
    d = ckpt_dir(work_dir)
    state = {"format": FORMAT, **state}
    path = d / f"step_{global_step:08d}.pt"
    atomic_torch_save(state, path)
    _link_or_copy(path, d / "last.pt")
    if best:
        _link_or_copy(path, d / "best.pt")
    periodic = sorted(p for p in d.glob("step_*.pt") if re.fullmatch(r"step_\d{8}\.pt", p.name))
    for old in periodic[: max(0, len(periodic) - max(keep_last, 1))]:
        old.unlink(missing_ok=True)  # last.pt / best.pt are separate links and survive
    return path


def resolve_resume(resume: str | None, work_dir: str | os.PathLike) -> Path | None:
    """'auto' -> work_dir's last.pt if any (else None: a fresh start); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        last = ckpt_dir(work_dir) / "last.pt"
        return last if last.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file; use --resume auto or a .pt path")
    return p


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights_only: no code runs from the file)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an eva02 training checkpoint; use it as model.init instead")
    return ckpt


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    if p.suffix not in (".pt", ".pth"):
        return False
    try:
        return load(p) is not None
    except (ValueError, RuntimeError, OSError, EOFError):
        return False


def save_weights(model: nn.Module, path: Path) -> None:
    """Final weights in the package's safetensors format (config embedded), loadable by get_model."""
    from eva02.weights.load import save_checkpoint

    save_checkpoint(model, path)
