"""Model configuration: the `Eva02Config` dataclass and the size variants of the EVA-02 family.

Sizes follow the official `modeling_finetune.py` / `modeling_pretrain.py` model functions
(EVA-02 paper, arXiv 2303.11331, table 1): head width 64, SwiGLU hidden int(D * 8/3), sub-LN in the
MLP of the base and large models only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

MLPS = ("swiglu", "gelu")
POOLS = ("avg", "token")


@dataclass(frozen=True)
class Eva02Config:
    """Everything needed to build an `Eva02` module; no weights, no I/O."""

    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_hidden: int = 512
    sub_ln: bool = False  # LayerNorm inside the SwiGLU, between the gated product and w3 (B/L)
    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    num_classes: int = 0  # 0: headless (final per-token norm, no head)
    ref_grid: int = 16  # RoPE reference grid (the 224/14 pre-training grid); positions are rescaled to it
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    drop_path: float = 0.0
    head_init_scale: float = 0.001
    # Gradient through the patch embedding is scaled by this factor (1: normal, 0: detached as in the
    # official fine-tuning, 0.1 in the official pre-training).
    patch_grad_scale: float = 1.0
    # Options of the EVA-02-CLIP image towers (timm `eva02_*_clip_*`, BAAI EVA-CLIP `eva_vit_model.py`).
    attn_norm: bool = False  # LayerNorm on the attention output, before its projection (CLIP B/L)
    mlp: str = "swiglu"  # "swiglu" (EVA-02) or "gelu": fc1 -> GELU -> fc2 (CLIP E)
    post_norm: bool = False  # norms on the branch outputs: x + norm1(attn(x)) (CLIP E)
    rope: bool = True  # 2-D RoPE on q and k (False: CLIP E, which has only the absolute embedding)
    pool: str = "avg"  # "avg": mean of patch tokens then fc_norm; "token": class token after the final norm
    # Dense backbones (ViTDet, EVA-02 det/seg): no class token in the sequence, and attention within
    # window_size x window_size windows of the patch grid except in the blocks listed in global_blocks.
    cls_token: bool = True
    window_size: int = 0  # 0: every block attends globally
    global_blocks: tuple[int, ...] = ()
    # Windows are zero-padded where the grid does not divide; True keeps padded keys out of the softmax
    # (ViTDet lets them in, which only differs when the grid does not divide by window_size).
    window_pad_mask: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.heads:
            problems.append(f"dim={self.dim} is not divisible by heads={self.heads}")
        elif self.rope and (self.dim // self.heads) % 4:
            problems.append(f"head width {self.dim // self.heads} must be divisible by 4 for 2-D RoPE")
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        for name in ("dim", "depth", "heads", "mlp_hidden", "patch_size", "in_chans", "ref_grid"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_classes < 0:
            problems.append(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.patch_grad_scale <= 1.0:
            problems.append(f"patch_grad_scale must be in [0, 1], got {self.patch_grad_scale}")
        if self.mlp not in MLPS:
            problems.append(f"mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.pool not in POOLS:
            problems.append(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.window_size < 0:
            problems.append(f"window_size must be >= 0, got {self.window_size}")
        if self.window_size and self.cls_token:
            problems.append("windowed attention needs cls_token=False (a class token belongs to no window)")
        if self.pool == "token" and not self.cls_token:
            problems.append("pool='token' needs the class token (cls_token=True)")
        bad = [i for i in self.global_blocks if not 0 <= i < self.depth]
        if bad:
            problems.append(f"global_blocks {bad} are not block indexes of a {self.depth}-block model")
        if self.mlp == "gelu" and self.sub_ln:
            problems.append("sub_ln applies to the SwiGLU MLP only (mlp='swiglu')")
        if problems:
            raise ValueError("invalid Eva02Config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches in the sequence: the class token, or none (dense backbones)."""
        return 1 if self.cls_token else 0

    def windowed(self, block: int) -> bool:
        """Whether block `block` attends within windows."""
        return self.window_size > 0 and block not in self.global_blocks

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Eva02Config:
        """Build from a dict, refusing unknown keys so a typo never passes silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Eva02Config keys {unknown}; valid keys: {sorted(known)}")
        if isinstance(d.get("global_blocks"), list):  # JSON has no tuples
            d = {**d, "global_blocks": tuple(d["global_blocks"])}
        return cls(**d)

    def replace(self, **changes: Any) -> Eva02Config:
        return replace(self, **changes)


def _size(dim: int, depth: int, heads: int, sub_ln: bool) -> Eva02Config:
    return Eva02Config(dim=dim, depth=depth, heads=heads, mlp_hidden=int(dim * 4 * 2 / 3), sub_ln=sub_ln)


def dense_config(
    cfg: Eva02Config,
    img_size: int,
    window_size: int = 16,
    global_blocks: tuple[int, ...] | None = None,
    patch_size: int = 16,
) -> Eva02Config:
    """The dense-backbone form of `cfg` (EVA-02 det/seg, ViTDet): no class token, no head, attention in
    windows except in `global_blocks`, by default the last block of each quarter of the depth (base:
    2, 5, 8, 11; large: 5, 11, 17, 23, as the official configs)."""
    if global_blocks is None:
        q = cfg.depth // 4
        global_blocks = tuple(q * (k + 1) - 1 for k in range(4)) if q else (cfg.depth - 1,)
    return cfg.replace(
        img_size=img_size, patch_size=patch_size, num_classes=0, pool="avg", cls_token=False,
        window_size=window_size, global_blocks=tuple(global_blocks),
    )  # fmt: skip


# The four released sizes, plus a 2-block model for fast tests. Large's hidden is int(1024*8/3) = 2730.
VARIANTS: dict[str, Eva02Config] = {
    "test": Eva02Config(dim=128, depth=2, heads=2, mlp_hidden=341, sub_ln=True, img_size=56),
    "tiny": _size(192, 12, 3, sub_ln=False),
    "small": _size(384, 12, 6, sub_ln=False),
    "base": _size(768, 12, 12, sub_ln=True),
    "large": _size(1024, 24, 16, sub_ln=True),
}


# ------------------------------------------------------------------------------- EVA-02-CLIP
@dataclass(frozen=True)
class TextConfig:
    """The CLIP text transformer: width, heads and depth; BPE vocabulary and context of CLIP's tokenizer."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = [
            f"{n} must be positive"
            for n in ("width", "heads", "layers", "vocab_size", "context_length")
            if getattr(self, n) <= 0
        ]
        if not problems and self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if problems:
            raise ValueError("invalid TextConfig: " + "; ".join(problems))

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def replace(self, **changes: Any) -> TextConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class ClipConfig:
    """An image tower (`vision.num_classes` is the joint-space width), a text tower, the joint width."""

    vision: Eva02Config
    text: TextConfig
    embed_dim: int

    def __post_init__(self) -> None:
        if self.vision.pool != "token" or self.vision.num_classes != self.embed_dim:
            raise ValueError(
                "invalid ClipConfig: the image tower must pool the class token and project to embed_dim "
                f"(pool={self.vision.pool!r}, num_classes={self.vision.num_classes}, embed_dim={self.embed_dim})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"vision": self.vision.to_dict(), "text": asdict(self.text), "embed_dim": self.embed_dim}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        unknown = sorted(set(d) - {"vision", "text", "embed_dim"})
        text_keys = {f.name for f in fields(TextConfig)}
        unknown += sorted(f"text.{k}" for k in set(d.get("text", {})) - text_keys)
        if unknown:
            raise ValueError(f"unknown ClipConfig keys {unknown}")
        return cls(Eva02Config.from_dict(d["vision"]), TextConfig(**d["text"]), int(d["embed_dim"]))

    def replace(self, **changes: Any) -> ClipConfig:
        return replace(self, **changes)


def _tower(dim: int, depth: int, heads: int, hidden: int, patch: int, img: int, embed: int, **kw: Any) -> Eva02Config:
    return Eva02Config(
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_hidden=hidden,
        patch_size=patch,
        img_size=img,
        num_classes=embed,
        pool="token",
        **kw,
    )


# B and L: the EVA-02 blocks with sub-LN and the inner attention norm. E: 64 post-norm blocks with a
# GELU MLP (15360 = 1792 * 60/7), no RoPE. Every tower keeps RoPE's 16x16 reference grid.
_BL = dict(sub_ln=True, attn_norm=True)
_E = dict(mlp="gelu", post_norm=True, rope=False)
CLIP_VARIANTS: dict[str, ClipConfig] = {
    "test": ClipConfig(_tower(128, 2, 2, 341, 14, 56, 64, **_BL), TextConfig(64, 2, 2), 64),
    "B-16": ClipConfig(_tower(768, 12, 12, 2048, 16, 224, 512, **_BL), TextConfig(512, 8, 12), 512),
    "L-14": ClipConfig(_tower(1024, 24, 16, 2730, 14, 224, 768, **_BL), TextConfig(768, 12, 12), 768),
    "L-14-336": ClipConfig(_tower(1024, 24, 16, 2730, 14, 336, 768, **_BL), TextConfig(768, 12, 12), 768),
    "E-14": ClipConfig(_tower(1792, 64, 16, 15360, 14, 224, 1024, **_E), TextConfig(1024, 16, 24), 1024),
    "E-14-plus": ClipConfig(_tower(1792, 64, 16, 15360, 14, 224, 1024, **_E), TextConfig(1280, 20, 32), 1024),
}
