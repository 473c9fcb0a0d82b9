"""Feeding the loop: what deals out the train epochs (a sampler, or a stream of shards that deals them out
itself), the DataLoaders of a run, batches moved to the device, and the per-step seeds that make everything
random in a step depend only on (seed, rank, step, micro-batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from eva02.data.datasets import TrainSampler
from eva02.data.device_decode import EncodedBatch, decode_batch
from eva02.data.train_transforms import seed_worker

if TYPE_CHECKING:
    from eva02.engine.config import RunConfig


def train_sampler(ds: Dataset, global_batch: int, batch_size: int, rank: int, world: int, seed: int) -> Any:
    """What deals out the train epochs to this process: a TrainSampler over the dataset's indexes, or, for a
    stream (`eva02.data.shard_stream.ShardStream`), the stream itself, planned for this process. Both have
    `steps_per_epoch()` and `set_epoch(epoch, start_step)`."""
    if isinstance(ds, IterableDataset):
        return ds.plan(global_batch, batch_size, rank, world, seed)
    return TrainSampler(len(ds), global_batch, rank, world, seed)


def make_loader(ds: Dataset, sampler: Sampler | None, cfg: RunConfig, batch_size: int, collate: Callable) -> DataLoader:
    """A DataLoader over `sampler` with the run's worker settings. A stream (an IterableDataset) deals out
    its own samples, so `sampler` is not given to the loader, and its workers start afresh for every
    `iter()`: they then read the epoch the stream was last set to."""
    w = cfg.data.workers
    stream = isinstance(ds, IterableDataset)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=None if stream else sampler,
        num_workers=w,
        collate_fn=collate,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.data.persistent_workers and w > 0 and not stream,
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


# The tasks whose train batches the loop's step normalises on the device: their train transform may give uint8
# images (`data.device_normalize`) or JPEGs (`data.decode_on_device`; a config rule limits it to these tasks)
UINT8_TASKS = ("classify", "mim")


class DeviceNormalize:
    """A batch's uint8 'images' (B, 3, H, W) (`fast_transforms.train_transform_for` with `data.device_normalize`),
    or its JPEGs to decode there (an `EncodedBatch`, `data.decode_on_device`: `device_decode.decode_batch`)
    -> float images in `dtype`: (x / 255 - mean) / std computed as the fast train transform computes it on the CPU
    (x * mul + add, float32 factors), then cast. Float images pass as they are."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype = torch.float32) -> None:
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.mul = 1.0 / (255.0 * std_t)
        self.add = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t
        self.dtype = dtype
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # the factors, per device

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = batch.get("images")
        if isinstance(x, EncodedBatch):
            x = decode_batch(x)  # float32 of whole values 0..255, as the uint8 images converted below
        elif isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            x = x.to(torch.float32)
        else:
            return batch
        factors = self._on.get(x.device)
        if factors is None:
            factors = self._on[x.device] = (self.mul.to(x.device), self.add.to(x.device))
        mul, add = factors
        out = x.mul_(mul).add_(add)
        return {**batch, "images": out if self.dtype == torch.float32 else out.to(self.dtype)}


def device_normalizer(cfg: RunConfig, model: torch.nn.Module) -> DeviceNormalize | None:
    """The step after `to_device` that turns uint8 train batches (`data.device_normalize`) or their JPEGs
    (`data.decode_on_device`) into normalised images, in the dtype of the model's floating-point parameters;
    None when the loader gives normalised images: other tasks' batches (detection's uint8 images, which the
    detector normalises itself) are not this step's."""
    if not (cfg.data.device_normalize or cfg.data.decode_on_device) or cfg.train.task not in UINT8_TASKS:
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return DeviceNormalize(tuple(cfg.data.mean), tuple(cfg.data.std), dtype)


def to_device(
    batch: dict[str, Any], device: torch.device, normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The batch's tensors on `device` (asynchronous copies from pinned memory), an `EncodedBatch` bound to it;
    other values as they are. With `normalize` (a `DeviceNormalize`), uint8 images are normalised there and
    JPEGs decoded there."""
    moved = (torch.Tensor, EncodedBatch)
    out = {k: v.to(device, non_blocking=True) if isinstance(v, moved) else v for k, v in batch.items()}
    return normalize(out) if normalize is not None else out


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """The seed of micro-batch `micro` of optimizer step `step` on `rank` (drop path, mixup, ...)."""
    return (seed * 1_000_003 + rank * 97_409 + step * 7_919 + micro) % (2**63 - 1)
