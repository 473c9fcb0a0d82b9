"""Block-wise patch masking for masked image modelling (BEiT's generator, as used by EVA-02 pre-training).

The official recipe (EVA-02 `asuka/masking_generator.py`, from BEiT) masks 105 of the 16 x 16 patches of a
224 px image by repeatedly dropping rectangles: each has a target area drawn uniformly between `min_num`
and the patches still to mask (capped at `max_num`), and a log-uniform aspect ratio in
[`min_aspect`, `max_aspect`]; a rectangle is kept only if it adds at least one and no more than the
remaining number of patches. We keep that sampling and add one thing: when ten tries in a row add
nothing (rare; the official generator then returns fewer patches), the remaining patches are taken
from the unmasked neighbours of the mask, so every mask has exactly `num_masking` patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Block:
    """One sampled rectangle: rows top..top+h-1, columns left..left+w-1; `added` = newly masked patches."""

    top: int
    left: int
    h: int
    w: int
    added: int


class BlockMaskGenerator:
    """Samples (H, W) boolean masks with exactly `num_masking` True patches, in blocks.

    Args:
        grid: patch grid (rows, cols); an int means square.
        num_masking: number of patches to mask per image.
        min_num: smallest target area of one block.
        max_num: largest target area of one block (default: `num_masking`).
        min_aspect: smallest block aspect ratio h/w; `max_aspect` defaults to 1/min_aspect.
        seed: seed of the generator's own random state, used when a call passes no `rng`.
    """

    def __init__(
        self,
        grid: tuple[int, int] | int = (16, 16),
        num_masking: int = 105,
        min_num: int = 16,
        max_num: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.num_masking = num_masking
        self.min_num = min_num
        self.max_num = num_masking if max_num is None else max_num
        self.min_aspect = min_aspect
        self.max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        n = self.height * self.width
        problems = []
        if self.height <= 0 or self.width <= 0:
            problems.append(f"grid must be positive, got {(self.height, self.width)}")
        if not 0 <= num_masking <= n:
            problems.append(f"num_masking must be in [0, {n}] for a {self.height}x{self.width} grid, got {num_masking}")
        if min_num <= 0 or self.max_num < min_num:
            problems.append(f"need 0 < min_num <= max_num, got min_num={min_num}, max_num={self.max_num}")
        if not 0 < self.min_aspect <= self.max_aspect:
            problems.append(f"need 0 < min_aspect <= max_aspect, got {self.min_aspect}, {self.max_aspect}")
        if problems:
            raise ValueError("invalid BlockMaskGenerator: " + "; ".join(problems))
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), num_masking={self.num_masking}, "
            f"min_num={self.min_num}, max_num={self.max_num}, aspect=[{self.min_aspect:.3g}, {self.max_aspect:.3g}])"
        )

    def _try_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> Block | None:
        """Up to ten tries at one rectangle adding between 1 and `budget` new patches (official rule)."""
        for _ in range(10):
            # Near the end the budget drops below min_num; the official (Python random.uniform) then
            # samples between the two all the same, so order the bounds for numpy.
            area = rng.uniform(min(self.min_num, budget), max(self.min_num, budget))
            aspect = math.exp(rng.uniform(*self._log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (w < self.width and h < self.height):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return Block(top, left, h, w, added)
        return None

    def _top_up(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        """Mask `missing` more patches, preferring unmasked 4-neighbours of the mask so blocks stay compact."""
        for _ in range(missing):
            grow = np.zeros_like(mask)
            grow[1:] |= mask[:-1]
            grow[:-1] |= mask[1:]
            grow[:, 1:] |= mask[:, :-1]
            grow[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grow & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[int(rng.choice(candidates))] = True

    def sample(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[Block]]:
        """One mask (H, W) bool and the blocks drawn for it (the top-up patches are not blocks)."""
        rng = self.rng if rng is None else rng
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masking:
            block = self._try_block(mask, min(self.num_masking - count, self.max_num), rng)
            if block is None:
                break
            blocks.append(block)
            count += block.added
        if count < self.num_masking:
            self._top_up(mask, self.num_masking - count, rng)
        return mask, blocks

    def __call__(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """One mask (H, W) bool with exactly `num_masking` True entries."""
        return self.sample(rng)[0]

    def batch(self, n: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """`n` independent masks as a (n, H*W) bool tensor, row-major like the patch tokens."""
        return torch.from_numpy(np.stack([self(rng).reshape(-1) for _ in range(n)]))
