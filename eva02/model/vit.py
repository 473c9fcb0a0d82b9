"""The EVA-02 vision transformer (official `EVA-02/asuka/modeling_finetune.py` VisionTransformer).

One module for every size and both forms:
- classifier (num_classes > 0): blocks -> mean of patch tokens (cls excluded) -> fc_norm -> head;
- headless (num_classes == 0): blocks -> per-token final `norm`; pooled output is the mean of the
  normalised patch tokens (the MIM pre-training checkpoints' `norm`);
- token pooling (`pool="token"`, the EVA-02-CLIP image towers): blocks -> per-token `norm` -> class
  token -> head, which is then the projection to CLIP's joint space.
The CLIP towers' other options (inner attention norm; post-norm blocks with a GELU MLP and no RoPE
for E) are options of the same blocks (`layers.py`).
Any input size divisible by the patch size works: the absolute position embedding is resampled
(bicubic, as the official fine-tuning loader) and the RoPE tables are recomputed for the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from eva02.model import fast
from eva02.model.config import Eva02Config
from eva02.model.layers import Block, PatchEmbed, SwiGLU, Windows
from eva02.model.rope import RopeTables, rope_complex, rope_tables

OUT_TYPES = ("raw", "cls_token", "featmap", "avg_featmap", "embedding")


def resample_pos_embed(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Bicubic resize of the patch part of a (1, prefix + H*W, D) position embedding to another grid."""
    if old == new:
        return pos
    D = pos.shape[-1]
    cls, grid = pos[:, :prefix], pos[:, prefix:]
    grid = grid.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2).float()  # (1, D, H, W)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pos.dtype)
    return torch.cat([cls, grid], dim=1)


