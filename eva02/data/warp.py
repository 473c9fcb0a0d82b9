"""RandAugment's shears, translations and sharpness on uint8 (H, W, 3) tensors, with the geometry, edge, fill
and rounding rules of the PIL ops that torchvision runs for them on PIL images (`train_transforms.RandAugmentMstd`,
the reference):

- ShearX / ShearY: PIL's bicubic affine warp samples every output pixel on the input at
  (x + 0.5 + k (y + 0.5), y + 0.5) (ShearX; ShearY the same with the axes swapped). The vertical
  coordinate then falls on a pixel centre, where PIL's cubic weighs its own row by 1 and the others by 0, so the
  warp is a 1-D filter per row: 4 taps at one fractional offset per row, PIL's cubic (its coefficient
  a = -1, taps beyond the image clamped to the edge), values clipped to [0, 255] and truncated, pixels whose
  sampling point lies outside the image given the fill. Here in float32 (PIL: float64): equal to PIL's pixels
  but where a value lies within float32 rounding of an integer, a few pixels in a million, which are 1 off;
- TranslateX / TranslateY by an integer (torchvision truncates the magnitude): every sampling point is a
  pixel centre, so the bicubic warp copies pixels; here a slice copy, bit for bit PIL's;
- Sharpness: PIL's 3x3 SMOOTH filter and its blend, bit for bit.

Rotate stays with PIL: a true 2-D warp (16 taps per pixel, gathered per pixel), which numpy and torch
gather and combine no faster than PIL does. Buffers are reused per thread (`scratch`): on fresh memory the
page faults cost more than the arithmetic.
Tests: tests/test_fast_warp.py.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

_TAPS = 4  # PIL's cubic: taps at -1, 0, +1, +2 around the sampling point's floor
_EDGE = 2  # pixels of edge replication that the taps of sampling points inside the image can reach
_local = threading.local()  # scratch buffers, per thread


def shear_coefficient(op: str, magnitude: float) -> float:
    """The off-diagonal term of the inverse affine matrix torchvision gives PIL for RandAugment's `op`
    ('ShearX' or 'ShearY') at `magnitude` (the shear angle's tangent, passed through degrees as torchvision
    does): ShearX samples x + 0.5 + k (y + 0.5), ShearY samples y + 0.5 + k (x + 0.5)."""
    angle = math.radians(math.degrees(math.atan(magnitude)))
    if op == "ShearX":
        return math.tan(angle)
    if op == "ShearY":
        return -(math.sin(-angle) / math.cos(angle))
    raise ValueError(f"op {op!r} is not 'ShearX' or 'ShearY'")


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer of this thread (contents undefined): fresh memory costs a page fault per few KB on
    first touch, several times the cost of writing it, and these ops would otherwise take ~10 MB per call."""
    bufs = _local.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def padded(img: np.ndarray, axis: int, pad: int, fill: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) `img` grown by `pad` pixels on both sides of `axis` (0: rows, 1: columns), in a scratch
    buffer: the first `_EDGE` repeat the edge pixels (PIL's cubic clamps its taps to the image), the rest are
    `fill`. Written as whole rows of bytes (a pixel's C bytes broadcast is several times slower)."""
    h, w, c = img.shape
    shape = (h + 2 * pad, w, c) if axis == 0 else (h, w + 2 * pad, c)
    out = scratch("padded", shape, torch.uint8).numpy()
    rows, src = out.reshape(shape[0], -1), img.reshape(h, w * c)  # (rows, pixels * C)
    if axis == 0:
        rows[pad : pad + h] = src
        rows[: pad - _EDGE] = rows[pad + h + _EDGE :] = np.tile(fill, w)
        rows[pad - _EDGE : pad], rows[pad + h : pad + h + _EDGE] = src[:1], src[-1:]
    else:
        rows[:, pad * c : (pad + w) * c] = src
        rows[:, : (pad - _EDGE) * c] = rows[:, (pad + w + _EDGE) * c :] = np.tile(fill, pad - _EDGE)
        out[:, pad - _EDGE : pad], out[:, pad + w : pad + w + _EDGE] = img[:, :1], img[:, -1:]
    return out


def cubic(g: torch.Tensor, taps: list[tuple[slice, slice]], d: np.ndarray) -> torch.Tensor:
    """PIL's cubic interpolation of 4 taps, slices `taps` of the uint8 (lines, ...) tensor `g`, at fractional
    offsets `d` (float64, broadcastable to a tap), clipped to [0, 255] and truncated to uint8 as PIL does."""
    gf = scratch("taps", g.shape, torch.float32).copy_(g)
    v1, v2, v3, v4 = (gf[s] for s in taps)
    a, b, out = (scratch(n, v1.shape, torch.float32) for n in ("a", "b", "out"))
    # PIL: v2 + d (v3 - v1) + d^2 (2 (v1 - v2) + v3 - v4) - d^3 (v1 - v2 + v3 - v4), regrouped so that equal
    # taps give their value exactly (the fill and flat areas stay exact through the truncation)
    d2, d3 = d * d, d * d * d
    w1, w2, w3 = (torch.from_numpy(x.astype(np.float32)) for x in (d, 2 * d2 - d3, d2 - d3))
    torch.addcmul(v2, torch.sub(v3, v1, out=a), w1, out=out)
    out.addcmul_(torch.sub(v1, v2, out=a), w2).addcmul_(torch.sub(v3, v4, out=b), w3)
    u8 = torch.empty(out.shape, dtype=torch.uint8)
    np.copyto(u8.numpy(), out.clamp_(0, 255).numpy(), casting="unsafe")  # truncates; torch's cast is slower
    return u8


def shear(img: torch.Tensor, op: str, magnitude: float, fill: tuple[int, ...]) -> torch.Tensor:
    """RandAugment's bicubic `op` ('ShearX', 'ShearY') of uint8 (H, W, C) `img` at `magnitude`, as PIL warps
    it (module docstring); `fill` where the sampling point falls outside the image."""
    h, w, c = img.shape
    k = shear_coefficient(op, magnitude)
    axis = 1 if op == "ShearX" else 0  # the axis pixels move along: ShearX moves rows, ShearY columns
    lines, length = (h, w) if axis == 1 else (w, h)
    t = k * (np.arange(lines) + 0.5)  # (lines,) float64: sampling point - 0.5 = position + t
    shift = np.floor(t).astype(np.int64)
    pad = _EDGE + int(np.abs(shift).max()) + 2  # room for every line's taps
    fill_u8 = np.asarray(fill, np.uint8)
    flat = padded(img.numpy(), axis, pad, fill_u8).reshape(-1)
    if axis == 1:  # each row's taps are contiguous: a window per row
        span = (w + _TAPS - 1) * c
        starts = np.arange(h) * (w + 2 * pad) + pad + shift - 1  # pixel index of each row's first tap
        g = np.lib.stride_tricks.as_strided(flat, ((len(flat) - span) // c + 1, span), (c, 1))[starts]
        taps = [(slice(None), slice(i * c, (i + w) * c)) for i in range(_TAPS)]  # (H, W * C) each
        d = (t - shift)[:, None]  # (H, 1)
    else:  # each column's taps: one element per padded row, from the column's own first row
        row = w * c
        cols = (pad + np.repeat(shift, c) - 1) * row + np.arange(row)  # (W * C,)
        view = np.lib.stride_tricks.as_strided(flat, (h + _TAPS - 1, len(flat) - (h + _TAPS - 2) * row), (row, 1))
        g = view[:, cols]  # (H + 3, W * C)
        taps = [(slice(i, i + h), slice(None)) for i in range(_TAPS)]  # (H, W * C) each
        d = np.repeat(t - shift, c)[None, :]  # (1, W * C)
    out = cubic(torch.from_numpy(g), taps, d).view(h, w, c)
    # sampling points outside the image (position + 0.5 + t < 0 or >= length) whose taps reach into it: the
    # up to 4 next to each end of a line; those further out read only fill
    lo, hi = np.ceil(-0.5 - t).astype(np.int64), np.ceil(length - 0.5 - t).astype(np.int64)
    near = np.concatenate([lo[:, None] - np.arange(1, 5), hi[:, None] + np.arange(4)], axis=1)  # (lines, 8)
    line = np.broadcast_to(np.arange(lines)[:, None], near.shape)
    keep = (near >= 0) & (near < length)
    pos, line = near[keep], line[keep]
    o = out.numpy()
    if axis == 1:
        o[line, pos] = fill_u8
    else:
        o[pos, line] = fill_u8
    return out


def translate(img: torch.Tensor, dx: int, dy: int, fill: tuple[int, ...]) -> torch.Tensor:
    """uint8 (H, W, C) `img` moved by whole pixels (dx right, dy down), `fill` where nothing lands."""
    h, w, c = img.shape
    out = torch.tensor(fill, dtype=torch.uint8).repeat(w).expand(h, -1).clone().view(h, w, c)
    if abs(dx) < w and abs(dy) < h:
        out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[max(-dy, 0) : h - max(dy, 0),
                                                                            max(-dx, 0) : w - max(dx, 0)]  # fmt: skip
    return out


def sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's `ImageEnhance.Sharpness` of uint8 (H, W, C) `img` (RandAugment's Sharpness, factor 1 + magnitude),
    bit for bit: the image blended with its SMOOTH-filtered self (3x3 weights 1, centre 5, over 13, rounded;
    the border rows and columns kept), blend in float32 as PIL computes it, clipped, truncated."""
    h, w, c = img.shape
    f = scratch("sharp_img", (h, w * c), torch.float32)
    f.view(h, w, c).copy_(img)
    smooth = scratch("sharp_smooth", (h, w * c), torch.float32).copy_(f)
    if h >= 3 and w >= 3:
        rows = scratch("sharp_rows", (h, (w - 2) * c), torch.float32)
        torch.add(f[:, : -2 * c], f[:, c:-c], out=rows).add_(f[:, 2 * c :])  # 1x3 sums
        inner = smooth[1:-1, c:-c]
        torch.add(rows[:-2], rows[1:-1], out=inner).add_(rows[2:])  # 3x3 sums
        # (sum + 4 centre) / 13 is never within 1/26 of a half-integer: rounding it is exact in float32
        inner.add_(f[1:-1, c:-c], alpha=4).mul_(1 / 13).add_(0.5).floor_()
    alpha = torch.tensor(factor, dtype=torch.float32)  # PIL's blend takes a C float
    out = torch.sub(f, smooth, out=f).mul_(alpha).add_(smooth).clamp_(0, 255)  # smooth + alpha (img - smooth)
    u8 = torch.empty((h, w, c), dtype=torch.uint8)
    np.copyto(u8.numpy().reshape(h, w * c), out.numpy(), casting="unsafe")  # truncates, as PIL
    return u8
