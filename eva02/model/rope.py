"""2-D rotary position embedding of EVA-02 (official `EVA-02/asuka/rope.py`, VisionRotaryEmbeddingFast).

Each head of width W is split in two halves: the first rotates with the token's row, the second with
its column. Per axis there are W/4 frequencies f_i = theta^(-i / (W/4)), each used for one interleaved
pair of channels. Positions of a grid of S rows are t = arange(S) / S * ref_grid, so a fine-tuning grid
(24 or 32) spans the same range as the 16x16 pre-training grid ("interpolated" RoPE).

The tables cover the class token too, with an identity rotation (cos 1, sin 0), so q and k of every
token are rotated in one step without slicing or concatenation; x * 1 + y * 0 == x exactly, so the
class token is untouched bit for bit.

`apply_rope` is the rotation as the reference layers (`layers.py`) compute it, in real arithmetic, which
torch.compile and ONNX export also take (neither has complex kernels). The fast forms (`fast.py`) rotate
in place with one complex product per pair (`rope_complex`, `rotate_pairs_`, and `rotate_pairs_widened_`
for half precision).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def axis_angles(size: int, quarter: int, ref_grid: int, theta: float) -> torch.Tensor:
    """Angles (size, 2*quarter) of one axis: position x frequency, each frequency repeated for its pair."""
    freqs = theta ** -(torch.arange(0, quarter, dtype=torch.float64) / quarter)  # (quarter,)
    t = torch.arange(size, dtype=torch.float64) / size * ref_grid  # (size,)
    return torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # (size, 2*quarter)


def rope_angles(grid: tuple[int, int], head_dim: int, ref_grid: int, theta: float) -> torch.Tensor:
    """Angles (H*W, head_dim) for a row-major patch grid: rows in the first half, columns in the second."""
    gh, gw = grid
    quarter = head_dim // 4
    rows = axis_angles(gh, quarter, ref_grid, theta)  # (gh, head_dim/2)
    cols = axis_angles(gw, quarter, ref_grid, theta)  # (gw, head_dim/2)
    ang = torch.cat(
        [rows[:, None, :].expand(gh, gw, -1), cols[None, :, :].expand(gh, gw, -1)], dim=-1
    )  # (gh, gw, head_dim)
    return ang.reshape(gh * gw, head_dim)


def rope_tables(
    grid: tuple[int, int],
    head_dim: int,
    ref_grid: int = 16,
    theta: float = 10000.0,
    num_prefix: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin tables (num_prefix + H*W, head_dim) for `apply_rope`.

    The sin table carries the sign of the pair rotation: rotating the pair (a, b) by angle t gives
    (a cos t - b sin t, b cos t + a sin t) = x * cos + swap(x) * (-sin, +sin).
    """
    ang = rope_angles(grid, head_dim, ref_grid, theta)  # (N, hd) float64
    cos, sin = ang.cos(), ang.sin()
    sin[:, 0::2] = -sin[:, 0::2]
    if num_prefix:
        cos = torch.cat([torch.ones(num_prefix, head_dim, dtype=cos.dtype), cos])
        sin = torch.cat([torch.zeros(num_prefix, head_dim, dtype=sin.dtype), sin])
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a0, b0, a1, b1, ...) -> (b0, a0, b1, a1, ...) along the last dim."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, hd) with tables (T, hd) from `rope_tables`; result in x's dtype."""
    return (x * cos + swap_pairs(x) * sin).to(x.dtype)


class RopeTables(NamedTuple):
    """Per-grid RoPE tables, built once and shared by every block: the real form (reference, compilers)
    and its complex twin (the eager fast forms)."""

    cos: torch.Tensor  # (T, hd)
    sin: torch.Tensor  # (T, hd), sign-folded (see `rope_tables`)
    rot: torch.Tensor | None  # (T, hd/2) complex, from `rope_complex`; None in compiled graphs


def rope_complex(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tables of `rope_tables` as unit complex numbers (T, hd/2): cos t + i sin t, one per channel pair."""
    return torch.complex(cos[..., 0::2], sin[..., 1::2])  # the odd columns of `sin` carry +sin t


def rotate_pairs_(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hd) in place by `rot` (broadcastable to (..., hd/2)) from `rope_complex`; returns x.

    Each interleaved pair (a, b) is the complex number a + ib, so the pair rotation of `apply_rope` is one
    complex product: no temporaries, one pass over x, and x may be a strided view (e.g. the q and k
    columns of a fused qkv output). The class token's entry 1 + 0i leaves it unchanged bit for bit.
    """
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rot)
    return x


def rotate_pairs_widened_(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """`rotate_pairs_` for half-precision x (bfloat16 has no complex dtype): x is widened to fp32 once,
    rotated there in place by one complex product, and written back in place; returns x.

    Three passes and one fp32 temporary, where the real form (`apply_rope` with fp32 tables) takes
    about six passes and four fp32 temporaries; the product is taken in fp32 in both, then rounded once.
    (A float64 x is rotated through a float64 copy, so tests can check this form in float64.)
    """
    wide = x.to(torch.promote_types(x.dtype, torch.float32), memory_format=torch.contiguous_format, copy=True)
    rotate_pairs_(wide, rot)
    return x.copy_(wide)


def rotate_half_reference(x: torch.Tensor) -> torch.Tensor:
    """The official pairwise rotate_half, kept for tests: (a, b) -> (-b, a) per interleaved pair."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)
