"""Masked image modelling around a headless `Eva02`: mask token, regressor head, cosine loss, JAX init.

Mirrors the official `EVA-02/asuka/modeling_pretrain.py` (VisionTransformerForMaskedImageModeling) and
`engine_for_pretraining.py`: masked patch embeddings are replaced by a learned mask token before the
position embedding, all tokens go through the encoder, the final per-token `norm` output of the masked
patches is regressed by `lm_head` onto the teacher's features, and the loss is the negative cosine
similarity averaged over masked patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eva02.model.config import Eva02Config
from eva02.model.vit import Eva02


class Eva02MIM(nn.Module):
    """Student of EVA-02 pre-training: `mim(images, mask)` -> predictions for the masked patches (M, T)."""

    def __init__(self, backbone: Eva02, target_dim: int) -> None:
        super().__init__()
        if backbone.is_classifier:
            raise ValueError("Eva02MIM needs a headless backbone; build it with num_classes=0")
        if target_dim <= 0:
            raise ValueError(f"target_dim must be positive, got {target_dim}")
        self.backbone = backbone
        D = backbone.cfg.dim
        dev = backbone.pos_embed.device
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D, device=dev))
        self.lm_head = nn.Linear(D, target_dim, device=dev)
        if not any(p.is_meta for p in self.parameters()):
            init_mim_weights(self)

    @property
    def target_dim(self) -> int:
        return self.lm_head.out_features

    # The training engine treats the student like an Eva02: depth for lr decay, blocks to shard with
    # FSDP2, gradient checkpointing; these forward to the backbone.
    @property
    def cfg(self) -> Eva02Config:
        return self.backbone.cfg

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) and mask (B, N) bool -> final-norm patch tokens (B, N, D), cls dropped."""
        bb = self.backbone
        grid = bb.grid_of(x)
        n = grid[0] * grid[1]
        if mask.shape != (x.shape[0], n):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch, patches) = {(x.shape[0], n)}")
        tokens = bb.prepare_tokens(x, mask=mask, mask_token=self.mask_token)  # (B, 1+N, D)
        tokens, _ = bb.forward_tokens(tokens, grid)
        return bb.norm(tokens)[:, 1:]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, all_patches: bool = False) -> torch.Tensor:
        """Predictions for masked patches, (M, T) in row-major batch order; (B, N, T) if `all_patches`."""
        feats = self.forward_features(x, mask)
        if all_patches:
            return self.lm_head(feats)
        return self.lm_head(feats[mask])  # only the masked tokens pay for the head, as upstream


def backbone_state_dict(mim_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The headless Eva02 part of an `Eva02MIM` state dict: `backbone.` stripped, mask token and head dropped."""
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in mim_state.items() if k.startswith(prefix)}


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative cosine similarity over the leading dims, computed in fp32 (official `compute_loss`)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def masked_cosine_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`cosine_loss` over the masked positions of full-grid predictions and targets (B, N, T), mask (B, N)."""
    return cosine_loss(pred[mask], target[mask])


def _xavier_normal_rows(weight: torch.Tensor, parts: int) -> None:
    """Xavier-normal init of a fused weight as `parts` separate (out/parts, in) matrices, as upstream builds them."""
    for chunk in weight.chunk(parts, dim=0):
        nn.init.xavier_normal_(chunk)


@torch.no_grad()
def init_mim_weights(mim: Eva02MIM) -> None:
    """The official pre-training ("JAX") init, mapped onto our fused parameter layout.

    Xavier-normal linears with zero bias, xavier-uniform patch kernel on its (D, C*p*p) view, LayerNorms
    1/0, trunc-normal(.02, cut at +-.02) tokens and position embedding, no depth scaling of output
    projections. Upstream Ti/S use a fused qkv and a packed w12, base/large separate q/k/v and w1/w2, so
    the fused tensors of base/large (sub-LN models) are initialised per part; sub-LN models also scale
    `mlp.w*`, `attn.proj` and the v projection by sqrt(log(2 * depth)).
    """
    bb = mim.backbone
    split = bb.cfg.sub_ln  # upstream's separate q/k/v and w1/w2 layout goes with sub-LN (base, large)
    for m in mim.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    w = bb.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(bb.patch_embed.proj.bias)
    for t in (bb.pos_embed, bb.cls_token, mim.mask_token):
        nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)
    scale = math.sqrt(math.log(2 * bb.cfg.depth)) if bb.cfg.sub_ln else 1.0
    D = bb.cfg.dim
    for blk in bb.blocks:
        blk.attn.q_bias.zero_()
        blk.attn.v_bias.zero_()
        if split:
            _xavier_normal_rows(blk.attn.qkv.weight, 3)
            _xavier_normal_rows(blk.mlp.w12.weight, 2)
        if scale != 1.0:
            blk.attn.qkv.weight[2 * D :].mul_(scale)  # the v rows: upstream's attn.v_proj
            for t in (blk.attn.proj.weight, blk.mlp.w12.weight, blk.mlp.w3.weight):
                t.mul_(scale)
