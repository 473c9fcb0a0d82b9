"""Parameter and multiply-add (MAC) counting, in the convention of fvcore / mmengine's FLOP counter.

The reference page's "Flops (G)" column comes from mmengine's `get_model_complexity_info`, which counts
multiply-adds (so do timm's "GMACs"). It counts, per operator:
- matrix products (linear layers, the q @ k^T and attn @ v products of attention): m * k * n, biases not
  counted;
- convolutions: output elements * (input channels / groups) * kernel area, bias not counted;
- layer norms: 5 per element with an affine transform (4 without).
Everything else (softmax, SiLU, the gating product, RoPE, residual adds, mean pooling) counts 0.

We count by running the model on the meta device under a dispatch mode that sees every aten operator
with its shapes: nothing is allocated or computed, so the large models count instantly. Differences to
the page's exact mmpretrain numbers are listed in `mmpretrain_macs`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from eva02.model.clip import Eva02Clip
from eva02.model.config import ClipConfig, Eva02Config
from eva02.model.vit import Eva02

aten = torch.ops.aten


def _mm(args: tuple, out: torch.Tensor) -> int:
    # (m, k) @ (k, n): one MAC per output element per k; the output has m * n elements.
    return out.numel() * args[0].shape[-1]


def _addmm(args: tuple, out: torch.Tensor) -> int:
    return out.numel() * args[1].shape[-1]  # bias (args[0]) is not counted


def _conv(args: tuple, out: torch.Tensor) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    per_position = math.prod(w.shape[1:])  # (C_in / groups) * kernel area, (C_out / groups) * ... if transposed
    if transposed:  # every input position scatters into C_out/groups * kernel outputs
        return x.numel() // x.shape[1] * w.shape[0] * per_position
    return out.numel() * per_position


def _layer_norm(args: tuple, out: torch.Tensor) -> int:
    affine = len(args) > 2 and args[2] is not None
    return args[0].numel() * (5 if affine else 4)


def _sdpa(args: tuple, out: torch.Tensor) -> int:
    q, k, v = args[0], args[1], args[2]  # (B, h, L, E), (B, h, S, E), (B, h, S, Ev)
    batch_heads = math.prod(q.shape[:-2])
    L, E, S, Ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    return batch_heads * L * S * (E + Ev)  # q @ k^T and attn @ v


# operator -> (category, MAC rule); categories stay the same whichever attention kernel runs.
_RULES = {
    aten.mm.default: ("matmul", _mm),
    aten.bmm.default: ("matmul", _mm),
    aten.addmm.default: ("matmul", _addmm),
    aten.addmm.out: ("matmul", _addmm),  # CPU inference writes the widest linears into reused buffers
    aten.mm.out: ("matmul", _mm),
    aten.baddbmm.default: ("matmul", _addmm),
    aten.convolution.default: ("conv", _conv),
    aten.native_layer_norm.default: ("norm", _layer_norm),
}
# Fused attention kernels (which one runs depends on device and version); on the meta device SDPA
# falls back to its math form, which is counted through its bmm calls instead.
for _name in (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
):
    if hasattr(aten, _name):
        _RULES[getattr(aten, _name).default] = ("matmul", _sdpa)


class MacCounter(TorchDispatchMode):
    """Dispatch mode that sums the MACs of the operators in `_RULES`, per category."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _RULES.get(func)
        if rule is not None:
            label, macs = rule
            first = out[0] if isinstance(out, tuple | list) else out
            self.by_op[label] = self.by_op.get(label, 0) + macs(args, first)
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def meta_model(cfg: Eva02Config) -> Eva02:
    """An `Eva02` with shapes only: built on the meta device, no memory, no initialisation."""
    with torch.device("meta"):
        return Eva02(cfg)


def count_params(model: nn.Module | Eva02Config) -> int:
    """Number of parameters (buffers such as the zero k-bias are not parameters)."""
    if isinstance(model, Eva02Config):
        model = meta_model(model)
    return sum(p.numel() for p in model.parameters())


def _count(model: nn.Module, x: torch.Tensor) -> MacCounter:
    counter = MacCounter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


