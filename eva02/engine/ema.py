"""Exponential moving average of the weights (official runs: timm ModelEma, decay 0.9999).

The average lives in a plain (unwrapped, unsharded) copy of the model in fp32, so it is evaluated,
saved and resumed the same way for one process, DDP or FSDP2; its state dict uses canonical names.
"""

from __future__ import annotations

import torch
from torch import nn

from eva02.engine.optim import strip_wrappers


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors; the average is kept over the gathered full tensor.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ModelEma:
    """ema = decay * ema + (1 - decay) * live, over the state dict (parameters and persistent buffers)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = module.float().eval().requires_grad_(False)
        self.shadow = self.module.state_dict(keep_vars=False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[strip_wrappers(k)]
            v = _full(v).detach()
            if v.is_floating_point():
                s.lerp_(v.to(s.device, s.dtype), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
