"""Per-step learning-rate schedules: linear warmup, then a half-cosine (official EVA-02
`utils.cosine_scheduler`) or a polynomial decay (mmsegmentation's `PolyLR`, the official EVA-02 seg runs)."""

from __future__ import annotations

import math

import torch


def cosine_lr(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0, warmup_lr: float = 0.0
) -> float:
    """lr at optimizer step `step` (0-based): warmup_lr -> base_lr linearly, then cosine down to min_lr.

    As the official scheduler (a linspace that includes both ends, then a cosine table): warmup value i
    of W is warmup_lr + (base_lr - warmup_lr) * i / (W - 1), and cosine value j (counted after warmup) is
    min_lr + (base_lr - min_lr) * (1 + cos(pi * j / n)) / 2 with n = total_steps - W.
    """
    if step < warmup_steps:
        frac = step / (warmup_steps - 1) if warmup_steps > 1 else 0.0
        return warmup_lr + (base_lr - warmup_lr) * frac
    n = max(1, total_steps - warmup_steps)
    j = min(step - warmup_steps, n)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * j / n))


def poly_lr(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 0.0,
    warmup_lr: float = 0.0,
    power: float = 1.0,
) -> float:
    """lr at optimizer step `step` (0-based): the warmup of `cosine_lr`, then min_lr + (base_lr - min_lr) *
    (1 - j / n) ** power, j counted after warmup and n = total_steps - warmup (power 1: a straight line)."""
    if step < warmup_steps:
        return cosine_lr(step, base_lr, total_steps, warmup_steps, min_lr, warmup_lr)
    n = max(1, total_steps - warmup_steps)
    j = min(step - warmup_steps, n)
    return min_lr + (base_lr - min_lr) * (1.0 - j / n) ** power


SCHEDULES = ("cosine", "poly")


class LrSchedule:
    """Sets every param group's lr to the schedule's lr(step) x group['lr_scale']; its state is the step only.

    `kind` 'cosine' (`cosine_lr`) or 'poly' (`poly_lr` with `power`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        total_steps: int,
        warmup_steps: int,
        min_lr: float = 0.0,
        warmup_lr: float = 0.0,
        kind: str = "cosine",
        power: float = 1.0,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {kind!r}")
        self.kind, self.power = kind, power
        if total_steps <= 0:
            raise ValueError(
                f"the schedule needs at least one step, got total_steps={total_steps}; "
                "use more data, a smaller global batch or more epochs"
            )
        self.optimizer = optimizer
        self.base_lr, self.min_lr, self.warmup_lr = base_lr, min_lr, warmup_lr
        self.total_steps, self.warmup_steps = total_steps, min(warmup_steps, total_steps)
        self.step_num = 0
        self.apply()

    def lr(self, step: int | None = None) -> float:
        step = self.step_num if step is None else step
        args = (step, self.base_lr, self.total_steps, self.warmup_steps, self.min_lr, self.warmup_lr)
        return poly_lr(*args, self.power) if self.kind == "poly" else cosine_lr(*args)

    def apply(self) -> float:
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def step(self) -> float:
        """Advance one optimizer step and set the lr for the next one."""
        self.step_num += 1
        return self.apply()

    def state_dict(self) -> dict:
        return {"step_num": self.step_num}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step_num"])
        self.apply()
