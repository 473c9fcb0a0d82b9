"""Exponential moving average of the weights (official runs: timm ModelEma, decay 0.9999).

The average is kept in fp32 next to the live weights, in the same layout: under FSDP2 each rank holds
the average of its own shards only and updates it without communication (`torch._foreach_lerp_` over
the local tensors). Full tensors are gathered only to save (`state_dict`, collective under FSDP2);
evaluation swaps the average into the trained model for the time of the evaluation. Its state dict
holds the full tensors under canonical names, so one process, DDP and FSDP2 read each other's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from eva02.engine.parallel import reshard, unwrap


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


class ModelEma:
    """ema = decay * ema + (1 - decay) * live, over the state dict (parameters and persistent buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        weights = self._weights(model)
        self.names = list(weights)
        # DTensor layouts of sharded weights: what gathering a full tensor and slicing one back need.
        self.layouts = {k: (v.device_mesh, v.placements, v.shape, v.stride()) for k, v in weights.items()
                        if isinstance(v, DTensor)}  # fmt: skip
        self.shadow = [
            _local(v).float().clone() if v.is_floating_point() else _local(v).clone() for v in weights.values()
        ]
        self.floating = [i for i, s in enumerate(self.shadow) if s.is_floating_point()]
        self.other = [i for i, s in enumerate(self.shadow) if not s.is_floating_point()]  # copied, not averaged

    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return unwrap(model).state_dict(keep_vars=True)

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        reshard(unwrap(model))  # the shards are the weights (no gathered copy from an earlier forward)
        weights = self._weights(model)
        if list(weights) != self.names:
            raise ValueError("the model's weights differ from those the EMA was built for")
        return [_local(v) for v in weights.values()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards the live weights (no communication)."""
        live = self._live(model)
        shadow = [self.shadow[i] for i in self.floating]
        new = [live[i] if live[i].dtype == torch.float32 else live[i].float() for i in self.floating]
        if shadow:
            torch._foreach_lerp_(shadow, new, 1.0 - self.decay)
        for i in self.other:
            self.shadow[i].copy_(live[i])

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model holding the averaged weights inside the block, its own ones again after it."""
        live = self._live(model)
        saved = [t.clone() for t in live]
        with torch.no_grad():
            torch._foreach_copy_(live, [s.to(t.dtype) for s, t in zip(self.shadow, live, strict=True)])
        try:
            yield model
        finally:
            reshard(unwrap(model))  # the next forward gathers the live weights again
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on CPU by canonical name (collective under FSDP2: call on every rank)."""
        out = {}
        for name, s in zip(self.names, self.shadow, strict=True):
            if name in self.layouts:
                mesh, placements, shape, stride = self.layouts[name]
                s = DTensor.from_local(s, mesh, placements, shape=shape, stride=stride).full_tensor()
            out[name] = s.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the average from full tensors (every rank keeps its shards of them)."""
        missing, unexpected = set(self.names) - set(state), set(state) - set(self.names)
        if missing or unexpected:
            raise ValueError(
                f"the EMA state does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]})"
            )
        for name, s in zip(self.names, self.shadow, strict=True):
            full, layout = state[name], self.layouts.get(name)
            shape = tuple(layout[2]) if layout else tuple(s.shape)
            if tuple(full.shape) != shape:
                raise ValueError(f"the EMA state's {name} has shape {tuple(full.shape)}, this model's {shape}")
            if layout:
                full = distribute_tensor(full.to(s.device), layout[0], layout[1]).to_local()
            s.copy_(full)
