"""Wrapping the single-device model from outside, in torchtitan's order: parallelism, then activation
checkpointing, then torch.compile. The model code itself never knows it is distributed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from eva02.engine.dist import DistInfo


def apply_fsdp(model: nn.Module, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, norms, head); parameters become DTensors."""
    # Our blocks return their residual sum computed in place in a fresh branch output, which FSDP2 flags
    # as a possible view hazard; no caller modifies a block output in place, and the 1-vs-2-process
    # FSDP2 test shows identical losses, so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    # Parameters are gathered in the low precision, gradients reduced in fp32. Block inputs are not cast:
    # the RoPE tables passed to every block must stay fp32 (autocast handles the matmuls).
    mp = (
        MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        if mp_dtype
        else None
    )
    kwargs = {"mp_policy": mp} if mp else {}
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        # The last block's parameters are needed right away by the backward pass: keep them gathered.
        fully_shard(blk, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers of any kind (1-3-d, sync) in `model`."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_batchnorm(
    model: nn.Module, info: DistInfo, mode: str = "ddp", log: Callable[[str], None] | None = None
) -> nn.Module:
    """`model` with its BatchNorm layers made SyncBatchNorm (batch statistics over all processes, as the
    official segmentation heads' SyncBN) when the run is DDP on CUDA; otherwise `model` unchanged.

    The layers keep their weights and running statistics (the module objects are replaced, the tensors
    carried over). SyncBatchNorm only runs on GPUs: a CPU (gloo) run keeps per-process BatchNorm, and
    FSDP2 runs do too (the conversion is only for DDP); either says so once through `log`. A model
    without BatchNorm, or a single process, is left alone without a word.
    """
    count = count_batchnorms(model)
    if not count or not info.distributed:
        return model
    if info.device.type != "cuda":
        reason = f"SyncBatchNorm runs on GPUs only, this run is on {info.device.type}"
    elif mode != "ddp":
        reason = f"the conversion is made for DDP, not train.parallel={mode!r}"
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if log is not None:
            log(f"train.sync_bn: {count} BatchNorm layers synchronised over {info.world_size} processes")
        return model
    if log is not None:
        log(f"train.sync_bn: {count} BatchNorm layers keep per-process statistics ({reason})")
    return model


def parallelize(
    model: nn.Module,
    info: DistInfo,
    mode: str = "ddp",
    grad_checkpointing: bool = False,
    compile: bool = False,
    mp_dtype: torch.dtype | None = None,
    sync_bn: bool = False,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Return the module to train with: DDP- or FSDP2-wrapped when distributed, checkpointed, compiled.

    `sync_bn`: BatchNorm layers become SyncBatchNorm under DDP on CUDA (`sync_batchnorm`; `log` gets
    one line when the model has any). `unwrap` gives back the model (for FSDP2 it is the same object,
    sharded in place).
    """
    if sync_bn:  # before the wrapper, which must see the final modules
        model = sync_batchnorm(model, info, mode, log)
    model.to(info.device)
    # Our checkpointing is a per-block flag inside the model, so it composes with either wrapper; one
    # process with mode 'fsdp' trains the plain module (sharding over one rank only adds overhead).
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if info.distributed:
        if mode == "fsdp":
            model = apply_fsdp(model, mp_dtype)
        else:
            ids = [info.device.index] if info.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
    if compile:
        model = torch.compile(model)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back on its sharded parameters. A forward pass leaves the modules
    that do not reshard after forward (the root, the last block) gathered until a backward pass; weights
    changed in place on the shards (EMA swaps) are seen only after this."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model without DDP or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps (`sync` False): DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`; a plain block for the step's last micro-batch or a single process."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
