"""The training loop: one loop for every task (classification fine-tuning, MIM pre-training).

Mirrors the official `EVA-02/asuka/engine_for_finetuning.py` step: per-step lr from the schedule,
gradient accumulation, optional clipping, loss scaling for fp16, EMA update after each optimizer step.
Everything random in a step is seeded from (seed, rank, step), and data order and augmentation from
(seed, epoch, index), so a resumed run retraces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from eva02 import hints
from eva02.data.datasets import EvalSampler, PaddedDataset, TrainSampler
from eva02.engine import checkpoint as ckpt
from eva02.engine.config import RunConfig, save_config
from eva02.engine.dist import DistInfo, all_reduce_sum, broadcast_object, init_distributed
from eva02.engine.ema import ModelEma
from eva02.engine.evaluate import autocast
from eva02.engine.optim import build_optimizer
from eva02.engine.parallel import parallelize, unwrap
from eva02.engine.runlog import RunLog, format_eta
from eva02.engine.schedule import CosineSchedule
from eva02.engine.tasks import ClassificationTask, Task
from eva02.engine.workdir import check_resumable, claim_work_dir
from eva02.fileio import DirLock, describe_os_error
from eva02.threads import set_threads

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, too many unreadable images); the message says why."""


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


def _step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + rank * 97_409 + step * 7_919 + micro) % (2**63 - 1)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loader(ds, sampler, cfg: RunConfig, batch_size: int, collate) -> DataLoader:
    from eva02.data.train_transforms import seed_worker

    w = cfg.data.workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=w,
        collate_fn=collate,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.data.persistent_workers and w > 0,
        worker_init_fn=seed_worker,
    )


def _no_sync(model, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 flag)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def restore():
            yield
            model.set_requires_gradient_sync(True)

        return restore()
    return contextlib.nullcontext()


