"""A run's claim on its work dir: one run per folder (an exclusive lock held by rank 0), the leftovers of
killed writers removed, the checkpoint to resume chosen, and no new run started over a previous one
unless the user asked for it (`--resume` continues it, `--overwrite` replaces it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eva02.engine import checkpoint as ckpt
from eva02.engine.config import RunConfig, changed_keys
from eva02.engine.dist import broadcast_object
from eva02.fileio import DirLock, OutputError, clean_stale_temps
from eva02.hints import count

# Model fields that change the parameter shapes: a checkpoint resumes only with the same values.
ARCH_FIELDS = ("name", "patch_size", "depth", "dim", "heads", "mlp_hidden", "num_classes", "img_size")


@dataclass
class Claim:
    lock: DirLock | None  # held by rank 0 until the run ends
    resume_path: Path | None
    resume_state: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)  # what was found and done, for the run log


def _raise_everywhere(error: str | None) -> None:
    """Rank 0's error (or None) on every rank, so that all processes stop together."""
    error = broadcast_object(error)
    if error:
        raise OutputError(error)


def claim_work_dir(work_dir: Path, is_main: bool, resume: str | None, overwrite: bool) -> Claim:
    """Lock `work_dir`, clean dead writers' temporaries, pick the checkpoint to resume (`resume`: None,
    'auto' or a path), and refuse a fresh start over a previous run unless `overwrite` (then its files
    are deleted). Collective under torchrun: call on every rank; errors reach every rank."""
    lock, notes, error = None, [], None
    if is_main:
        try:
            lock = DirLock(work_dir).acquire()
            if lock.previous:
                notes.append(f"note: took over the lock of a run that is no longer running ({lock.previous})")
            stale = clean_stale_temps(work_dir) + clean_stale_temps(ckpt.ckpt_dir(work_dir))
            if stale:
                notes.append(f"note: removed {count(len(stale), 'temporary file')} left by a killed run")
        except OutputError as e:
            error = str(e)
        except OSError as e:
            error = f"work dir {work_dir}: {e}"
    try:
        _raise_everywhere(error)

        def warn(msg: str) -> None:
            if is_main:
                print(msg, file=sys.stderr)

        path, state = ckpt.resolve_resume(resume, work_dir, warn=warn)
        error = None
        if is_main and path is None:
            previous = ckpt.previous_run_files(work_dir)
            if previous and not overwrite:
                shown = ", ".join(str(p.relative_to(work_dir)) for p in previous[:3])
                error = (
                    f"work dir {work_dir} already holds a run ({shown}); pass --resume to continue it, "
                    "--overwrite to replace it, or choose another --work-dir"
                )
            elif previous:
                ckpt.remove_run_files(work_dir)
                notes.append(f"note: --overwrite: removed the previous run's files from {work_dir}")
        _raise_everywhere(error)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Claim(lock, path, state, notes)


def check_resumable(path: Path, state: dict[str, Any], cfg: RunConfig, global_batch: int) -> list[str]:
    """Refuse a resume that changes the global batch or the architecture (one line naming the checkpoint
    and its values); return the other settings that changed, which the run uses."""
    if state["global_batch"] != global_batch:
        raise ValueError(
            f"{path} was trained with global batch {state['global_batch']}, this run has "
            f"{global_batch}; set optim.global_batch={state['global_batch']} to resume"
        )
    changed = changed_keys(state.get("config", {}), cfg)
    arch = [k for k in changed if k.split(".")[0] == "model" and k.split(".")[1] in ARCH_FIELDS]
    if arch:
        old = state["config"]["model"]
        shown = ", ".join(f"{k}={old.get(k.split('.')[1])!r}" for k in arch)
        raise ValueError(
            f"{path} was trained with {shown}; this run changes the architecture, so it cannot resume: "
            "drop those --set options, or start a new run in another --work-dir"
        )
    return changed
