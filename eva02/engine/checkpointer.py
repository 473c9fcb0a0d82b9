"""A run's state on disk: training checkpoints only of weights that still train, resume from one, the
checkpoints set aside after a non-finite loss, and the final weights (the task's deliverable).

Rank 0 writes; every rank takes part in the gathers (collectives under FSDP2) and stops together when
a write fails. The file format is `eva02.engine.checkpoint`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eva02.engine import checkpoint as ckpt
from eva02.engine.dist import DistInfo, all_reduce_sum, broadcast_object
from eva02.engine.ema import ModelEma
from eva02.engine.schedule import LrSchedule
from eva02.engine.workdir import check_resumable
from eva02.fileio import describe_os_error

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig
    from eva02.engine.runlog import RunLog
    from eva02.engine.tasks import Task

# Where a run stands, as a checkpoint records it (besides the state of the objects below).
COUNTERS = ("epoch", "step_in_epoch", "global_step", "best", "bad_images")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, too many unreadable images); the message says why."""


class Checkpointer:
    """Saves and restores the model, optimizer, schedule, EMA and loss scaler of a run with its counters."""

    def __init__(
        self,
        cfg: RunConfig,
        work_dir: Path,
        info: DistInfo,
        task: Task,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LrSchedule,
        scaler: torch.amp.GradScaler,
        ema: ModelEma | None,
        global_batch: int,
    ) -> None:
        self.cfg, self.work_dir, self.info, self.task = cfg, work_dir, info, task
        self.model, self.optimizer, self.schedule, self.scaler, self.ema = model, optimizer, schedule, scaler, ema
        self.global_batch = global_batch

    def newest(self) -> str:
        """Where the newest good checkpoint is, in words for an error message."""
        last = ckpt.ckpt_dir(self.work_dir) / "last.pt"
        return f"the newest good checkpoint is {last}" if last.is_file() else "no checkpoint was written"

    def restore(self, path: Path, state: dict[str, Any], log: RunLog) -> dict[str, Any]:
        """Load a checkpoint's state into the run's objects (every rank); returns its counters."""
        changed = check_resumable(path, state, self.cfg, self.global_batch)
        if changed:
            log.info(f"note: resuming with settings changed since the checkpoint: {', '.join(changed)}")
        try:
            ckpt.restore_state(self.model, self.optimizer, state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:200]
            raise ValueError(f"{path} does not fit this run's model ({first}); resume with the same config") from None
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.info.rank == state.get("rng_rank", 0) and state.get("rng"):
            ckpt.set_rng_state(state["rng"])
        counters = {k: state.get(k) for k in COUNTERS}
        counters["best"] = state.get("best", state.get("best_top1", -math.inf))  # best_top1: earlier files
        counters["bad_images"] = state.get("bad_images", 0) if state["step_in_epoch"] else 0
        log.truncate_after(state["global_step"])  # records a killed run wrote past its checkpoint
        log.info(
            f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step_in_epoch']}, "
            f"global step {state['global_step']}"
        )
        return counters

    def save(self, counters: dict[str, Any], best: bool = False) -> None:
        """Write a training checkpoint, only of finite weights; a failed write stops the run on every rank."""
        step = counters["global_step"]
        bad = all_reduce_sum(ckpt.count_nonfinite(self.model).to(self.info.device))
        if bad > 0:
            raise TrainingError(
                f"the weights became non-finite (NaN/Inf) by global step {step}; no checkpoint was "
                f"written for it and {self.newest()}; lower optim.lr or set optim.clip_grad"
            )
        model_sd, optim_sd = ckpt.gather_state(self.model, self.optimizer)  # collectives under FSDP2
        ema_sd = self.ema.state_dict() if self.ema is not None else None
        error = None
        if self.info.is_main:
            state = {
                "config": self.cfg.to_dict(), "model": model_sd, "optimizer": optim_sd,
                "schedule": self.schedule.state_dict(), "ema": ema_sd,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": ckpt.rng_state(), "rng_rank": 0, "global_batch": self.global_batch,
                "best_metric": self.task.best_metric, **{k: counters[k] for k in COUNTERS},
            }  # fmt: skip
            try:
                ckpt.save(self.work_dir, state, step, self.cfg.checkpoint.keep_last, best=best)
            except ckpt.CheckpointWriteError as e:
                error = f"{e.strerror}; the run stopped at global step {step}, {self.newest()}"
        error = broadcast_object(error)
        if error:
            raise TrainingError(error)

    def non_finite(self, epoch: int, global_step: int) -> TrainingError:
        """The error for a non-finite loss of the weights after `global_step` updates. Checkpoints holding
        them (or later ones) are set aside first, so `last.pt` and the message name weights that still train."""
        kept = None
        if self.info.is_main and global_step > 0:
            kept = ckpt.discard_from(self.work_dir, global_step)
        where = (
            f"the newest good checkpoint is {kept}"
            if kept
            else f"no checkpoint before it is kept in {ckpt.ckpt_dir(self.work_dir)}"
        )
        return TrainingError(
            f"non-finite loss at epoch {epoch + 1}, global step {global_step + 1}; training stopped and "
            f"{where}; lower optim.lr, use train.amp=bf16 or set optim.clip_grad"
        )

    def write_final(self) -> None:
        """Final weights (and EMA weights) in the package's safetensors format, loadable by get_model: the
        task's deliverable (`export_model`), e.g. the plain backbone of a pre-training run."""
        model_sd = ckpt.gather_model_state(self.model)  # collectives under FSDP2 (rank 0 receives)
        ema_sd = self.ema.state_dict() if self.ema is not None else None
        error = None
        if self.info.is_main:
            try:
                ckpt.save_weights(self.task.export_model(self.cfg, model_sd), self.work_dir / "final.safetensors")
                if ema_sd is not None:
                    ema = self.task.export_model(self.cfg, ema_sd)
                    ckpt.save_weights(ema, self.work_dir / "final_ema.safetensors")
            except OSError as e:
                error = f"cannot write the final weights to {self.work_dir}: {describe_os_error(e)}"
        error = broadcast_object(error)
        if error:
            raise TrainingError(f"{error}; the training checkpoints are in {ckpt.ckpt_dir(self.work_dir)}")
