"""Wrapping the single-device model from outside, in torchtitan's order: parallelism, then activation
checkpointing, then torch.compile. The model code itself never knows it is distributed.
"""

from __future__ import annotations

import contextlib
import warnings

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


def parallelize(
    model: nn.Module,
    info: DistInfo,
    mode: str = "ddp",
    grad_checkpointing: bool = False,
    compile: bool = False,
    mp_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Return the module to train with: DDP- or FSDP2-wrapped when distributed, checkpointed, compiled.

    `unwrap` gives back the Eva02 module (for FSDP2 it is the same object, sharded in place).
    """
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
