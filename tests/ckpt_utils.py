"""Test helpers: small random EVA-02 models and their checkpoints in every supported format.

Weights are perturbed away from the init (biases, LayerNorm affines, q/v biases are otherwise 0 or 1),
so a wrong key mapping changes the outputs and cannot pass unnoticed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from eva02.model.config import VARIANTS, Eva02Config
from eva02.model.vit import Eva02
from eva02.weights.convert import from_ours

# Odd shapes of the RoPE buffers found in old official MIM files (per-grid tables, not per-token).
OLD_ROPE = {"rope.freqs_cos": (16, 16, 64), "rope.freqs_sin": (16, 16, 64)}


def small_cfg(size: str = "test", num_classes: int = 0, depth: int = 2, img_size: int = 56, **kw) -> Eva02Config:
    """A variant's layout with few blocks and a small input, for fast tests."""
    return VARIANTS[size].replace(depth=depth, img_size=img_size, num_classes=num_classes, **kw)


def random_model(cfg: Eva02Config, seed: int = 0, scale: float = 0.05) -> Eva02:
    """An eval-mode Eva02 whose every parameter is randomly perturbed."""
    torch.manual_seed(seed)
    model = Eva02(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def official_state(model: Eva02, mim: bool = False, rope: bool = True) -> dict[str, torch.Tensor]:
    """The model in the official BAAI layout; with MIM extras (mask_token, lm_head) and RoPE buffers."""
    sd = from_ours(model.state_dict(), "official", model.cfg)
    D = model.cfg.dim
    if mim:
        sd["mask_token"] = torch.randn(1, 1, D)
        sd["lm_head.weight"] = torch.randn(1024, D)
        sd["lm_head.bias"] = torch.randn(1024)
    if rope:
        sd.update({k: torch.randn(s) for k, s in OLD_ROPE.items()})
        sd["blocks.0.attn.rope.freqs_cos"] = torch.randn(256, 64)  # the newer 'fast' per-token form
    return sd


def mmpretrain_state(model: Eva02, rope: bool = True, keep_final_norm: bool = True) -> dict[str, torch.Tensor]:
    """The model in mmpretrain's layout (zero k bias); `keep_final_norm=False` drops ln2 as its converter does."""
    sd = from_ours(model.state_dict(), "mmpretrain", model.cfg)
    if not keep_final_norm:
        sd = {k: v for k, v in sd.items() if not k.startswith("backbone.ln2.")}
    if rope:
        sd["backbone.rope.freqs_cos"] = torch.randn(256, 64)
        sd["backbone.layers.0.attn.rope.freqs_sin"] = torch.randn(256, 64)
    return sd


def timm_state(model: Eva02) -> dict[str, torch.Tensor]:
    """The model in timm's `Eva` layout."""
    return from_ours(model.state_dict(), "timm", model.cfg)


def write(obj: object, path: str | os.PathLike) -> Path:
    """torch.save an object (any container), or a flat dict as safetensors if the name says so."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def outputs(model: Eva02, seed: int = 1, batch: int = 2) -> torch.Tensor:
    """Model outputs on a fixed random batch at the model's input size."""
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.img_size
    with torch.no_grad():
        return model(torch.randn(batch, model.cfg.in_chans, s, s, generator=g))