class Eva02(nn.Module):
    """EVA-02 ViT: `model(x)` gives logits (classifier) or pooled features (headless)."""

    def __init__(self, cfg: Eva02Config) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        # Dense backbones keep no class token (nor its position slot): the sequence is the patches alone.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix + cfg.grid**2, D))
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.mlp_hidden, cfg.sub_ln, cfg.norm_eps, dpr[i], cfg.attn_norm, cfg.mlp, cfg.post_norm)
            for i in range(cfg.depth)
        )
        # Final norms: per token (headless, and token pooling), or after average pooling (classifier).
        token_norm = cfg.num_classes == 0 or cfg.pool == "token"
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if token_norm else nn.Identity()
        self.fc_norm = nn.Identity() if token_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.reuse_buffers = True  # CPU inference: blocks share one buffer for qkv and w12 (fast.Workspace)
        self._rope_cache: dict[tuple, RopeTables] = {}
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self._build_native_rope(None)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @classmethod
    def uninitialized(cls, cfg: Eva02Config, device: torch.device | str = "cpu") -> Eva02:
        """Allocated but not initialised, for loading a complete state dict (skips a costly random init)."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device)
        for blk in model.blocks:  # constant zeros that no checkpoint carries (RoPE tables: see _apply)
            blk.attn.k_bias.zero_()
        return model

    def _build_native_rope(self, device: torch.device | None) -> None:
        """The native grid's RoPE tables in fp32 as non-persistent buffers (`rope_cos`, `rope_sin`).

        Compiled and exported graphs take them as inputs: built inside a graph, the tables were
        recomputed on every call, and inductor folded their sin/cos into every block's RoPE kernel.
        """
        if not self.cfg.rope:  # towers without RoPE (CLIP-E) keep no tables
            self.rope_cos = self.rope_sin = None
            return
        self.rope_cos, self.rope_sin = self._real_rope((self.cfg.grid, self.cfg.grid), device)

    def _real_rope(self, grid: tuple[int, int], device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sign-folded sin tables (1 + H*W, head_dim) for a grid (see `rope.rope_tables`)."""
        c = self.cfg
        return rope_tables(grid, c.head_dim, c.ref_grid, c.rope_theta, num_prefix=c.num_prefix, device=device)

    def _apply(self, fn, recurse: bool = True):
        # Every move, cast or `to_empty` goes through here. The tables are rebuilt afterwards on their
        # new device, so that casting the model to bf16/fp16 never rounds them (the rotation is taken in
        # fp32 in every path) and `to_empty` never leaves them uninitialised.
        super()._apply(fn, recurse)
        self._build_native_rope(self.pos_embed.device)
        self._rope_cache.clear()  # entries may hold the tables replaced here
        return self

    # ----------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official fine-tuning init: trunc-normal(.02) linears, scaled head, depth-scaled output projections."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
            blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
            (blk.mlp.w3 if isinstance(blk.mlp, SwiGLU) else blk.mlp.fc_out).weight.div_(math.sqrt(2.0 * i))
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(self.cfg.head_init_scale)
            self.head.bias.mul_(self.cfg.head_init_scale)

    @property
    def is_classifier(self) -> bool:
        return self.cfg.num_classes > 0

    @property
    def num_features(self) -> int:
        return self.cfg.dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def set_img_size(self, img_size: int) -> None:
        """Make `img_size` the native size: resample the position embedding parameter to its grid."""
        new = self.cfg.replace(img_size=img_size)  # validates divisibility
        pos = resample_pos_embed(self.pos_embed.data, (self.cfg.grid,) * 2, (new.grid,) * 2, new.num_prefix)
        self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)
        self.cfg = new
        self._pos_cache.clear()
        self._build_native_rope(self.pos_embed.device)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (num_classes > 0) keeping the backbone; fc_norm is created if missing."""
        if num_classes <= 0:
            raise ValueError("reset_classifier needs num_classes > 0; build a headless model with num_classes=0")
        dev = self.pos_embed.device
        if not self.is_classifier and self.cfg.pool == "avg":
            self.fc_norm = nn.LayerNorm(self.cfg.dim, eps=self.cfg.norm_eps, device=dev)
            self.norm = nn.Identity()
        self.head = nn.Linear(self.cfg.dim, num_classes, device=dev)
        nn.init.trunc_normal_(self.head.weight, std=0.02 * self.cfg.head_init_scale)
        nn.init.zeros_(self.head.bias)
        self.cfg = self.cfg.replace(num_classes=num_classes)

    # ----------------------------------------------------------------------------- per-grid state
    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}; resize or pad it")
        return H // p, W // p

    def rope_for(self, grid: tuple[int, int], device: torch.device) -> RopeTables | None:
        """RoPE tables (real and complex) for a grid, computed once per (grid, device), shared by every block
        (None for a model without RoPE).

        Under torch.compile / torch.export the native grid's tables are the `rope_cos`/`rope_sin`
        buffers (graph inputs), and other grids' real tables are built inside the graph: reading and
        filling the dict would make the second call recompile.
        """
        c = self.cfg
        if not c.rope:
            return None
        native = grid == (c.grid, c.grid) and self.rope_cos.device == torch.device(device)
        if torch.compiler.is_compiling():
            if native:
                return RopeTables(self.rope_cos, self.rope_sin, None)
            return RopeTables(*self._real_rope(grid, device), None)  # real form: see fast.Traced
        key = (grid, device)
        tables = self._rope_cache.get(key)
        if tables is None:
            # Normal tensors even when first built under inference_mode, so a later training step may save them.
            with torch.inference_mode(False):
                cos, sin = (self.rope_cos, self.rope_sin) if native else self._real_rope(grid, device)
                tables = RopeTables(cos, sin, rope_complex(cos, sin))
            self._rope_cache[key] = tables
        return tables

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding (1, 1+H*W, D) for a grid; resampled copies are cached outside training."""
        native = (self.cfg.grid, self.cfg.grid)
        if grid == native:
            return self.pos_embed
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and self.pos_embed.requires_grad):
            return resample_pos_embed(self.pos_embed, native, grid, self.cfg.num_prefix)  # no cache: see rope_for
        key = (grid, self.pos_embed.device, self.pos_embed.dtype, self.pos_embed._version)
        pos = self._pos_cache.get(key)
        if pos is None:
            self._pos_cache.clear()  # one stale grid at a time is enough
            with torch.inference_mode(False):
                pos = resample_pos_embed(self.pos_embed.detach(), native, grid, self.cfg.num_prefix)
            self._pos_cache[key] = pos
        return pos

    # ----------------------------------------------------------------------------------- forward
    def prepare_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1+N, D) with cls and position embedding.

        `mask` (B, N) bool replaces the masked patch embeddings by `mask_token` (1, 1, D), as in MIM.
        """
        grid = self.grid_of(x)
        x = self.patch_embed(x)  # (B, N, D)
        s = self.cfg.patch_grad_scale
        if s < 1.0 and self.training:
            x = x.detach() if s == 0.0 else x.detach() * (1.0 - s) + x * s
        if mask is not None:
            w = mask.unsqueeze(-1).type_as(x)
            x = x * (1.0 - w) + mask_token.to(x.dtype) * w
        pos = self.pos_embed_for(grid).to(x.dtype)
        if self.cls_token is None:  # dense backbones: the patches alone
            return x + pos
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        return x.add_(pos)  # in place: cat's output is fresh and not saved

    def _run_block(
        self, blk: Block, x: torch.Tensor, rope: RopeTables | None, path: fast.BlockPath | None, windows: Windows | None
    ) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, rope, path, windows, use_reentrant=False)
        return blk(x, rope, path, windows)

    def forward_tokens(
        self, x: torch.Tensor, grid: tuple[int, int], indices: Sequence[int] = (), last: fast.BlockPath | None = None
    ):
        """Run all blocks on tokens; return final raw tokens and the raw outputs of blocks in `indices`.

        The form every block runs in (reference or one of `fast.py`'s) is chosen here, once per call;
        `last` replaces it for the last block (`fast.FirstToken`: only the class token comes out).
        """
        c = self.cfg
        rope = self.rope_for(grid, x.device)
        path = fast.choose(x, self.blocks, self.reuse_buffers, rope=rope is not None)
        windows = win_rope = None
        if c.window_size:  # dense backbones: one window layout and one window RoPE table for all windowed blocks
            windows = Windows(grid, c.window_size, x.shape[0], c.window_pad_mask, x.device)
            win_rope = self.rope_for((c.window_size, c.window_size), x.device)
        keep = {}
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            if c.windowed(i):
                x = self._run_block(blk, x, win_rope, path, windows)
            else:
                x = self._run_block(blk, x, rope, last if last is not None and i == n - 1 else path, None)
            if i in indices:
                keep[i] = x
        return x, [keep[i] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final tokens (B, 1+N, D); normalised per token in headless models."""
        grid = self.grid_of(x)
        x, _ = self.forward_tokens(self.prepare_tokens(x), grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1+N, D) -> logits (B, C), or the pooled, normalised features (B, D) if pre_logits."""
        if self.cfg.pool == "token":  # CLIP towers: the class token, normalised with the others by `norm`
            x = x[:, 0]
        else:
            x = self.fc_norm(x[:, self.cfg.num_prefix :].mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = fast.first_token_form(self, x) if self.cfg.pool == "token" else None
        if last is not None:  # only the class token is read: the last block computes nothing else
            tokens, _ = self.forward_tokens(self.prepare_tokens(x), self.grid_of(x), last=last)  # (B, 1, D)
            return self.forward_head(self.norm(tokens))
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------- feature extraction
    def _resolve(self, indices: Sequence[int] | int | None) -> list[int]:
        n = len(self.blocks)
        if indices is None:
            indices = range(n)
        elif isinstance(indices, int):
            indices = range(n - indices, n)  # the last `indices` blocks, as timm
        out = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise IndexError(f"block index {i} is out of range for a {n}-block model")
            out.append(j)
        return out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Sequence[int] | int | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Outputs of selected blocks, as feature maps (NCHW) or token sequences (NLC) without cls.

        Returns (final tokens, [intermediates]) or only the list if `intermediates_only`; with
        `return_prefix_tokens`, each intermediate is a (features, cls (B, 1, D)) pair.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        grid = self.grid_of(x)
        idx = self._resolve(indices)
        final, outs = self.forward_tokens(self.prepare_tokens(x), grid, idx)
        feats = []
        for t in outs:
            t = self.norm(t) if norm else t
            prefix, patches = t[:, : self.cfg.num_prefix], t[:, self.cfg.num_prefix :]  # (B, 1 or 0, D), (B, N, D)
            if output_fmt == "NCHW":
                patches = patches.transpose(1, 2).reshape(t.shape[0], -1, *grid)  # (B, D, H, W)
            feats.append((patches, prefix) if return_prefix_tokens else patches)
        return feats if intermediates_only else (self.norm(final), feats)

    def extract_feat(
        self, x: torch.Tensor, out_type: str = "avg_featmap", out_indices: Sequence[int] | int = (-1,)
    ) -> tuple[torch.Tensor, ...]:
        """Backbone features per selected block, one tensor each (mmpretrain's backbone `out_type`).

        'raw': block output tokens (B, 1+N, D) before any final norm; 'cls_token': (B, D);
        'featmap': patch tokens as (B, D, H/p, W/p); 'avg_featmap': pooled features (B, D), which for
        the last block of a classifier are exactly `forward_head(..., pre_logits=True)`; 'embedding'
        (CLIP image towers only): the pooled features through the projection, i.e. `clip.encode_image`
        for the last block (not normalised).
        Final norms are those of the model: per-token `norm` (headless), `fc_norm` after pooling
        (classifier); they are applied to every selected block's output except for 'raw'.
        """
        if out_type not in OUT_TYPES:
            raise ValueError(f"out_type must be one of {OUT_TYPES}, got {out_type!r}")
        if out_type == "cls_token" and not self.cfg.cls_token:
            raise ValueError("out_type='cls_token': this dense backbone has no class token (use 'featmap')")
        if out_type == "embedding" and not (self.cfg.pool == "token" and self.is_classifier):
            raise ValueError("out_type='embedding' is the joint-space embedding of EVA-02-CLIP image towers; "
                             "this model has none (use 'avg_featmap' or 'cls_token')")  # fmt: skip
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        grid = self.grid_of(x)
        idx = self._resolve(out_indices)
        _, outs = self.forward_tokens(self.prepare_tokens(x), grid, idx)
        res = []
        for t in outs:
            if out_type == "raw":
                res.append(t)
                continue
            t = self.norm(t)
            if out_type == "cls_token":
                res.append(t[:, 0])
            elif out_type == "featmap":
                res.append(t[:, self.cfg.num_prefix :].transpose(1, 2).reshape(t.shape[0], -1, *grid))
            elif out_type == "embedding":
                res.append(self.forward_head(t))
            else:
                res.append(self.forward_head(t, pre_logits=True))
        return tuple(res)
