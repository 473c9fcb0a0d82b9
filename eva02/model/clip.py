"""EVA-02-CLIP: the EVA-02 image tower, a CLIP text transformer, and the joint embedding space.

The image tower is `Eva02` with the CLIP options of `Eva02Config` (class-token pooling after the final
norm, the attention's inner norm for B/L, post-norm GELU blocks without RoPE for E); its head is the
linear projection into the joint space. The text tower is the CLIP text transformer (Radford et al.
2021) as open_clip builds it for these models: token + learned position embedding, pre-LN blocks with
causal self-attention and a GELU MLP, a final norm, the features of the end-of-text token (the highest
token id in each sequence), and a bias-free projection.

Sizes follow open_clip's `EVA02-*` model configs and BAAI's `EVA02-CLIP-*` configs; `CLIP_VARIANTS`
(in `config.py`, with `ClipConfig` and `TextConfig`) holds them plus a small test model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eva02.model.config import CLIP_VARIANTS, ClipConfig, TextConfig  # noqa: F401 (part of this module's API)
from eva02.model.layers import Mlp
from eva02.model.vit import Eva02


class TextAttention(nn.Module):
    """Causal multi-head self-attention with biases on q, k and v (packed in `qkv`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The output at one position per sequence: x (B, T, W), pos (B,) -> (B, W); what forward(x)
        gives at those positions, with the query and projection computed there alone."""
        B, T, W = x.shape
        h, hd = self.heads, W // self.heads
        w, b = self.qkv.weight, self.qkv.bias  # (3W, W), (3W,): q, k, v rows
        q = F.linear(x[torch.arange(B, device=x.device), pos], w[:W], b[:W]).view(B, h, 1, hd)
        k, v = F.linear(x, w[W:], b[W:]).view(B, T, 2, h, hd).permute(2, 0, 3, 1, 4)  # (B, h, T, hd) each
        seen = torch.arange(T, device=x.device) <= pos[:, None]  # (B, T): causal, as seen from pos
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None, None, :])  # (B, h, 1, hd)
        return self.proj(x.reshape(B, W))  # (B, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # each token sees itself and earlier ones
        return self.proj(x.transpose(1, 2).reshape(B, T, W))  # (B, T, W)


class TextBlock(nn.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = TextAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, W)
        return x + self.mlp(self.norm2(x))  # (B, T, W)

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """forward(x) at one position per sequence, (B, T, W), (B,) -> (B, W), computing only that."""
        y = x[torch.arange(x.shape[0], device=x.device), pos] + self.attn.forward_at(self.norm1(x), pos)  # (B, W)
        return y + self.mlp(self.norm2(y))


class TextTransformer(nn.Module):
    """Token ids (B, L <= context_length) -> text embeddings (B, embed_dim)."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Parameter(torch.zeros(cfg.width, embed_dim))  # x @ proj, no bias
        self.grad_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's text-tower init: small normal embeddings, residual projections scaled by depth."""
        W, L = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=W**-0.5)
            nn.init.normal_(blk.attn.proj.weight, std=W**-0.5 * (2 * L) ** -0.5)
            nn.init.normal_(blk.mlp.fc_in.weight, std=(2 * W) ** -0.5)
            nn.init.normal_(blk.mlp.fc_out.weight, std=W**-0.5 * (2 * L) ** -0.5)
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc_in, blk.mlp.fc_out):
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.proj, std=W**-0.5)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[-1]
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context of {self.cfg.context_length}")
        return self.token_embedding(ids) + self.pos_embed[:L].to(self.token_embedding.weight.dtype)  # (B, L, W)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> final normalised token features (B, L, W)."""
        return self.norm(self._run(self.blocks, self._embed(ids)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        eot = ids.argmax(dim=-1)  # (B,): the end-of-text token has the highest id
        if ids.is_meta or torch.compiler.is_compiling() or torch.jit.is_tracing():  # static shapes (and FLOP counts)
            x = self.forward_tokens(ids)  # (B, L, W)
            return x[torch.arange(x.shape[0], device=x.device), eot] @ self.proj  # (B, E)
        # Attention is causal, so what follows the last end-of-text token of the batch (padding) never
        # reaches an end-of-text token: it is left out. And only the end-of-text token leaves the last
        # block, so that block runs its query, projection and MLP on that one token per text.
        ids = ids[:, : int(eot.max()) + 1]
        x = self._run(self.blocks[:-1], self._embed(ids))  # (B, L', W)
        return self.norm(self.blocks[-1].forward_at(x, eot)) @ self.proj  # (B, E)


class Eva02Clip(nn.Module):
    """EVA-02-CLIP: `encode_image`, `encode_text`, and `logit_scale` (the log of the logits' temperature)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = Eva02(cfg.vision)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def uninitialized(cls, cfg: ClipConfig, device: torch.device | str = "cpu") -> Eva02Clip:
        """Allocated but not initialised, for loading a complete state dict."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device)
        for blk in model.visual.blocks:  # constant zeros that no checkpoint carries
            blk.attn.k_bias.zero_()
        return model

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (N, context_length) for this model's text tower (`eva02.clip.tokenize`, the `clip` extra)."""
        from eva02.clip import tokenize  # the tokenizer lives outside the torch-only model package

        return tokenize(texts, self.cfg.text.context_length)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W), normalised with CLIP's mean and std -> embeddings (B, E)."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (B, L) from `eva02.clip.tokenize` -> embeddings (B, E)."""
        x = self.text(ids)
        return F.normalize(x, dim=-1) if normalize else x

    def logits(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (B_images, B_texts), as CLIP was trained with."""
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(ids, normalize=True)
        return self.logit_scale.exp() * img @ txt.T

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised image embeddings, normalised text embeddings, logit scale exp), for a contrastive loss."""
        return self.encode_image(images, True), self.encode_text(ids, True), self.logit_scale.exp()
