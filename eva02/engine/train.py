"""The training loop: one loop over global steps for every task (`eva02.engine.tasks`).

Mirrors the official `EVA-02/asuka/engine_for_finetuning.py` step: per-step lr from the schedule,
gradient accumulation, optional clipping, loss scaling for fp16, EMA update after each optimizer step.
Evaluations and checkpoints fall on the steps their predicate names (`_due`: epoch ends, every N steps,
the last step). Everything random in a step is seeded from (seed, rank, step), and data order and
augmentation from (seed, epoch, index), so a resumed run retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from eva02 import hints
from eva02.data.datasets import EvalSampler, PaddedDataset
from eva02.dtypes import autocast, autocast_dtype
from eva02.engine.checkpointer import COUNTERS, Checkpointer, TrainingError
from eva02.engine.config import RunConfig, save_config
from eva02.engine.dist import DistInfo, all_reduce_sum, init_distributed
from eva02.engine.ema import ModelEma
from eva02.engine.loader import device_normalizer, make_loader, step_seed, to_device, train_sampler
from eva02.engine.optim import build_optimizer
from eva02.engine.parallel import no_grad_sync, parallelize, unwrap
from eva02.engine.runlog import Progress, RunLog
from eva02.engine.schedule import LrSchedule
from eva02.engine.tasks import Task, task_for
from eva02.engine.workdir import claim_work_dir
from eva02.fileio import DirLock
from eva02.threads import set_threads


def accumulation(cfg: RunConfig, world: int) -> int:
    """Micro-batches per optimizer step so that batch_size x world x accumulation = optim.global_batch."""
    per_step = cfg.data.batch_size * world
    target = cfg.optim.global_batch
    if target <= 0:
        return 1
    if target % per_step:
        raise ValueError(
            f"optim.global_batch={target} is not a multiple of data.batch_size x processes = "
            f"{cfg.data.batch_size} x {world}; change data.batch_size or optim.global_batch"
        )
    return target // per_step


class Trainer:
    """State of one run; `fit()` trains, evaluates, checkpoints and writes the final weights.

    `task` defaults to the one `train.task` names (`eva02.engine.tasks.TASKS`).
    """

    def __init__(
        self,
        cfg: RunConfig,
        work_dir: str | os.PathLike,
        task: Task | None = None,
        resume: str | None = None,
        info: DistInfo | None = None,
        overwrite: bool = False,
    ) -> None:
        self.cfg, self.work_dir, self.task = cfg, Path(work_dir), task if task is not None else task_for(cfg)
        self.info = info or init_distributed(timeout_s=cfg.train.dist_timeout_s)
        self.lock: DirLock | None = None
        try:
            with hints.using(hints.CONFIG):  # loading errors name config fields (model.init=FILE, ...)
                self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: str | None, overwrite: bool) -> None:
        cfg, t, info = self.cfg, self.cfg.train, self.info
        if info.device.type == "cpu":  # train.threads=0: the cores free now, shared by this node's ranks
            set_threads(t.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        # The same seed on every rank: FSDP2 keeps each rank's own initial shard (no broadcast as in DDP).
        torch.manual_seed(t.seed)
        claim = claim_work_dir(self.work_dir, info.is_main, resume, overwrite)
        self.lock = claim.lock
        self.log = RunLog(self.work_dir, info.is_main)
        if info.is_main:
            for note in claim.notes:
                self.log.info(note)
            save_config(cfg, self.work_dir / "config.json")
        self.train_ds, self.val_ds = self.task.build_datasets(cfg)
        self.val_loader = None
        self.accum = accumulation(cfg, info.world_size)
        self.global_batch = cfg.data.batch_size * info.world_size * self.accum
        self.sampler = train_sampler(
            self.train_ds, self.global_batch, cfg.data.batch_size, info.rank, info.world_size, t.seed
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the train dataset has {hints.count(len(self.train_ds), 'image')}, fewer than one global batch of "
                f"{self.global_batch}; lower optim.global_batch or data.batch_size"
            )
        self.total_steps = self.steps_per_epoch * cfg.schedule.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.log.info(
            f"global batch {self.global_batch} = {cfg.data.batch_size} per device x "
            f"{hints.count(info.world_size, 'process', 'processes')} x {self.accum} accumulation; "
            f"{hints.count(self.steps_per_epoch, 'step')} per epoch, {hints.count(self.total_steps, 'step')} in all"
        )
        self.amp = autocast_dtype(t.amp)
        model = self.task.build_model(cfg)
        self.device_norm = device_normalizer(cfg, model)  # uint8 batches normalised there, or JPEGs decoded there
        self.loss_fn = self.task.build_loss(cfg).to(info.device)
        fsdp_mp = self.amp if t.parallel == "fsdp" else None
        self.model = parallelize(
            model, info, t.parallel, t.grad_checkpointing, t.compile, fsdp_mp, sync_bn=t.sync_bn, log=self.log.info
        )
        self.ema = ModelEma(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        o, s = cfg.optim, cfg.schedule
        depth = len(unwrap(self.model).blocks)
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, o.layer_decay, depth, o.betas, o.eps)
        warmup = round(s.warmup_epochs * self.steps_per_epoch)
        self.schedule = LrSchedule(
            self.optimizer, o.lr, self.total_steps, warmup, s.min_lr, s.warmup_lr, kind=s.kind, power=s.power
        )
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp == torch.float16)
        self.checkpointer = Checkpointer(cfg, self.work_dir, info, self.task, self.model, self.optimizer,
                                         self.schedule, self.scaler, self.ema, self.global_batch)  # fmt: skip
        self.epoch, self.step_in_epoch, self.global_step, self.best = 0, 0, 0, -math.inf
        self.bad_images = 0  # unreadable images met in the current epoch
        if claim.resume_path is not None:
            for k, v in self.checkpointer.restore(claim.resume_path, claim.resume_state, self.log).items():
                setattr(self, k, v)

    def close(self) -> None:
        """Release the work-dir lock (the run's files stay)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def counters(self) -> dict[str, Any]:
        """Where the run stands (what a checkpoint records besides the state of model, optimizer, ...)."""
        return {k: getattr(self, k) for k in COUNTERS}

    def save(self, best: bool = False) -> None:
        """Write a training checkpoint (only of finite weights); `best` also points best.pt at it."""
        self.checkpointer.save(self.counters(), best)

    # ---------------------------------------------------------------------------------- training
    def train_step(self, batches) -> tuple[float, float, float]:
        """One optimizer step over `accum` micro-batches -> (mean loss, lr, images over all processes);
        raises TrainingError on a non-finite loss or too many unreadable images."""
        device = self.info.device
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, images, non-finite losses, bad
        images = unreadable = 0
        for micro in range(self.accum):
            torch.manual_seed(step_seed(self.cfg.train.seed, self.info.rank, self.global_step, micro))
            batch = next(batches)
            for p, reason in batch.get("bad", ()):
                self.log.warn(f"skipped unreadable image {p}: {reason}")
            unreadable += len(batch.get("bad", ()))
            if batch.get("images") is None:
                raise TrainingError("every image of a batch failed to load; check the dataset files")
            n = batch["images"].shape[0]
            with no_grad_sync(self.model, micro == self.accum - 1), autocast(device.type, self.amp):
                loss = self.loss_fn(self.model, to_device(batch, device, self.device_norm))
            self.scaler.scale(loss / self.accum).backward()
            loss = loss.detach().double()
            stats[0] += loss * n
            stats[2] += (~torch.isfinite(loss)).double()  # counted on the device, read below with the rest
            images += n
        stats[1], stats[3] = images, unreadable
        # The one host sync of a step, after the last backward is queued: the optimizer step below must not
        # run on a non-finite loss, and torch's AdamW cannot skip a step on the device under FSDP2 (its
        # per-tensor path takes no found_inf flag); the bad-image cap needs every rank's count as well.
        loss_sum, images, nonfinite, unreadable = all_reduce_sum(stats).tolist()
        self.bad_images += int(unreadable)  # each sample is read once per epoch: distinct files
        if self.bad_images > self.cfg.data.max_bad_fraction * len(self.train_ds):
            raise TrainingError(
                f"{hints.count(self.bad_images, 'unreadable image')} in epoch {self.epoch + 1}, more than "
                f"data.max_bad_fraction={self.cfg.data.max_bad_fraction} of {len(self.train_ds)}; fix or remove them"
            )
        if nonfinite:
            raise self.checkpointer.non_finite(self.epoch, self.global_step)
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule.lr()
        self.schedule.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model)
        return loss_sum / images, lr, images

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics of the live weights and, with ema.evaluate, of the EMA ('ema_' keys)."""
        if self.val_ds is None:
            return {}
        cfg, device = self.cfg, self.info.device
        if self.val_loader is None:
            sampler = EvalSampler(len(self.val_ds), self.info.rank, self.info.world_size)
            bs = cfg.data.eval_batch_size or cfg.data.batch_size
            self.val_loader = make_loader(PaddedDataset(self.val_ds), sampler, cfg, bs, self.task.collate)
        model = self.model if cfg.train.parallel == "fsdp" else unwrap(self.model)
        out = self.task.evaluate(cfg, model, self.val_loader, device, self.amp)
        if self.ema is not None and cfg.ema.evaluate:
            with self.ema.swapped_into(model):
                ema_out = self.task.evaluate(cfg, model, self.val_loader, device, self.amp)
            out.update({f"ema_{k}": v for k, v in ema_out.items() if k != "per_class"})
        return out

    def _due(self, epoch_end: bool, every_epochs: int, every_steps: int = 0) -> bool:
        """Whether a periodic action falls after the step just taken: at the run's last step, at the end of
        every `every_epochs`-th epoch, and every `every_steps` steps (0: never)."""
        if self.global_step >= self.total_steps or self.epoch >= self.cfg.schedule.epochs:
            return True
        at_epoch = epoch_end and every_epochs > 0 and self.epoch % every_epochs == 0
        return at_epoch or (every_steps > 0 and self.global_step % every_steps == 0)

    def _record_eval(self, metrics: dict[str, Any]) -> bool:
        """Log an evaluation; whether it is the best so far by the task's `best_metric` (live or EMA)."""
        if not metrics:
            return False
        self.log.write("eval", self.global_step, epoch=self.epoch, **{k: v for k, v in metrics.items()
                                                                        if k != "per_class"})  # fmt: skip
        shown = [f"{k} {metrics[k]:.2f}" for k in self.task.shown_metrics if k in metrics]
        if shown:
            self.log.info(f"epoch {self.epoch}: {' '.join(shown)}")
        key = self.task.best_metric
        score = max(metrics.get(key, -math.inf), metrics.get(f"ema_{key}", -math.inf)) if key else -math.inf
        is_best, self.best = score > self.best, max(self.best, score)
        return is_best

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule; the work-dir lock is released however it ends."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        loader = make_loader(self.train_ds, self.sampler, cfg, cfg.data.batch_size, self.task.collate)
        metrics: dict[str, Any] = {}
        batches = None  # the current epoch's batch iterator
        with Progress(self.log, cfg.schedule.epochs, self.steps_per_epoch, self.total_steps, cfg.train.log_every) as p:
            while self.global_step < self.total_steps and self.epoch < cfg.schedule.epochs:
                if batches is None:  # an epoch starts (or resumes at step_in_epoch)
                    if self.step_in_epoch == 0:
                        self.bad_images = 0
                    self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                    self.model.train()
                    batches = iter(loader)
                t0 = time.time()
                loss, lr, images = self.train_step(batches)
                self.step_in_epoch += 1
                p.step(self.epoch, self.step_in_epoch, self.global_step, loss, lr, images / (time.time() - t0))
                epoch_end = self.step_in_epoch == self.steps_per_epoch
                if epoch_end:
                    self.epoch, self.step_in_epoch, batches = self.epoch + 1, 0, None
                is_best = False
                if self.val_ds is not None and self._due(epoch_end, cfg.train.eval_every_epochs):
                    metrics = self.evaluate()
                    is_best = self._record_eval(metrics)
                if self._due(epoch_end, cfg.checkpoint.every_epochs, cfg.checkpoint.every_steps):
                    self.save(best=is_best)
        self.checkpointer.write_final()
        self.log.close()
        key = self.task.best_metric
        best = {f"best_{key}": self.best if math.isfinite(self.best) else None} if key else {}
        return {**metrics, "global_step": self.global_step, **best}


def train(
    cfg: RunConfig,
    work_dir: str | os.PathLike,
    resume: str | None = None,
    task: Task | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or resume: 'auto' or a checkpoint path) a run; returns the last evaluation metrics.

    A work dir that holds a previous run is refused unless `resume` or `overwrite` says what to do.
    """
    return Trainer(cfg, work_dir, task, resume, overwrite=overwrite).fit()