@functools.lru_cache(maxsize=64)
def _cfg_macs(cfg: Eva02Config, batch: int) -> tuple[tuple[str, int], ...]:
    # Built at the input size itself, so no position-embedding resampling enters the count.
    model = meta_model(cfg)
    x = torch.empty(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device="meta")
    return tuple(_count(model, x).by_op.items())


def count_macs_by_op(
    model_or_cfg: nn.Module | Eva02Config, img_size: int | None = None, batch: int = 1
) -> dict[str, int]:
    """MACs of one forward pass per category: 'matmul' (linear and attention), 'conv', 'norm'."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if isinstance(model_or_cfg, Eva02):
        model_or_cfg = model_or_cfg.cfg  # a shape-only twin: same MACs, no real compute
    if isinstance(model_or_cfg, Eva02Config):
        cfg = model_or_cfg if img_size is None else model_or_cfg.replace(img_size=img_size)
        return dict(_cfg_macs(cfg, batch))
    if img_size is None:
        raise ValueError("counting a module other than Eva02 needs img_size (its input side in pixels)")
    param = next(iter(model_or_cfg.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    # Other modules run for real where their weights live (meta works too); keep them small.
    x = torch.zeros(batch, 3, img_size, img_size, device=device, dtype=dtype)
    return _count(model_or_cfg, x).by_op


def count_macs(model_or_cfg: nn.Module | Eva02Config, img_size: int | None = None, batch: int = 1) -> int:
    """Multiply-adds (MACs) of one forward pass at `img_size` (default: the config's) for `batch` images."""
    return sum(count_macs_by_op(model_or_cfg, img_size, batch).values())


# The reference page calls multiply-adds "Flops" (as mmengine does): the same counters under its words.
count_flops = count_macs
count_flops_by_op = count_macs_by_op


def forward_flops(cfg: Eva02Config, img_size: int | None = None) -> float:
    """Floating-point operations of one image's forward pass in the roofline sense: 2 per multiply-add of
    the matrix products and the patch convolution (norms and element-wise work left out)."""
    by_op = count_macs_by_op(cfg, img_size)
    return 2.0 * (by_op.get("matmul", 0) + by_op.get("conv", 0))


def mmpretrain_params(cfg: Eva02Config) -> int:
    """The parameter count mmpretrain's metafile gives for this model (the page's Params column).

    mmpretrain's attention has a fused qkv bias whose k part is a trainable (always zero) parameter:
    + dim per block. Its headless model drops the MIM final norm (weight and bias): - 2 * dim.
    """
    ours = count_params(cfg)
    return ours + cfg.depth * cfg.dim - (2 * cfg.dim if cfg.num_classes == 0 else 0)


def mmpretrain_macs(cfg: Eva02Config, img_size: int | None = None) -> int:
    """The MACs mmpretrain's metafile gives for this model (the page's Flops column), from our count.

    mmpretrain counts the backbone and the pooled-feature norm but not the classifier head (dim x classes
    MACs), and its headless model has no final per-token norm (5 per element of (1 + N) x dim).
    """
    cfg = cfg if img_size is None else cfg.replace(img_size=img_size)
    ours = count_macs(cfg)
    if cfg.num_classes:
        return ours - cfg.dim * cfg.num_classes
    return ours - 5 * (1 + cfg.grid**2) * cfg.dim


@functools.lru_cache(maxsize=16)
def count_clip(cfg: ClipConfig) -> dict[str, int]:
    """Parameters and MACs of each tower of an EVA-02-CLIP: the image tower at its input size, the text
    tower on one text of full context length (77 tokens). `params` is the whole model (+ logit_scale)."""
    with torch.device("meta"):
        model = Eva02Clip(cfg)
    ids = torch.zeros(1, cfg.text.context_length, dtype=torch.long, device="meta")
    return {
        "params": count_params(model),
        "image_params": count_params(model.visual),
        "text_params": count_params(model.text),
        "image_macs": count_macs(cfg.vision),
        "text_macs": _count(model.text, ids).total,
    }
