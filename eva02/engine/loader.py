"""Feeding the loop: the DataLoaders of a run, batches moved to the device, and the per-step seeds that
make everything random in a step depend only on (seed, rank, step, micro-batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from eva02.data.train_transforms import seed_worker

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig


def make_loader(ds: Dataset, sampler: Sampler, cfg: RunConfig, batch_size: int, collate: Callable) -> DataLoader:
    """A DataLoader over `sampler` with the run's worker settings."""
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


def eval_loader(val: Dataset, cfg: RunConfig, batch_size: int, rank: int, world: int, collate: Callable) -> DataLoader:
    """The loader of `eva02 test`: this process's share of the validation set (padded to equal shares,
    the padding marked for the metrics to leave out), `batch_size` or the config's eval batch size."""
    from eva02.data.datasets import EvalSampler, PaddedDataset

    bs = batch_size or cfg.data.eval_batch_size or cfg.data.batch_size
    sampler = EvalSampler(len(val), rank, world)
    return DataLoader(PaddedDataset(val), batch_size=bs, sampler=sampler, num_workers=cfg.data.workers,
                      collate_fn=collate)  # fmt: skip


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (asynchronous copies from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The seed of micro-batch `micro` of optimizer step `step` on `rank` (drop path, mixup, ...)."""
    return (seed * 1_000_003 + rank * 97_409 + step * 7_919 + micro) % (2**63 - 1)