class Trainer:
    """State of one run; `fit()` trains, evaluates, checkpoints and writes the final weights."""

    def __init__(
        self,
        cfg: RunConfig,
        work_dir: str | os.PathLike,
        task: Task | None = None,
        resume: str | None = None,
        info: DistInfo | None = None,
        overwrite: bool = False,
    ) -> None:
        self.cfg, self.work_dir, self.task = cfg, Path(work_dir), task or ClassificationTask()
        self.info = info or init_distributed(timeout_s=cfg.train.dist_timeout_s)
        self.lock: DirLock | None = None
        try:
            with hints.using(hints.CONFIG):  # loading errors name config fields (model.init=FILE, ...)
                self._setup(resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: str | None, overwrite: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.info.device.type == "cpu":  # train.threads=0: the cores free now, shared by this node's ranks
            set_threads(t.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        # The same seed on every rank: FSDP2 keeps each rank's own initial shard (no broadcast as in DDP).
        torch.manual_seed(t.seed)
        claim = claim_work_dir(self.work_dir, self.info.is_main, resume, overwrite)
        self.lock = claim.lock
        self.log = RunLog(self.work_dir, self.info.is_main)
        if self.info.is_main:
            for note in claim.notes:
                self.log.info(note)
            save_config(cfg, self.work_dir / "config.json")
        self.train_ds, self.val_ds = self.task.build_datasets(cfg)
        self.accum = accumulation(cfg, self.info.world_size)
        self.global_batch = cfg.data.batch_size * self.info.world_size * self.accum
        self.sampler = TrainSampler(len(self.train_ds), self.global_batch, self.info.rank, self.info.world_size, t.seed)
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
            f"{hints.count(self.info.world_size, 'process', 'processes')} x {self.accum} accumulation; "
            f"{hints.count(self.steps_per_epoch, 'step')} per epoch, {hints.count(self.total_steps, 'step')} in all"
        )
        self.amp = AMP_DTYPES[t.amp]
        model = self.task.build_model(cfg)
        self.ema = ModelEma(copy.deepcopy(model).to(self.info.device), cfg.ema.decay) if cfg.ema.enabled else None
        fsdp_mp = self.amp if t.parallel == "fsdp" else None
        self.model = parallelize(model, self.info, t.parallel, t.grad_checkpointing, t.compile, fsdp_mp)
        depth = len(unwrap(self.model).blocks)
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, o.layer_decay, depth, o.betas, o.eps)
        s = cfg.schedule
        self.schedule = CosineSchedule(
            self.optimizer, o.lr, self.total_steps, round(s.warmup_epochs * self.steps_per_epoch), s.min_lr, s.warmup_lr
        )
        self.scaler = torch.amp.GradScaler(self.info.device.type, enabled=t.amp == "fp16")
        self.epoch, self.step_in_epoch, self.global_step, self.best = 0, 0, 0, -math.inf
        self.bad_images = 0  # unreadable images met in the current epoch
        if claim.resume_path is not None:
            self._resume(claim.resume_path, claim.resume_state)

    def close(self) -> None:
        """Release the work-dir lock (the run's files stay)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------------------ checkpoints
    def _resume(self, path: Path, state: dict) -> None:
        changed = check_resumable(path, state, self.cfg, self.global_batch)
        if changed:
            self.log.info(f"note: resuming with settings changed since the checkpoint: {', '.join(changed)}")
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
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best_top1"]
        self.bad_images = state.get("bad_images", 0) if self.step_in_epoch else 0
        self.log.truncate_after(self.global_step)  # records a killed run wrote past its checkpoint
        self.log.info(
            f"resumed from {path}: epoch {self.epoch + 1}, step {self.step_in_epoch}, global step {self.global_step}"
        )

    def _newest_checkpoint(self) -> str:
        last = ckpt.ckpt_dir(self.work_dir) / "last.pt"
        return f"the newest good checkpoint is {last}" if last.is_file() else "no checkpoint was written"

    def save(self, best: bool = False) -> None:
        """Write a training checkpoint, only of finite weights; a failed write stops the run on every rank."""
        bad = all_reduce_sum(ckpt.count_nonfinite(self.model).to(self.info.device))
        if bad > 0:
            raise TrainingError(
                f"the weights became non-finite (NaN/Inf) by global step {self.global_step}; no checkpoint was "
                f"written for it and {self._newest_checkpoint()}; lower optim.lr or set optim.clip_grad"
            )
        model_sd, optim_sd = ckpt.gather_state(self.model, self.optimizer)  # collective under FSDP2
        error = None
        if self.info.is_main:
            state = {
                "config": self.cfg.to_dict(), "model": model_sd, "optimizer": optim_sd,
                "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": ckpt.rng_state(), "rng_rank": 0, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "global_batch": self.global_batch, "best_top1": self.best,
                "bad_images": self.bad_images,
            }  # fmt: skip
            try:
                ckpt.save(self.work_dir, state, self.global_step, self.cfg.checkpoint.keep_last, best=best)
            except ckpt.CheckpointWriteError as e:
                error = f"{e.strerror}; the run stopped at global step {self.global_step}, {self._newest_checkpoint()}"
        error = broadcast_object(error)
        if error:
            raise TrainingError(error)

    # ---------------------------------------------------------------------------------- training
    def train_step(self, it) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; raises TrainingError on a non-finite loss."""
        loss_sum = torch.zeros(4, dtype=torch.float64, device=self.info.device)  # loss, n, non-finite, bad
        for micro in range(self.accum):
            torch.manual_seed(_step_seed(self.cfg.train.seed, self.info.rank, self.global_step, micro))
            batch = next(it)
            for p, reason in batch.get("bad", ()):
                self.log.warn(f"skipped unreadable image {p}: {reason}")
            loss_sum[3] += len(batch.get("bad", ()))
            if batch.get("images") is None:
                raise TrainingError("every image of a batch failed to load; check the dataset files")
            batch = _to_device(batch, self.info.device)
            with _no_sync(self.model, micro == self.accum - 1), autocast(self.info.device, self.amp):
                loss, _ = self.task.forward_loss(self.model, batch)
            loss_sum[2] += (~torch.isfinite(loss.detach())).to(loss_sum.dtype)  # counted on the device: no sync
            self.scaler.scale(loss / self.accum).backward()
            loss_sum[0] += loss.detach().double() * batch["images"].shape[0]
            loss_sum[1] += batch["images"].shape[0]
        all_reduce_sum(loss_sum)
        self.bad_images += int(loss_sum[3])  # each sample is read once per epoch: distinct files
        if self.bad_images > self.cfg.data.max_bad_fraction * len(self.train_ds):
            raise TrainingError(
                f"{hints.count(self.bad_images, 'unreadable image')} in epoch {self.epoch + 1}, more than "
                "data.max_bad_fraction="
                f"{self.cfg.data.max_bad_fraction} of {len(self.train_ds)}; fix or remove them"
            )
        if loss_sum[2] > 0:
            self._stop_non_finite()
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
        return {"loss": float(loss_sum[0] / loss_sum[1]), "lr": lr, "images": float(loss_sum[1])}

    def _stop_non_finite(self) -> None:
        """The weights after `global_step` updates gave a non-finite loss: checkpoints holding them (or
        later ones) are set aside, so `last.pt` and the message point at weights that still train."""
        kept = None
        if self.info.is_main and self.global_step > 0:
            kept = ckpt.discard_from(self.work_dir, self.global_step)
        where = (
            f"the newest good checkpoint is {kept}"
            if kept
            else f"no checkpoint before it is kept in {ckpt.ckpt_dir(self.work_dir)}"
        )
        raise TrainingError(
            f"non-finite loss at epoch {self.epoch + 1}, global step {self.global_step + 1}; training stopped and "
            f"{where}; lower optim.lr, use train.amp=bf16 or set optim.clip_grad"
        )

    def evaluate(self) -> dict[str, Any]:
        if self.val_ds is None or not hasattr(self.task, "evaluate"):
            return {}
        if not hasattr(self, "val_loader"):
            sampler = EvalSampler(len(self.val_ds), self.info.rank, self.info.world_size)
            bs = self.cfg.data.eval_batch_size or self.cfg.data.batch_size
            self.val_loader = _loader(PaddedDataset(self.val_ds), sampler, self.cfg, bs, self.task.collate)
        model = self.model if self.cfg.train.parallel == "fsdp" else unwrap(self.model)
        out = {k: v for k, v in self.task.evaluate(model, self.val_loader, self.info.device, self.amp).items()}
        if self.ema is not None and self.cfg.ema.evaluate:
            ema_out = self.task.evaluate(self.ema.module, self.val_loader, self.info.device, self.amp)
            out.update({f"ema_{k}": v for k, v in ema_out.items() if k != "per_class"})
        return out

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule; the work-dir lock is released however it ends."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, info = self.cfg, self.info
        loader = _loader(self.train_ds, self.sampler, cfg, cfg.data.batch_size, self.task.collate)
        metrics: dict[str, Any] = {}
        t_start, steps_done = time.time(), 0
        while self.epoch < cfg.schedule.epochs and self.global_step < self.total_steps:
            if self.step_in_epoch == 0:
                self.bad_images = 0
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            self.model.train()
            it = iter(loader)
            # A live bar on a terminal; in a log file, plain lines at the metric records instead of redraws.
            live = info.is_main and sys.stderr.isatty()
            with tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                disable=not live,
                desc=f"epoch {self.epoch + 1}/{cfg.schedule.epochs}",
                dynamic_ncols=True,
            ) as bar:  # closed (its line ended) before any error message is printed
                while self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps:
                    t0 = time.time()
                    m = self.train_step(it)
                    self.step_in_epoch += 1
                    steps_done += 1
                    dt = time.time() - t0
                    eta = (time.time() - t_start) / steps_done * (self.total_steps - self.global_step)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", img_s=f"{m['images'] / dt:.0f}",
                        eta=format_eta(eta),
                    )  # fmt: skip
                    if self.global_step % cfg.train.log_every == 0 or self.global_step == 1:
                        img_s = m["images"] / dt
                        self.log.write("train", self.global_step, epoch=self.epoch, loss=m["loss"], lr=m["lr"],
                                       img_s=img_s)  # fmt: skip
                        if not live:
                            self.log.info(
                                f"epoch {self.epoch + 1}/{cfg.schedule.epochs} step {self.step_in_epoch}/"
                                f"{self.steps_per_epoch} (global {self.global_step}/{self.total_steps}): loss "
                                f"{m['loss']:.4f} lr {m['lr']:.2e} {img_s:.0f} img/s eta {format_eta(eta)}"
                            )
                    every = cfg.checkpoint.every_steps
                    if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                        self.save()
            del it
            finished = self.step_in_epoch >= self.steps_per_epoch
            last = self.global_step >= self.total_steps or (finished and self.epoch + 1 >= cfg.schedule.epochs)
            if finished:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            ev_every = cfg.train.eval_every_epochs
            if last or (finished and ev_every and self.epoch % ev_every == 0):
                metrics = self.evaluate()
                if metrics:
                    self.log.write(
                        "eval",
                        self.global_step,
                        epoch=self.epoch,
                        **{k: v for k, v in metrics.items() if k != "per_class"},
                    )
                    self.log.info(f"epoch {self.epoch}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f}")
            top1 = max(metrics.get("top1", -math.inf), metrics.get("ema_top1", -math.inf))
            is_best = top1 > self.best
            self.best = max(self.best, top1)
            c_every = cfg.checkpoint.every_epochs
            if last or (finished and c_every and self.epoch % c_every == 0):
                self.save(best=is_best)
        self.write_final()
        self.log.close()
        best = self.best if math.isfinite(self.best) else None  # None: the run had no evaluation (e.g. MIM)
        return {**metrics, "global_step": self.global_step, "best_top1": best}

    def write_final(self) -> None:
        """Final weights (and EMA weights) in the package's safetensors format, loadable by get_model."""
        model_sd, _ = ckpt.gather_state(self.model, self.optimizer)
        error = None
        if self.info.is_main:
            try:
                self._write_final(model_sd)
            except OSError as e:
                error = f"cannot write the final weights to {self.work_dir}: {describe_os_error(e)}"
        error = broadcast_object(error)
        if error:
            raise TrainingError(f"{error}; the training checkpoints are in {ckpt.ckpt_dir(self.work_dir)}")

    def _write_final(self, model_sd: dict) -> None:
        # A task may train a wrapper (MIM: backbone + mask token + regressor) whose deliverable is
        # the plain backbone; `export_model` picks it out so get_model can load the file.
        export = getattr(self.task, "export_model", lambda m: m)
        plain = self.task.build_model(self.cfg, load_init=False)
        plain.load_state_dict(model_sd)
        ckpt.save_weights(export(plain), self.work_dir / "final.safetensors")
        if self.ema is not None:
            ckpt.save_weights(export(self.ema.module), self.work_dir / "final_ema.safetensors")


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
