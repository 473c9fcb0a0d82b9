"""Training checkpoints: full (unsharded) state written atomically by rank 0, resumable on any world size.

Layout under `{work_dir}/checkpoints/`: `step_XXXXXXXX.pt` (periodic, the oldest pruned beyond
`keep_last`), `last.pt` (the newest) and `best.pt` (the best validation score by the task's
`best_metric`). A file is a dict with the marker `format: 'eva02-train'`, the config, model / optimizer
(keyed by parameter name, so DDP, FSDP2 and one process read each other's files), schedule, EMA, loss
scaler, RNG states, epoch and step.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import zipfile
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

from eva02.fileio import atomic_write, describe_os_error
from eva02.weights.load import save_checkpoint

FORMAT = "eva02-train"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def ckpt_dir(work_dir: str | os.PathLike) -> Path:
    return Path(work_dir) / "checkpoints"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (read-only folder, full disk, ...); nothing half-written is left."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"cannot write {path}: {describe_os_error(e)}") from None
    except RuntimeError as e:  # torch's zip writer reports a full disk as 'unexpected pos' / 'file write failed'
        if "unexpected pos" in str(e) or "write failed" in str(e):
            raise CheckpointWriteError(errno.ENOSPC, f"cannot write {path}: no space left on the device") from None
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
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
    return gather_model_state(model), get_optimizer_state_dict(model, optimizer, options=_FULL)


def gather_model_state(model: nn.Module) -> dict:
    """The full model state dict on CPU by canonical name (collective under FSDP2, where only rank 0
    receives it)."""
    return get_model_state_dict(model, options=_FULL)


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: dict) -> None:
    """Load full state dicts into a possibly DDP-wrapped or FSDP2-sharded model (every rank).

    The model loads strictly. The optimizer holds no state for parameters that never received a
    gradient (a detached patch embedding: `model.patch_grad_scale=0`), so a parameter without saved
    state is accepted; saved state for a parameter the model does not have is an error.
    """
    set_model_state_dict(model, ckpt["model"], options=StateDictOptions(full_state_dict=True, strict=True))
    if optimizer is None:
        return
    optim_sd = ckpt["optimizer"]
    names = {n.removeprefix("module.") for n, _ in model.named_parameters()}
    unknown = sorted(str(k) for k in optim_sd.get("state", {}) if str(k).removeprefix("module.") not in names)
    if unknown:
        shown = ", ".join(unknown[:3])
        raise ValueError(f"the checkpoint has optimizer state for parameters this model lacks: {shown}")
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def count_nonfinite(model: nn.Module) -> torch.Tensor:
    """Number of floating parameters/buffers of this rank holding a NaN or Inf (a float64 scalar on their
    device; sum it over ranks under FSDP2, where each rank sees its shards only)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers())]
    flags = [(~torch.isfinite(t.detach())).any() for t in local if t.is_floating_point()]
    if not flags:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(flags).sum().double()


def _step_files(d: Path) -> list[Path]:
    """Periodic checkpoints, oldest first."""
    return sorted(p for p in d.glob("step_*.pt") if re.fullmatch(r"step_\d{8}\.pt", p.name))


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
    periodic = _step_files(d)
    for old in periodic[: max(0, len(periodic) - max(keep_last, 1))]:
        old.unlink(missing_ok=True)  # last.pt / best.pt are separate links and survive
    return path


def discard_from(work_dir: str | os.PathLike, global_step: int) -> Path | None:
    """Set aside the periodic checkpoints of `global_step` and later (their weights gave a non-finite
    loss) as `*.pt.nonfinite`, point `last.pt` at the newest remaining one; returns it (None if none)."""
    d = ckpt_dir(work_dir)
    if not d.is_dir():
        return None
    for p in _step_files(d):
        if int(p.stem.split("_")[1]) >= global_step:
            os.replace(p, p.with_name(p.name + ".nonfinite"))
    keep = _step_files(d)
    last = d / "last.pt"
    if keep:
        _link_or_copy(keep[-1], last)
        return keep[-1]
    if last.exists():
        os.replace(last, last.with_name("last.pt.nonfinite"))
    return None


def resolve_resume(
    resume: str | None, work_dir: str | os.PathLike, warn=print
) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """The checkpoint to resume from and its state: 'auto' -> work_dir's last.pt if any (else
    (None, None): a fresh start); a path must exist and load.

    With 'auto', a `last.pt` that does not load (torn by a crash or a full disk) is passed over for
    the newest periodic checkpoint that does, with a warning naming both.
    """
    if not resume:
        return None, None
    if resume == "auto":
        d = ckpt_dir(work_dir)
        candidates = [d / "last.pt", *reversed(_step_files(d))]
        candidates = [p for p in candidates if p.is_file()]
        for i, p in enumerate(candidates):
            try:
                state = load(p)
            except ValueError as e:
                warn(f"warning: {e}")
                continue
            if i:
                warn(f"warning: resuming from {p} instead, the newest checkpoint that loads")
            return p, state
        if candidates:
            raise ValueError(f"no checkpoint in {d} loads; start a new run with another --work-dir (or --overwrite)")
        return None, None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file; use --resume auto or a .pt path")
    return p, load(p)


def _not_a_checkpoint(path: str | os.PathLike, reason: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a readable training checkpoint ({reason})")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights_only: no code runs from the file)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise _not_a_checkpoint(path, describe_os_error(e)) from None
    if size == 0:
        raise _not_a_checkpoint(path, "the file is empty")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise _not_a_checkpoint(path, "not a torch file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _not_a_checkpoint(path, "it holds Python objects other than tensors, which are never loaded") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as e:
        reason = "truncated or damaged" if not isinstance(e, OSError) else describe_os_error(e)
        raise _not_a_checkpoint(path, reason) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an eva02 training checkpoint; use it as model.init instead")
    if not isinstance(ckpt.get("model"), dict) or not all(isinstance(k, str) for k in ckpt["model"]):
        raise _not_a_checkpoint(path, "its model state is not a mapping of parameter names")
    return ckpt


# What a run leaves in its work dir besides config.json (which every start rewrites).
RUN_FILES = ("final.safetensors", "final_ema.safetensors", "metrics.jsonl")


def previous_run_files(work_dir: str | os.PathLike) -> list[Path]:
    """The files of an earlier run in `work_dir` that a new run would replace."""
    wd = Path(work_dir)
    found = [wd / n for n in RUN_FILES if (wd / n).exists()]
    d = ckpt_dir(wd)
    if d.is_dir():
        found += sorted(p for p in d.iterdir() if p.name.endswith((".pt", ".pt.nonfinite")))
    return found


def remove_run_files(work_dir: str | os.PathLike) -> None:
    """Delete an earlier run's files (see `previous_run_files`) and its TensorBoard logs."""
    for p in previous_run_files(work_dir):
        p.unlink(missing_ok=True)
    shutil.rmtree(Path(work_dir) / "tensorboard", ignore_errors=True)


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
    save_checkpoint(model, path)
