"""Building blocks of EVA-02: patch embedding, RoPE attention, SwiGLU MLP, pre-LN block.

Mirrors the official `EVA-02/asuka/modeling_finetune.py` (Attention, SwiGLU, Block) in one parameter
layout for every size: a fused `qkv` weight with separate q and v biases (k has no bias), and a packed
`w12` = [gate; value] SwiGLU input projection. The sub-LN of base/large sits between the gated product
and `w3`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from eva02.model.rope import RopeTables, apply_rope, rope_complex, rotate_pairs_, rotate_pairs_widened_


def traced() -> bool:
    """True under torch.compile / torch.export / jit tracing, where in-place and complex tricks do not pay."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def complex_graph() -> bool:
    """True while tracing a program that will run on PyTorch's own kernels (a torch.export program, a
    TorchScript trace), which can keep complex products; torch.compile (inductor generates no complex
    code) and ONNX export (no complex type) take real arithmetic."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()) and not torch.onnx.is_in_onnx_export()


class Workspace:
    """One output buffer shared by the blocks of one inference forward on CPU.

    The two widest linear outputs of a block (qkv: 3D columns, SwiGLU's w12: 2H) are consumed inside
    the block, and never both at once: attention has finished with qkv before w12 is computed, and the
    MLP with w12 before the next block's qkv. So every block writes both into one buffer. Fresh tensors
    of that size would be new pages from the C allocator each time, each one faulted in by the bias
    copy that precedes the GEMM, and cold in cache. Peak memory is unchanged (the buffer is as large as
    the larger output, which a plain forward also holds). One workspace lives for one forward call
    (see `Eva02.forward_tokens`), so nothing is shared between threads or calls, and it is only used
    where autograd records nothing (outputs written in place are never saved).
    """

    def __init__(self, numel: int = 0) -> None:
        self._buf: torch.Tensor | None = None
        self._numel = numel  # capacity to allocate on first use, so that it is allocated once

    @staticmethod
    def usable(x: torch.Tensor) -> bool:
        """Whether a forward on `x` may write linear outputs into reused buffers."""
        return (
            x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not traced()
            and not torch.is_autocast_enabled("cpu")
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight, bias)` written into the shared buffer (valid until the next call)."""
        rows = x.numel() // x.shape[-1]
        n = rows * weight.shape[0]
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != x.dtype:
            buf = self._buf = torch.empty(max(n, self._numel), dtype=x.dtype, device=x.device)
        out = buf[:n].view(rows, weight.shape[0])
        torch.addmm(bias, x.reshape(rows, x.shape[-1]), weight.t(), out=out)
        return out.view(*x.shape[:-1], weight.shape[0])


def _has_complex(x: torch.Tensor) -> bool:
    """Whether x's dtype has a complex counterpart (half precision has none: RoPE goes through fp32)."""
    return x.dtype in (torch.float32, torch.float64)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """x (..., hd) as hd/2 complex numbers (a + ib per interleaved pair); a view, no copy."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


class _RotateSplit(torch.autograd.Function):
    """Training form of RoPE: qkv (B, T, 3, h, hd) -> q, k rotated and v, each (B, h, T, hd).

    The three outputs lie in one new (3, B, T, h, hd) buffer, each dense, written by one complex product
    (q and k) and one copy (v); attention then returns its output laid out (B, T, h, hd), so merging the
    heads is a view, not one more saved copy. The backward writes the three gradients straight into one
    (B, T, 3, h, hd) gradient of qkv: no zero-filled full-size gradients per view, no stacking, and none
    of the copies of the whole gradient that autograd makes for an in-place rotation of a view.
    In half precision (bf16 autocast) the complex products are taken on fp32 copies of q and k (and
    of their gradients), rounded once into the half-precision buffers.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _, h, hd = qkv.shape
        out = qkv.new_empty(3, B, T, h, hd)
        dst = out.permute(1, 2, 0, 3, 4)  # (B, T, 3, h, hd) view
        if _has_complex(qkv):
            torch.mul(_pairs(qkv[:, :, :2]), rot[:, None], out=_pairs(dst[:, :, :2]))  # rot: (T, 1, hd/2)
        else:  # half precision has no complex dtype: the product in fp32, rounded once into the output
            dst[:, :, :2].copy_(rotate_pairs_(qkv[:, :, :2].float(), rot[:, None]))
        dst[:, :, 2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(rot)
        ctx.shape, ctx.dtype = qkv.shape, qkv.dtype
        return out[0].transpose(1, 2), out[1].transpose(1, 2), out[2].transpose(1, 2)

    @staticmethod
    @once_differentiable  # the backward writes into buffers: no graph of it for higher-order gradients
    def backward(ctx, gq: torch.Tensor | None, gk: torch.Tensor | None, gv: torch.Tensor | None):
        (rot,) = ctx.saved_tensors
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=rot.device)  # (B, T, 3, h, hd)
        back = rot.conj()  # a rotation's transpose is the opposite rotation
        for i, g in enumerate((gq, gk, gv)):
            dst = grad[:, :, i]  # (B, T, h, hd)
            if g is None:
                dst.zero_()
                continue
            g = g.transpose(1, 2)  # attention returns gradients laid out as its inputs: dense here
            if i == 2:
                dst.copy_(g)
            elif not _has_complex(g):  # half precision: through fp32, as forward
                dst.copy_(rotate_pairs_(g.float().contiguous(), back))
            else:
                if g.stride(-1) != 1 or any(st % 2 for st in g.stride()[:-1]):
                    g = g.contiguous()
                torch.mul(_pairs(g), back, out=_pairs(dst))
        return grad, None


class _SiluGate(torch.autograd.Function):
    """Training form of the SwiGLU gate: x12 (..., 2H) = [gate, value] -> silu(gate) * value (..., H).

    Saves only x12 (which the w12 output is anyway) and recomputes silu(gate) in backward, so a block
    keeps one (..., H) tensor less than autograd would; both input gradients are written into one
    (..., 2H) tensor, so the split of x12 costs no concatenation of gradients in backward.
    """

    @staticmethod
    def forward(ctx, x12: torch.Tensor) -> torch.Tensor:
        gate, value = x12.chunk(2, dim=-1)
        ctx.save_for_backward(x12)
        return F.silu(gate).mul_(value)  # the product lands in silu's fresh output

    @staticmethod
    @once_differentiable
    def backward(ctx, gh: torch.Tensor) -> torch.Tensor:
        (x12,) = ctx.saved_tensors
        gate, value = x12.chunk(2, dim=-1)
        grad = torch.empty_like(x12)
        g_gate, g_value = grad.chunk(2, dim=-1)
        torch.mul(gh, F.silu(gate, inplace=False), out=g_value)
        torch.mul(gh, value, out=g_gate)
        torch.ops.aten.silu_backward.grad_input(g_gate, gate, grad_input=g_gate)  # element-wise, in place
        return grad


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
    """Multi-head self-attention with q/v bias, no k bias, and RoPE on q and k."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        # Zero k bias as a buffer so the fused bias is one cat of existing tensors, not a new allocation
        # of zeros per call; non-persistent, so it is neither a parameter nor a checkpoint key.
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.separate_projections = False  # see `Attention.forward`; set by `eva02.export` for ONNX

    def _separate(self, x: torch.Tensor, rope: RopeTables | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, h, T, hd) from three products on slices of the fused weight (real-form RoPE)."""
        B, T, D = x.shape
        w, x = self.qkv.weight, x.reshape(B * T, D)  # 2-D products: one Gemm each, bias included
        q, k, v = (
            F.linear(x, w[:D], self.q_bias),
            F.linear(x, w[D : 2 * D]),  # the k bias is zero
            F.linear(x, w[2 * D :], self.v_bias),
        )
        q, k, v = (t.view(B, T, self.heads, self.head_dim) for t in (q, k, v))
        if rope is not None:
            cos, sin = rope.cos[:, None, :], rope.sin[:, None, :]  # (T, 1, hd)
            # The pair swap of the real form as a product with a permutation matrix: exact (one term
            # per output, times 1), and one GEMM in graph runtimes, where `flip` is a strided copy.
            hd = self.head_dim
            swap = torch.eye(hd, dtype=q.dtype, device=q.device).view(hd // 2, 2, hd).flip(1).reshape(hd, hd)
            q, k = ((t * cos + (t @ swap) * sin).to(t.dtype) for t in (q, k))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: RopeTables | None, ws: Workspace | None = None) -> torch.Tensor:
        B, T, D = x.shape
        if self.separate_projections and traced():
            # For graph runtimes without views (ONNX): slicing the fused qkv output, splitting it and
            # permuting heads are copies there; three products on weight slices (constants, folded at
            # export) write q, k and v directly. Same numbers; eager and compiled PyTorch keep the fused form.
            q, k, v = self._separate(x, rope)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(B * T, D)).view(B, T, D)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias) if ws is None else ws.linear(x, self.qkv.weight, bias)
        qkv = qkv.view(B, T, 3, self.heads, self.head_dim)  # (B, T, 3, h, hd)
        half = not _has_complex(qkv)
        if rope is not None and traced():
            if complex_graph() and not half:
                # Programs that run on PyTorch's kernels: one out-of-place complex product for q and k.
                rot = rope.rot if rope.rot is not None else rope_complex(rope.cos, rope.sin)
                qk = torch.view_as_real(_pairs(qkv[:, :, :2]) * rot[:, None, None, :]).flatten(-2)
            else:
                # Real arithmetic for torch.compile (inductor has no complex code; it fuses this into one
                # kernel), ONNX (no complex type) and half precision.
                qk = apply_rope(qkv[:, :, :2], rope.cos[:, None, None, :], rope.sin[:, None, None, :])
            q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # (B, h, T, hd)
            v = qkv[:, :, 2].transpose(1, 2)
        elif rope is not None and qkv.requires_grad:  # autograd records: training form
            q, k, v = _RotateSplit.apply(qkv, rope.rot[:, None, :])  # (B, h, T, hd) each
        else:
            if rope is not None:
                # Eager inference: rotate q and k where they lie in the qkv output, no copies of q and k
                # (half precision: through one fp32 temporary, the product taken in fp32 as in training).
                rotate = rotate_pairs_widened_ if half else rotate_pairs_
                rotate(qkv[:, :, :2], rope.rot[:, None, None, :])
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, h, T, hd) views
        # SDPA reads the (B, h, T, hd) views through their strides, so the heads are never permuted into
        # a copy; its output is laid out (B, T, h, hd) like q, so the merge of heads below is a view.
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """h = silu(x W1) * (x W2), with W1 and W2 packed in `w12`; optional sub-LN on h; out = h W3."""

    def __init__(self, dim: int, hidden: int, sub_ln: bool, eps: float) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps) if sub_ln else nn.Identity()
        self.w3 = nn.Linear(hidden, dim)
        self.separate_projections = False  # ONNX export: gate and value from two products (no Split)

    def forward(self, x: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
        if self.separate_projections and traced():
            H, shape = self.w12.weight.shape[0] // 2, x.shape
            w, b, x = self.w12.weight, self.w12.bias, x.reshape(-1, shape[-1])  # 2-D: Gemm with its bias
            h = self.norm(F.silu(F.linear(x, w[:H], b[:H])) * F.linear(x, w[H:], b[H:]))
            return self.w3(h).view(shape)
        x = self.w12(x) if ws is None else ws.linear(x, self.w12.weight, self.w12.bias)
        if x.requires_grad and not traced():
            return self.w3(self.norm(_SiluGate.apply(x)))
        gate, value = x.chunk(2, dim=-1)  # (B, T, H) views of one (B, T, 2H) output
        if traced():
            h = F.silu(gate) * value
        elif isinstance(self.norm, nn.Identity):  # no autograd: gate in place inside w12's output
            h = F.silu(gate, inplace=True).mul_(value)  # w3 reads the strided half without a copy
        else:  # the sub-LN needs a dense input: the product writes one instead of LayerNorm copying
            h = F.silu(gate, inplace=True) * value
        return self.w3(self.norm(h))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, sub_ln: bool, eps: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, hidden, sub_ln, eps)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, rope: RopeTables | None, ws: Workspace | None = None) -> torch.Tensor:
        # Without autograd the residual sum lands in the branch output (fresh) rather than in a new
        # tensor. With autograd it is a new tensor: the branch output of a linear on (B, T, D) is a view of
        # a 2-D product, and an in-place sum on a view makes autograd copy and zero-fill whole gradients
        # in backward. x itself is never modified, so callers may keep it. `ws`: see Workspace.
        fresh = not torch.is_grad_enabled()
        y = drop_path(self.attn(self.norm1(x), rope, ws), self.drop_path, self.training)
        x = y.add_(x) if fresh else x + y
        y = drop_path(self.mlp(self.norm2(x), ws), self.drop_path, self.training)
        return y.add_(x) if fresh else x + y
