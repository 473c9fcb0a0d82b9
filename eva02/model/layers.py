"""The reference EVA-02 layers: patch embedding, RoPE attention, SwiGLU MLP, pre-LN block.

Mirrors the official `EVA-02/asuka/modeling_finetune.py` (Attention, SwiGLU, Block) in one parameter
layout for every size: a fused `qkv` weight with separate q and v biases (k has no bias), and a packed
`w12` = [gate; value] SwiGLU input projection. The sub-LN of base/large sits between the gated product
and `w3`.

Each forward here states the maths once, for reading. The model runs faster forms of the same
computation (RoPE in place, hand-written backwards, reused buffers), which live in `fast.py`: one of
them is chosen once per model call (`fast.choose`) and handed to every `Block` as `path`. Tests run
every form against these forwards in float64, outputs and gradients (`tests/test_fast_paths.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from eva02.model.rope import RopeTables, apply_rope


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens, row-major."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with q/v bias, no k bias, and RoPE on q and k.

    `inner_norm`: a LayerNorm on the heads' merged output before the projection (the EVA-02-CLIP B/L
    towers; `inner_attn_ln` in BAAI's code, `scale_attn_inner` in timm's).
    """

    def __init__(self, dim: int, heads: int, inner_norm: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        # Zero k bias as a buffer so the fused bias is one cat of existing tensors, not a new allocation
        # of zeros per call; non-persistent, so it is neither a parameter nor a checkpoint key.
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.norm = nn.LayerNorm(dim, eps=eps) if inner_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTables | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `mask` (B, 1, 1, T) bool: the keys each sequence may attend to (None: all)."""
        B, T, D = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))  # (3D,)
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, hd) each
        if rope is not None:  # rotate by position (rope.py); the class token's table entry is the identity
            q = apply_rope(q, rope.cos, rope.sin)  # (B, h, T, hd)
            k = apply_rope(k, rope.cos, rope.sin)  # (B, h, T, hd)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, hd), softmax(q k^T / sqrt(hd)) v
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D): the heads side by side
        return self.proj(self.norm(x))  # (B, T, D); norm: CLIP B/L's inner LayerNorm, else the identity


class SwiGLU(nn.Module):
    """h = silu(x W1) * (x W2), with W1 and W2 packed in `w12`; optional sub-LN on h; out = h W3."""

    def __init__(self, dim: int, hidden: int, sub_ln: bool, eps: float) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps) if sub_ln else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # (B, T, H) each; the gate is the first half
        h = F.silu(gate) * value  # (B, T, H)
        return self.w3(self.norm(h))  # (B, T, D); norm: the sub-LN of base/large, else the identity


class Mlp(nn.Module):
    """The plain transformer MLP of the EVA-02-CLIP-E towers: fc_out(gelu(fc_in(x))).

    (Named apart from timm's `fc1`/`fc2`, which in timm's EVA-02 Ti/S files hold the packed SwiGLU:
    the key names alone then tell our files from theirs.)
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # (B, T, H) inside, (B, T, D) out; exact (erf) GELU


class Windows:
    """Non-overlapping size x size windows over a (H, W) grid of tokens (ViTDet's window attention).

    `split` lays the tokens (B, H*W, D) out as (B * nW, size*size, D), zero-padding the grid to whole
    windows; `merge` undoes it and drops the padding. With `mask_padding`, `mask` (B * nW, 1, 1, size^2)
    keeps the padded keys out of every softmax, so padding never reaches a real token (ViTDet lets the
    padded keys in; both agree when the grid divides by the window size, where `mask` is None).
    """

    def __init__(self, grid: tuple[int, int], size: int, batch: int, mask_padding: bool, device) -> None:
        H, W = grid
        self.grid, self.size = grid, size
        self.rows, self.cols = -(-H // size), -(-W // size)  # windows per column and per row
        self.mask = None
        if mask_padding and (H % size or W % size):
            real = torch.zeros(self.rows * size, self.cols * size, dtype=torch.bool, device=device)
            real[:H, :W] = True
            keys = real.view(self.rows, size, self.cols, size).transpose(1, 2).reshape(-1, size * size)  # (nW, s^2)
            self.mask = keys.repeat(batch, 1)[:, None, None, :]  # (B * nW, 1, 1, s^2)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, _, D = x.shape
        (H, W), s = self.grid, self.size
        x = x.view(B, H, W, D)
        x = F.pad(x, (0, 0, 0, self.cols * s - W, 0, self.rows * s - H))  # (B, rows*s, cols*s, D), zeros
        x = x.view(B, self.rows, s, self.cols, s, D).transpose(2, 3)  # (B, rows, cols, s, s, D)
        return x.reshape(B * self.rows * self.cols, s * s, D)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        (H, W), s = self.grid, self.size
        x = x.view(-1, self.rows, self.cols, s, s, D).transpose(2, 3)  # (B, rows, s, cols, s, D)
        x = x.reshape(-1, self.rows * s, self.cols * s, D)[:, :H, :W]  # padding dropped
        return x.reshape(-1, H * W, D)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    With `post_norm` (EVA-02-CLIP-E) the norms move onto the branch outputs: x + norm1(attn(x)).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        sub_ln: bool,
        eps: float,
        drop_path: float,
        attn_norm: bool = False,
        mlp: str = "swiglu",
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, attn_norm, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, hidden, sub_ln, eps) if mlp == "swiglu" else Mlp(dim, hidden)
        self.drop_path = drop_path
        self.post_norm = post_norm

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeTables | None,
        path: Callable[..., torch.Tensor] | None = None,
        windows: Windows | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). `path`: a faster form of this same forward, chosen by `fast.choose`
        for the whole model call; it is passed in rather than called from outside so that what wraps a
        block (gradient checkpointing, FSDP, hooks) wraps it too. `windows`: attend within windows
        (then `rope` holds the tables of one window)."""
        if path is not None:
            return path(self, x, rope, windows)
        if windows is not None:  # dense backbones: attention within windows, the rest per token
            h = self.attn(windows.split(self.norm1(x)), rope, windows.mask)  # (B * nW, s*s, D)
            x = x + drop_path(windows.merge(h), self.drop_path, self.training)  # (B, T, D)
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        if self.post_norm:
            x = x + drop_path(self.norm1(self.attn(x, rope)), self.drop_path, self.training)  # (B, T, D)
            x = x + drop_path(self.norm2(self.mlp(x)), self.drop_path, self.training)  # (B, T, D)
            return x
        x = x + drop_path(self.attn(self.norm1(x), rope), self.drop_path, self.training)  # (B, T, D)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)  # (B, T, D)
        return x
