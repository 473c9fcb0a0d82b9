"""Fast forms of the EVA-02 block, beside the reference in `layers.py`, and the one place that picks them.

`choose` runs once per model call (`Eva02.forward_tokens`) and returns the form that every block of
that call runs (`layers.Block.forward(x, rope, path)`):

- `Inference`: eager, autograd records nothing. RoPE rotates q and k in place where they lie in the
  qkv output (one complex product per channel pair), SDPA reads q, k, v as strided views, the SwiGLU
  gate is computed in place in w12's output, residual sums land in the fresh branch outputs, and on
  CPU the qkv and w12 outputs of all blocks share one buffer (`Workspace`), w12's product taken in
  cache-sized column chunks where the hidden layer is wide.
- `Training`: eager, autograd records. RoPE with the q/k/v split (`RotateSplit`) and the SwiGLU gate
  (`SiluGate`) are autograd functions whose backwards write one gradient each and save less.
- `Traced`: torch.compile, torch.export, jit tracing. Out-of-place code the compiler fuses; RoPE as
  one complex product in programs that run on PyTorch's kernels, in real arithmetic for inductor (no
  complex code generation), ONNX (no complex type) and half precision.

Half precision (bf16/fp16 weights or autocast) has no complex dtype: RoPE's product is then taken on a
widened copy (`widen=True`), decided in the same place. Every form computes the reference's numbers;
`tests/test_fast_paths.py` runs each against `layers.py` in float64, outputs and gradients.

`use(path)` makes every model call inside a `with` block take one given form (None: the reference
layers): exports use it for their own graph layout (`eva02.export.separate_projections`), tests to pin
a form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from eva02.model.layers import Attention, Block, SwiGLU, Windows, drop_path
from eva02.model.rope import RopeTables, apply_rope, rope_complex, rotate_pairs_, rotate_pairs_widened_


def traced() -> bool:
    """True under torch.compile / torch.export / jit tracing, where in-place and complex tricks do not pay."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def complex_graph() -> bool:
    """True while tracing a program that will run on PyTorch's own kernels (a torch.export program, a
    TorchScript trace), which can keep complex products; torch.compile (inductor generates no complex
    code) and ONNX export (no complex type) take real arithmetic."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()) and not torch.onnx.is_in_onnx_export()


def low_precision(x: torch.Tensor) -> bool:
    """Whether the blocks' products on `x` come out in half precision (its dtype, or autocast's)."""
    dtype, dev = x.dtype, x.device.type
    if dtype == torch.float32 and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    return dtype in (torch.float16, torch.bfloat16)


class Workspace:
    """One output buffer shared by the blocks of one inference forward on CPU.

    The two widest linear outputs of a block (qkv: 3D columns, SwiGLU's w12: 2H) are consumed inside
    the block, and never both at once: attention has finished with qkv before w12 is computed, and the
    MLP with w12 before the next block's qkv. So every block writes both into one buffer. Fresh tensors
    of that size would be new pages from the C allocator each time, each one faulted in by the bias
    copy that precedes the GEMM, and cold in cache. Peak memory is unchanged (the buffer is as large as
    the larger output, which a plain forward also holds). One workspace lives for one forward call
    (see `choose`), so nothing is shared between threads or calls, and it is only used where autograd
    records nothing (outputs written in place are never saved).

    Where SwiGLU's w12 is large (`chunks`), its product is computed in column chunks (`gated`): each
    chunk's gate and value GEMMs write into the buffer, the gate is applied while they are still in
    cache, and the product lands in its columns of the hidden activations. Chunks are about 256 columns
    per thread, so each thread's share of a chunk's weights fits its L2 cache. Measured on a 2-core
    AVX2 machine with 1 MiB of L2 per core (`benchmarks/mlp_chunks.py`, BENCHMARKS.md): with 2 threads
    the base and large MLPs run 1.09-1.18x faster at 197-1025 tokens and 1.01x at 2050, small's
    0.99-1.07x; with 1 thread chunks and one product are within 2% of each other.
    """

    def __init__(self, numel: int = 0, gate_columns: int | None = None, chunked_bytes: int | None = None) -> None:
        self._buf: torch.Tensor | None = None
        self._numel = numel  # capacity to allocate on first use, so that it is allocated once
        self.gate_columns = gate_columns or GATE_COLUMNS_PER_THREAD * torch.get_num_threads()
        self.chunked_bytes = CHUNKED_W12_BYTES if chunked_bytes is None else chunked_bytes

    def chunks(self, w12: nn.Linear) -> bool:
        """Whether `gated` computes this w12: wider than one chunk, with weights too large for the
        caches (the small, base and large layouts; tiny's 0.75 MiB w12 fits, and chunks measured up
        to 7% slower there)."""
        nbytes = w12.weight.numel() * w12.weight.element_size()
        return w12.out_features // 2 > self.gate_columns and nbytes >= self.chunked_bytes

    @staticmethod
    def usable(x: torch.Tensor) -> bool:
        """Whether a forward on `x` may write linear outputs into reused buffers."""
        return (
            x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not traced()
            and not torch.is_autocast_enabled("cpu")
        )

    def _buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """The shared buffer's first n elements (flat), grown if needed."""
        buf = self._buf
        if buf is None or buf.numel() < n or buf.dtype != like.dtype:
            buf = self._buf = torch.empty(max(n, self._numel), dtype=like.dtype, device=like.device)
        return buf[:n]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`F.linear(x, weight, bias)` written into the shared buffer (valid until the next call)."""
        rows = x.numel() // x.shape[-1]
        out = self._buffer(rows * weight.shape[0], x).view(rows, weight.shape[0])
        torch.addmm(bias, x.reshape(rows, x.shape[-1]), weight.t(), out=out)
        return out.view(*x.shape[:-1], weight.shape[0])

    def gated(self, x: torch.Tensor, w12: nn.Linear) -> torch.Tensor:
        """SwiGLU's silu(x W1 + b1) * (x W2 + b2) from the packed `w12` ([W1; W2]), computed in chunks
        of `gate_columns` hidden columns: (..., D) -> a fresh, dense (..., H)."""
        H = w12.out_features // 2
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(rows, x.shape[-1])
        # Chunks of about equal width (a multiple of 8 floats) rather than full ones and a narrow rest:
        # large's 2730 columns go as 5 x 456 + 450, not 5 x 512 + 170.
        width = -(-H // -(-H // self.gate_columns))  # H over the number of chunks, rounded up
        c = min(H, -(-width // 8) * 8)
        buf = self._buffer(2 * rows * c, x)
        gates, values = buf[: rows * c], buf[rows * c :]
        weight, bias = w12.weight, w12.bias
        h = x.new_empty(rows, H)
        for j in range(0, H, c):
            n = min(c, H - j)
            gate = torch.addmm(bias[j : j + n], x2, weight[j : j + n].t(), out=gates[: rows * n].view(rows, n))
            cols = slice(H + j, H + j + n)
            value = torch.addmm(bias[cols], x2, weight[cols].t(), out=values[: rows * n].view(rows, n))
            torch.mul(F.silu(gate, inplace=True), value, out=h[:, j : j + n])
        return h.view(*x.shape[:-1], H)


# Hidden columns per thread in one chunk of `Workspace.gated` (tuned on 2 cores with 1 MiB L2 each),
# and the w12 size from which it is used (fp32: small 3 MiB, base 12 MiB, large 21 MiB; tiny 0.75 MiB).
GATE_COLUMNS_PER_THREAD = 256
CHUNKED_W12_BYTES = 2 << 20


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """x (..., hd) as hd/2 complex numbers (a + ib per interleaved pair); a view, no copy."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def _widened(x: torch.Tensor) -> torch.Tensor:
    """A dense copy of x in at least fp32, where half precision takes RoPE's complex product."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return x.to(wide, memory_format=torch.contiguous_format, copy=True)


class RotateSplit(torch.autograd.Function):
    """Training form of RoPE: qkv (B, T, 3, h, hd) -> q, k rotated and v, each (B, h, T, hd).

    The three outputs lie in one new (3, B, T, h, hd) buffer, each dense, written by one complex product
    (q and k) and one copy (v); attention then returns its output laid out (B, T, h, hd), so merging the
    heads is a view, not one more saved copy. The backward writes the three gradients straight into one
    (B, T, 3, h, hd) gradient of qkv: no zero-filled full-size gradients per view, no stacking, and none
    of the copies of the whole gradient that autograd makes for an in-place rotation of a view.
    With `widen` (half precision, which has no complex dtype) the products are taken on fp32 copies of
    q and k (and of their gradients), rounded once into the half-precision buffers.
    Call: `RotateSplit.apply(qkv, rot, widen)`, rot (T, 1, hd/2) from `rope.rope_complex`.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rot: torch.Tensor, widen: bool) -> tuple[torch.Tensor, ...]:
        B, T, _, h, hd = qkv.shape
        out = qkv.new_empty(3, B, T, h, hd)
        dst = out.permute(1, 2, 0, 3, 4)  # (B, T, 3, h, hd) view
        if widen:  # the product in fp32, rounded once into the output
            dst[:, :, :2].copy_(rotate_pairs_(_widened(qkv[:, :, :2]), rot[:, None]))
        else:
            torch.mul(_pairs(qkv[:, :, :2]), rot[:, None], out=_pairs(dst[:, :, :2]))
        dst[:, :, 2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(rot)
        ctx.shape, ctx.dtype, ctx.widen = qkv.shape, qkv.dtype, widen
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
            elif ctx.widen:  # as forward: through fp32
                dst.copy_(rotate_pairs_(_widened(g), back))
            else:
                if g.stride(-1) != 1 or any(st % 2 for st in g.stride()[:-1]):
                    g = g.contiguous()
                torch.mul(_pairs(g), back, out=_pairs(dst))
        return grad, None, None


class SiluGate(torch.autograd.Function):
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


# ------------------------------------------------------------------------------------- block forms
class BlockPath:
    """A form of `layers.Block.forward`: the same pre-LN residual structure, with the attention and MLP
    forms (and the residual sum) that subclasses define."""

    def attention(self, attn: Attention, x: torch.Tensor, rope: RopeTables, mask=None) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + y for the stream x and a branch output y."""
        return x + y

    def __call__(self, blk: Block, x: torch.Tensor, rope: RopeTables, windows: Windows | None = None) -> torch.Tensor:
        if windows is None:
            y = self.attention(blk.attn, blk.norm1(x), rope)
        else:  # within windows, as `layers.Block.forward`
            y = windows.merge(self.attention(blk.attn, windows.split(blk.norm1(x)), rope, windows.mask))
        x = self.residual(x, drop_path(y, blk.drop_path, blk.training))
        y = drop_path(self.mlp(blk.mlp, blk.norm2(x)), blk.drop_path, blk.training)
        return self.residual(x, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _qkv(attn: Attention, x: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
    """The fused q/k/v product with its bias (k's is zero): (B, T, D) -> (B, T, 3, h, hd)."""
    B, T, _ = x.shape
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias) if ws is None else ws.linear(x, attn.qkv.weight, bias)
    return qkv.view(B, T, 3, attn.heads, attn.head_dim)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """SDPA on (B, h, T, hd) q, k, v (keys limited by `mask`), heads merged, (inner norm), output
    projection -> (B, T, D)."""
    B, _, T, _ = q.shape
    # SDPA reads strided (B, h, T, hd) views without permuting the heads into a copy, and lays its
    # output out (B, T, h, hd) like q, so the merge of heads below is a view.
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(attn.norm(x.transpose(1, 2).reshape(B, T, -1)))


class Inference(BlockPath):
    """Eager forward without autograd: RoPE and the SwiGLU gate in place, residual sums in the fresh
    branch outputs, and (`ws`, CPU) the qkv and w12 outputs of every block in one shared buffer."""

    def __init__(self, widen: bool = False, ws: Workspace | None = None) -> None:
        self.widen = widen  # half precision: RoPE through one fp32 temporary (rope.rotate_pairs_widened_)
        self.ws = ws

    def attention(self, attn: Attention, x: torch.Tensor, rope: RopeTables, mask=None) -> torch.Tensor:
        qkv = _qkv(attn, x, self.ws)  # (B, T, 3, h, hd)
        # q and k rotated where they lie in the qkv output: no copies of them.
        rotate = rotate_pairs_widened_ if self.widen else rotate_pairs_
        rotate(qkv[:, :, :2], rope.rot[:, None, None, :])
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, h, T, hd) views
        return _attend(attn, q, k, v, mask)

    def mlp(self, mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
        if self.ws is not None and self.ws.chunks(mlp.w12):
            return mlp.w3(mlp.norm(self.ws.gated(x, mlp.w12)))  # in column chunks (Workspace)
        x12 = mlp.w12(x) if self.ws is None else self.ws.linear(x, mlp.w12.weight, mlp.w12.bias)
        gate, value = x12.chunk(2, dim=-1)  # (B, T, H) views of one (B, T, 2H) output
        if isinstance(mlp.norm, nn.Identity):  # the gate in place inside w12's output
            h = F.silu(gate, inplace=True).mul_(value)  # w3 reads the strided half without a copy
        else:  # the sub-LN needs a dense input: the product writes one instead of LayerNorm copying
            h = F.silu(gate, inplace=True) * value
        return mlp.w3(mlp.norm(h))

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The branch output y is fresh, so the sum lands in it; the stream x is never modified, so
        # callers may keep it (intermediate outputs).
        return y.add_(x)


class Training(BlockPath):
    """Eager forward under autograd: RoPE with the q/k/v split, and the SwiGLU gate, as autograd
    functions with hand-written backwards; residual sums out of place (an in-place sum on a linear's
    (B, T, D) output, a view of a 2-D product, makes autograd copy and zero-fill whole gradients)."""

    def __init__(self, widen: bool = False) -> None:
        self.widen = widen  # half precision: RoPE's products (and their backward) through fp32

    def attention(self, attn: Attention, x: torch.Tensor, rope: RopeTables, mask=None) -> torch.Tensor:
        q, k, v = RotateSplit.apply(_qkv(attn, x), rope.rot[:, None, :], self.widen)  # (B, h, T, hd) each
        return _attend(attn, q, k, v, mask)

    def mlp(self, mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
        return mlp.w3(mlp.norm(SiluGate.apply(mlp.w12(x))))


class Traced(BlockPath):
    """The form compilers and exporters trace: out of place (they plan memory and fuse element-wise
    work themselves), RoPE on q and k in one step; the MLP is the reference's."""

    def __init__(self, complex_rope: bool = False, inplace_residual: bool = False) -> None:
        # complex_rope: one complex product (programs on PyTorch's kernels); else the real form, which
        # inductor fuses into one kernel and ONNX can express.
        self.complex_rope = complex_rope
        self.inplace_residual = inplace_residual  # without autograd: sums into the fresh branch outputs

    def attention(self, attn: Attention, x: torch.Tensor, rope: RopeTables, mask=None) -> torch.Tensor:
        qkv = _qkv(attn, x)  # (B, T, 3, h, hd)
        if self.complex_rope:
            rot = rope.rot if rope.rot is not None else rope_complex(rope.cos, rope.sin)
            qk = torch.view_as_real(_pairs(qkv[:, :, :2]) * rot[:, None, None, :]).flatten(-2)
        else:
            qk = apply_rope(qkv[:, :, :2], rope.cos[:, None, None, :], rope.sin[:, None, None, :])
        q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # (B, h, T, hd)
        return _attend(attn, q, k, qkv[:, :, 2].transpose(1, 2), mask)

    def mlp(self, mlp: SwiGLU, x: torch.Tensor) -> torch.Tensor:
        return mlp(x)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.add_(x) if self.inplace_residual else x + y


class FirstToken(BlockPath):
    """A block's output for the first token alone, (B, T, D) -> (B, 1, D), for the last block of a model
    whose output is its class token (token pooling, the EVA-02-CLIP image towers): the other tokens' last
    outputs are never read, so they serve only as keys and values. The query, output projection and MLP
    run on one token instead of T (about a twelfth of a B/L tower's work), in any block layout (pre- or
    post-norm, SwiGLU or GELU, with or without RoPE); no windows. The maths is the reference's."""

    def attention(self, attn: Attention, x: torch.Tensor, rope: RopeTables | None, mask=None) -> torch.Tensor:
        B, T, D = x.shape
        w = attn.qkv.weight  # (3D, D): q, k, v rows
        q = F.linear(x[:, :1], w[:D], attn.q_bias).view(B, 1, attn.heads, attn.head_dim).transpose(1, 2)
        kv = F.linear(x, w[D:], torch.cat((attn.k_bias, attn.v_bias))).view(B, T, 2, attn.heads, attn.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # (B, h, T, hd) each; q (B, h, 1, hd)
        if rope is not None:
            q = apply_rope(q, rope.cos[:1], rope.sin[:1])
            k = apply_rope(k, rope.cos, rope.sin)
        return _attend(attn, q, k, v, mask)  # (B, 1, D)

    def mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mlp(x)

    def __call__(self, blk: Block, x: torch.Tensor, rope: RopeTables | None, windows: Windows | None = None):
        if windows is not None:
            raise ValueError("the first-token form of a block does not take windows")
        first = x[:, :1]  # (B, 1, D)
        if blk.post_norm:
            first = first + blk.norm1(self.attention(blk.attn, x, rope))
            return first + blk.norm2(self.mlp(blk.mlp, first))
        first = first + self.attention(blk.attn, blk.norm1(x), rope)
        return first + self.mlp(blk.mlp, blk.norm2(first))


def first_token_form(model: nn.Module, x: torch.Tensor) -> FirstToken | None:
    """The form of the last block when only the class token of `model`'s output on `x` is read (its
    `forward` with token pooling): in inference (no autograd, eval mode, no windows), outside traced
    programs (their layouts are fixed by `Traced` and the exporters), outside `use` (which pins every
    block), and not on the meta device (FLOP counts are of the whole model)."""
    if torch.is_grad_enabled() or model.training or traced() or _forced.get() is not _CHOOSE or x.is_meta:
        return None
    return None if model.cfg.window_size else FirstToken()


# ------------------------------------------------------------------------------------- the choice
_CHOOSE = object()  # no form forced: `choose` decides
_forced: ContextVar[object] = ContextVar("eva02_block_path", default=_CHOOSE)


@contextlib.contextmanager
def use(path: BlockPath | None) -> Iterator[None]:
    """Inside the `with` block, every model call runs its blocks in form `path` (None: the reference)."""
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


def supported(blk: Block) -> bool:
    """Whether the forms here implement `blk`'s layout: pre-LN with a SwiGLU MLP (every EVA-02 and the
    EVA-02-CLIP B/L towers). The CLIP-E layout (post-norm, GELU MLP, no RoPE) runs the reference layers."""
    return isinstance(blk.mlp, SwiGLU) and not blk.post_norm


def choose(x: torch.Tensor, blocks: nn.ModuleList, reuse_buffers: bool = True, rope: bool = True) -> BlockPath | None:
    """The block form for one model call on tokens `x` (B, T, D); None means the reference layers
    (always for a layout the forms do not implement, see `supported`, even inside `use`).

    Args:
        blocks: the blocks that will run (whether any parameter needs a gradient; the workspace size).
        reuse_buffers: allow a `Workspace` for CPU inference.
        rope: whether the blocks rotate q and k (every form here does).
    """
    if not rope or not supported(blocks[0]):
        return None
    forced = _forced.get()
    if forced is not _CHOOSE:
        return forced
    widen = low_precision(x)
    if traced():
        return Traced(complex_rope=complex_graph() and not widen, inplace_residual=not torch.is_grad_enabled())
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in blocks.parameters())):
        return Training(widen)
    ws = None
    if reuse_buffers and Workspace.usable(x):
        first = blocks[0]
        ws = Workspace(x.shape[0] * x.shape[1] * max(first.attn.qkv.out_features, first.mlp.w12.out_features))
    return Inference(widen, ws)
