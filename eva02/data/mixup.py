"""Batch-level mixup / cutmix with label smoothing (timm `Mixup` semantics, 'batch' mode).

Off in the official EVA-02 fine-tuning (mixup 0, cutmix 0); available for other recipes. Targets come
out as soft (B, C) distributions; randomness is drawn from a generator the caller seeds per step.
"""

from __future__ import annotations

import math

import torch


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, C): 1 - smoothing + smoothing/C on the label, smoothing/C elsewhere."""
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    return out.scatter_(1, targets.unsqueeze(1), 1.0 - smoothing + off)


def _cutmix_box(h: int, w: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy = int(torch.randint(0, h, (1,), generator=g))
    cx = int(torch.randint(0, w, (1,), generator=g))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return y0, y1, x0, x1


class Mixup:
    """Mix a batch with its flipped copy; returns (images, soft targets)."""

    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        smoothing: float = 0.1,
    ) -> None:
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, smoothing

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def _lam(self, g: torch.Generator) -> tuple[float, bool]:
        if float(torch.rand((), generator=g)) >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or float(torch.rand((), generator=g)) < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        return self._beta(alpha, g), use_cutmix

    @staticmethod
    def _beta(alpha: float, g: torch.Generator) -> float:
        # Beta(a, a) = X / (X + Y) with X, Y ~ Gamma(a); Gamma via Marsaglia-Tsang on the seeded generator.
        def gamma(a: float) -> float:
            boost = 1.0
            if a < 1.0:
                boost = float(torch.rand((), generator=g)) ** (1.0 / a)
                a += 1.0
            d = a - 1.0 / 3.0
            c = 1.0 / math.sqrt(9.0 * d)
            while True:
                x = float(torch.randn((), generator=g))
                v = (1.0 + c * x) ** 3
                if v <= 0:
                    continue
                u = float(torch.rand((), generator=g))
                if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
                    return d * v * boost

        x, y = gamma(alpha), gamma(alpha)
        return x / (x + y)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, g: torch.Generator):
        y = smooth_one_hot(targets, self.num_classes, self.smoothing)
        if not self.active:
            return images, y
        lam, use_cutmix = self._lam(g)
        if lam == 1.0:
            return images, y
        flipped = images.flip(0)
        if use_cutmix:
            y0, y1, x0, x1 = _cutmix_box(images.shape[-2], images.shape[-1], lam, g)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])  # area-corrected
        else:
            images = images * lam + flipped * (1.0 - lam)
        return images, y * lam + y.flip(0) * (1.0 - lam)
