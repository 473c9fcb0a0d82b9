"""Wrapping the single-device model from outside, in torchtitan's order: parallelism, then activation
checkpointing, then torch.compile. The model code itself never knows it is distributed.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eva02.engine.dist import DistInfo


def apply_fsdp(model: nn.Module, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, norms, head); parameters become DTensors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model without DDP or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model
