"""Checkpoint key maps between our parameter layout and the official BAAI, timm and mmpretrain layouts.

Every difference between formats lives in the tables below (rule = our key parts <-> their key parts),
not in the model. Three upstream files define the other layouts: the official
`EVA-02/asuka/modeling_finetune.py` / `modeling_pretrain.py` (BAAI `.pt` files), timm's
`timm/models/eva.py` (`Eva`) and mmpretrain's `mmpretrain/models/backbones/vit_eva02.py` (`ViTEVA02`,
written by `tools/model_converters/eva02_to_mmpretrain.py`).

Also here: format detection from key names, and fitting a state dict to a config (patch-kernel resize
by FlexiViT's pseudo-inverse, arXiv 2212.08013 sec. 3.4, and bicubic position-embedding resize).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eva02.model.config import Eva02Config
from eva02.model.vit import resample_pos_embed

FORMATS = ("eva02", "official", "timm", "mmpretrain")

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Rule:
    """Our key parts <-> their key parts: each side concatenated along dim 0 is the same tensor.

    `{i}` stands for a block index and `{p}` for `weight` or `bias`; in the segmentation table
    (`weights/official_seg.py`) also `{j}` for a head level and `{b}` for a BatchNorm tensor (`weight`,
    `bias`, `running_mean`, `running_var`, `num_batches_tracked`). A `None` part is a zero tensor
    the same size as its siblings that one side does not store (the k bias of the attention).
    `when` limits a rule to layouts (one tag or a tuple of them). Blocks: 'fused' (Ti/S: fused qkv,
    packed SwiGLU), 'split' (B/L and CLIP B/L: separate q/k/v, w1/w2 and a sub-LN), 'gelu' (CLIP E:
    fused qkv, plain GELU MLP). Ends: 'headless', 'classifier' (average pooling) or 'token' (class
    token after the final norm, the CLIP towers). 'any' applies always.
    """

    ours: tuple[str | None, ...]
    theirs: tuple[str | None, ...]
    when: str | tuple[str, ...] = "any"

    @property
    def tags(self) -> tuple[str, ...]:
        return (self.when,) if isinstance(self.when, str) else self.when


def _same(*keys: str, when: str | tuple[str, ...] = "any") -> list[Rule]:
    return [Rule((k,), (k,), when) for k in keys]


def _rename(pairs: dict[str, str], when: str | tuple[str, ...] = "any") -> list[Rule]:
    return [Rule((ours,), (theirs,), when) for ours, theirs in pairs.items()]


B = "blocks.{i}."
_STEM = ("patch_embed.proj.{p}", "cls_token", "pos_embed")
_BLOCK = (B + "norm1.{p}", B + "norm2.{p}", B + "attn.proj.{p}")
_QKV_SPLIT = (B + "attn.q_proj.weight", B + "attn.k_proj.weight", B + "attn.v_proj.weight")

# The plain MLP of the CLIP-E blocks: ours, and the name BAAI and timm give it.
_GELU_MLP = (B + "mlp.fc_in.{p}", B + "mlp.fc_out.{p}")
_GELU_THEIRS = {B + "mlp.fc_in.{p}": B + "mlp.fc1.{p}", B + "mlp.fc_out.{p}": B + "mlp.fc2.{p}"}

# BAAI's layout: EVA-02 (`asuka/modeling_*.py`) and EVA-CLIP's image towers (`eva_vit_model.py`).
OFFICIAL: list[Rule] = [
    *_same(*_STEM, *_BLOCK, B + "attn.q_bias", B + "attn.v_bias", B + "mlp.w3.{p}"),
    *_same("norm.{p}", "fc_norm.{p}", "head.{p}"),
    *_same(B + "attn.qkv.weight", when=("fused", "gelu")),
    *_same(B + "mlp.w12.{p}", when="fused"),
    Rule((B + "attn.qkv.weight",), _QKV_SPLIT, "split"),
    Rule((B + "mlp.w12.{p}",), (B + "mlp.w1.{p}", B + "mlp.w2.{p}"), "split"),
    *_rename({B + "mlp.norm.{p}": B + "mlp.ffn_ln.{p}", B + "attn.norm.{p}": B + "attn.inner_attn_ln.{p}"}),
]

TIMM: list[Rule] = [
    *_same(*_STEM, *_BLOCK, "head.{p}", B + "attn.norm.{p}"),
    *_rename({B + "mlp.w3.{p}": B + "mlp.fc2.{p}"}, when=("fused", "split")),
    *_same(B + "mlp.norm.{p}"),
    *_same(B + "attn.qkv.weight", B + "attn.q_bias", B + "attn.v_bias", when=("fused", "gelu")),
    *_rename({B + "mlp.w12.{p}": B + "mlp.fc1.{p}"}, when="fused"),
    *_rename(_GELU_THEIRS, when="gelu"),
    Rule((B + "attn.qkv.weight",), _QKV_SPLIT, "split"),
    *_rename({B + "attn.q_bias": B + "attn.q_proj.bias", B + "attn.v_bias": B + "attn.v_proj.bias"}, when="split"),
    Rule((B + "mlp.w12.{p}",), (B + "mlp.fc1_g.{p}", B + "mlp.fc1_x.{p}"), "split"),
    # timm pools first and normalises after (fc_norm) in averaging models; the official MIM checkpoints'
    # per-token `norm` is what timm stores there, so for a headless model it is our `norm`.
    *_rename({"norm.{p}": "fc_norm.{p}"}, when="headless"),
    *_same("fc_norm.{p}", when="classifier"),
    *_same("norm.{p}", when="token"),  # class-token pooling (CLIP towers): the per-token norm, as ours
]

_MB = "backbone.layers.{i}."
MMPRETRAIN: list[Rule] = [
    *_rename(
        {
            "patch_embed.proj.{p}": "backbone.patch_embed.projection.{p}",
            "cls_token": "backbone.cls_token",
            "pos_embed": "backbone.pos_embed",
            "head.{p}": "head.fc.{p}",
        }
    ),
    *_rename({B + s: _MB + s for s in ("norm1.{p}", "norm2.{p}", "attn.qkv.weight", "attn.proj.{p}")}),
    *_rename({B + s: _MB + s for s in ("mlp.w12.{p}", "mlp.norm.{p}", "mlp.w3.{p}")}),
    # mmpretrain's fused qkv bias has a k part (a trainable parameter there); ours has none.
    Rule((B + "attn.q_bias", None, B + "attn.v_bias"), (_MB + "attn.qkv.bias",)),
    *_rename({"norm.{p}": "backbone.ln2.{p}"}, when="headless"),
    *_rename({"fc_norm.{p}": "backbone.ln2.{p}"}, when="classifier"),
]

_OURS_KEYS = (*_STEM, *_BLOCK, B + "attn.qkv.weight", B + "attn.q_bias", B + "attn.v_bias")
EVA02: list[Rule] = _same(*_OURS_KEYS, B + "mlp.w12.{p}", B + "mlp.norm.{p}", B + "mlp.w3.{p}") + _same(
    "norm.{p}", "fc_norm.{p}", "head.{p}", B + "attn.norm.{p}", *_GELU_MLP
)

TABLES: dict[str, list[Rule]] = {"eva02": EVA02, "official": OFFICIAL, "timm": TIMM, "mmpretrain": MMPRETRAIN}

# ------------------------------------------------------------------------------- EVA-02-CLIP
# A CLIP state dict is the image tower under `visual.` (one of the tables above), the text tower under
# `text.` and `logit_scale`. open_clip keeps timm's tower under `visual.trunk.`; BAAI's EVA-CLIP files
# keep their own tower (with the CLIP-E MLP as `fc1`/`fc2`) under `visual.`; both name the text tower
# as open_clip's `TextTransformer` does.
CLIP_FORMATS = ("eva02", "open_clip", "eva_clip")

_T, _OCT = "text.blocks.{i}.", "text.transformer.resblocks.{i}."
_TEXT_OPEN_CLIP = {
    "text.token_embedding.weight": "text.token_embedding.weight",
    "text.pos_embed": "text.positional_embedding",
    _T + "norm1.{p}": _OCT + "ln_1.{p}",
    _T + "attn.qkv.{p}": _OCT + "attn.in_proj_{p}",
    _T + "attn.proj.{p}": _OCT + "attn.out_proj.{p}",
    _T + "norm2.{p}": _OCT + "ln_2.{p}",
    _T + "mlp.fc_in.{p}": _OCT + "mlp.c_fc.{p}",
    _T + "mlp.fc_out.{p}": _OCT + "mlp.c_proj.{p}",
    "text.norm.{p}": "text.ln_final.{p}",
    "text.proj": "text.text_projection",
    "logit_scale": "logit_scale",
}


def _prefixed(rules: list[Rule], ours: str, theirs: str) -> list[Rule]:
    def add(prefix: str, keys: tuple[str | None, ...]) -> tuple[str | None, ...]:
        return tuple(None if k is None else prefix + k for k in keys)

    return [Rule(add(ours, r.ours), add(theirs, r.theirs), r.when) for r in rules]


CLIP_TABLES: dict[str, list[Rule]] = {
    "eva02": [*_prefixed(EVA02, "visual.", "visual."), *_same(*_TEXT_OPEN_CLIP)],
    "open_clip": [*_prefixed(TIMM, "visual.", "visual.trunk."), *_rename(_TEXT_OPEN_CLIP)],
    "eva_clip": [
        *_prefixed([*OFFICIAL, *_rename(_GELU_THEIRS, when="gelu")], "visual.", "visual."),
        *_rename(_TEXT_OPEN_CLIP),
    ],
}

# Buffers some CLIP files carry that are recomputed here: RoPE tables, the text tower's causal mask.
_CLIP_DROPPED = ("rope.", "text.attn_mask")


def detect_clip_format(sd: StateDict) -> str:
    """Tell a CLIP checkpoint's format from its key names (see CLIP_TABLES)."""
    if any(k.startswith("text.blocks.") for k in sd):
        return "eva02"
    if any(k.startswith("visual.trunk.") for k in sd):
        return "open_clip"
    if any(k.startswith("visual.blocks.") for k in sd) and any(k.startswith("text.transformer.") for k in sd):
        return "eva_clip"
    shown = ", ".join(list(sd)[:5])
    raise ValueError(
        f"not an EVA-02-CLIP checkpoint of a known format (keys {shown}, ...): expected open_clip "
        "(visual.trunk.*, text.*), BAAI EVA-CLIP (visual.blocks.*, text.transformer.*) or eva02 (text.blocks.*)"
    )


def clip_to_ours(sd: StateDict, fmt: str = "auto") -> StateDict:
    """Convert a flat CLIP state dict (open_clip, BAAI EVA-CLIP or ours) to our `Eva02Clip` layout."""
    fmt = detect_clip_format(sd) if fmt == "auto" else fmt
    if fmt not in CLIP_TABLES:
        raise ValueError(f"unknown CLIP checkpoint format {fmt!r}; use one of {CLIP_FORMATS} or 'auto'")
    rules = CLIP_TABLES[fmt]
    kept = {k: v for k, v in sd.items() if not any(d in k for d in _CLIP_DROPPED)}
    return _convert(kept, _applicable(rules, _blocks_theirs(kept, rules), "token"), "theirs", "ours", fmt)


def clip_from_ours(sd: StateDict, fmt: str, cfg: Eva02Config | None = None) -> StateDict:
    """Convert our `Eva02Clip` state dict to format `fmt` (the inverse of `clip_to_ours`); `cfg`: the image tower's."""
    if fmt not in CLIP_TABLES:
        raise ValueError(f"unknown CLIP checkpoint format {fmt!r}; use one of {CLIP_FORMATS}")
    visual = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    return _convert(sd, _applicable(CLIP_TABLES[fmt], _blocks_ours(visual, cfg), "token"), "ours", "theirs", fmt)


# Pre-training-only tensors of the official MIM checkpoints: not part of an Eva02, handed to a MIM
# wrapper on request (see `to_ours(mim=...)`).
MIM_EXTRAS = {"official": ("mask_token", "lm_head.{p}")}


class KBiasError(ValueError):
    """An mmpretrain checkpoint whose k bias is non-zero: not loadable into the official architecture."""


BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.cache
def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    regex = regex.replace(r"\{j\}", r"(?P<j>\d+)").replace(r"\{b\}", f"(?P<b>{'|'.join(BATCHNORM_TENSORS)})")
    return re.compile(regex)


def _match(key: str, template: str | None) -> dict[str, str] | None:
    if template is None:
        return None
    m = _pattern(template).fullmatch(key)
    return m.groupdict() if m else None


def _check_fmt(fmt: str) -> None:
    if fmt not in TABLES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS} or 'auto'")


def _applicable(rules: list[Rule], blocks: str, end: str) -> list[Rule]:
    """The rules of one layout: `blocks` 'fused' / 'split' / 'gelu', `end` 'headless' / 'classifier' / 'token'."""
    allowed = {"any", blocks, end}
    return [r for r in rules if allowed.intersection(r.tags)]


def _convert(sd: StateDict, rules: list[Rule], src: str, dst: str, fmt: str) -> StateDict:
    """Apply `rules` from side `src` ('ours'/'theirs') to side `dst`; strict about unknown/missing keys."""
    groups: dict[tuple, dict[int, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        for rule in rules:
            hit = next(((j, g) for j, t in enumerate(getattr(rule, src)) if (g := _match(key, t)) is not None), None)
            if hit is not None:
                j, g = hit
                groups.setdefault((rule, tuple(sorted(g.items()))), {})[j] = value
                break
        else:
            unknown.append(key)
    if unknown:
        head = ", ".join(unknown[:8]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        side = "our" if src == "ours" else f"the {fmt!r}"
        raise ValueError(f"checkpoint keys not in {side} EVA-02 layout: {head}; check the format (--fmt / fmt=)")
    out: StateDict = {}
    missing = []
    for (rule, fill), parts in groups.items():
        names = getattr(rule, src)
        absent = [t.format(**dict(fill)) for j, t in enumerate(names) if t is not None and j not in parts]
        if absent:
            missing += absent
            continue
        like = next(iter(parts.values()))
        tensors = [parts[j] if t is not None else torch.zeros_like(like) for j, t in enumerate(names)]
        whole = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        targets = getattr(rule, dst)
        pieces = whole.chunk(len(targets)) if len(targets) > 1 else (whole,)  # (whole may be 0-d: logit_scale)
        for t, piece in zip(targets, pieces, strict=True):
            if t is None:
                _check_zero(piece, fill, fmt)
            else:
                out[t.format(**dict(fill))] = piece.clone() if len(targets) > 1 else piece
    if missing:
        raise ValueError(f"{fmt!r} checkpoint is incomplete, missing: {', '.join(sorted(missing)[:8])}")
    return out


def _check_zero(piece: Tensor, fill: tuple, fmt: str) -> None:
    if torch.count_nonzero(piece):
        where = dict(fill).get("i", "?")
        raise KBiasError(
            f"this {fmt} checkpoint has a non-zero k bias (block {where}, max |b_k| = {piece.abs().max():.3g}): "
            "mmpretrain trains a k bias that the official EVA-02 attention does not have, so these weights "
            "cannot be loaded exactly; use the official or timm weights of this model instead"
        )


def _only(rules: list[Rule], tag: str) -> list[str]:
    """Their key templates that only rules of layout `tag` alone have."""
    mine = {t for r in rules if r.tags == (tag,) for t in r.theirs if t is not None}
    others = {t for r in rules if r.tags != (tag,) for t in r.theirs if t is not None}
    return sorted(mine - others)


def _has(sd: StateDict, templates: list[str]) -> bool:
    return any(_match(k, t) is not None for k in sd for t in templates)


def _blocks_theirs(sd: StateDict, rules: list[Rule]) -> str:
    """The block layout of a state dict in their format: the tag whose own key names it has, or for the
    fused-qkv layouts, whose MLP shapes it has (timm stores Ti/S's packed SwiGLU and CLIP-E's GELU MLP
    under the same `fc1`/`fc2` names: 2H rows in fc1 for H columns in fc2 when packed)."""
    if _has(sd, _only(rules, "split")):
        return "split"
    if _has(sd, _only(rules, "gelu")):
        return "gelu"
    names = {r.ours[0].rsplit(".mlp.", 1)[-1]: r.theirs[0] for r in rules if r.tags == ("gelu",) and len(r.ours) == 1}
    fc_in, fc_out = names.get("fc_in.{p}"), names.get("fc_out.{p}")
    if fc_in and fc_out:
        w_in, w_out = (sd.get(t.format(i=0, p="weight")) for t in (fc_in, fc_out))
        if w_in is not None and w_out is not None and w_in.shape[0] == w_out.shape[-1]:
            return "gelu"
    return "fused"


def _end_theirs(sd: StateDict, rules: list[Rule]) -> str:
    """How a state dict in their format ends: 'headless', 'classifier' (average pooling) or 'token'."""
    heads = [t for r in rules if r.ours and r.ours[0] == "head.{p}" for t in r.theirs]
    if not _has(sd, heads):
        return "headless"
    return "token" if _has(sd, _only(rules, "token")) else "classifier"


def _blocks_ours(sd: StateDict, cfg: Eva02Config | None) -> str:
    if cfg is not None:
        return "gelu" if cfg.mlp == "gelu" else "split" if cfg.sub_ln else "fused"
    if any(k.endswith("mlp.fc1.weight") for k in sd):
        return "gelu"
    return "split" if any(k.endswith("mlp.norm.weight") for k in sd) else "fused"


def _end_ours(sd: StateDict, cfg: Eva02Config | None) -> str:
    if cfg is not None and cfg.pool == "token":
        return "token"
    if "head.weight" not in sd:
        return "headless"
    return "token" if cfg is None and "norm.weight" in sd and "fc_norm.weight" not in sd else "classifier"


def to_ours(sd: StateDict, fmt: str, cfg: Eva02Config | None = None, mim: dict | None = None) -> StateDict:
    """Convert a flat state dict in format `fmt` to our layout.

    RoPE buffers are dropped. MIM-only tensors (`mask_token`, `lm_head.*`) are dropped, or stored in
    `mim` if a dict is given. An mmpretrain headless checkpoint has no final norm: it gets a unit-affine
    LayerNorm (with a warning). `cfg` is only used for the size of that norm when given.
    """
    _check_fmt(fmt)
    rules = TABLES[fmt]
    sd = {k: v for k, v in sd.items() if "rope" not in k}
    extras = [t for t in MIM_EXTRAS.get(fmt, ())]
    kept = {}
    for k, v in sd.items():
        if any(_match(k, t) is not None for t in extras):
            if mim is not None:
                mim[k] = v
        else:
            kept[k] = v
    end = _end_theirs(kept, rules)
    out = _convert(kept, _applicable(rules, _blocks_theirs(kept, rules), end), "theirs", "ours", fmt)
    if fmt == "mmpretrain" and end == "headless" and "norm.weight" not in out:
        # mmpretrain's converter drops the MIM `norm` and its headless model has no final norm; the
        # affine part is lost, so tokens are normalised with unit scale and zero shift.
        dim = cfg.dim if cfg is not None else out["cls_token"].shape[-1]
        like = out["cls_token"]
        out["norm.weight"] = torch.ones(dim, dtype=like.dtype)
        out["norm.bias"] = torch.zeros(dim, dtype=like.dtype)
        warnings.warn(
            "mmpretrain headless checkpoint has no final norm (backbone.ln2 absent): using a LayerNorm with "
            "unit scale and zero shift; load the official MIM weights to get the trained final norm",
            stacklevel=2,
        )
    return out


def from_ours(sd: StateDict, fmt: str, cfg: Eva02Config | None = None, mim: dict | None = None) -> StateDict:
    """Convert our state dict to format `fmt` (the inverse of `to_ours`); `mim` tensors are added (official)."""
    _check_fmt(fmt)
    out = _convert(sd, _applicable(TABLES[fmt], _blocks_ours(sd, cfg), _end_ours(sd, cfg)), "ours", "theirs", fmt)
    if mim:
        if fmt != "official":
            raise ValueError(f"MIM tensors (mask_token, lm_head) can only be written in the official format, not {fmt}")
        out.update(mim)
    return out


def _their_templates(fmt: str) -> set[str]:
    return {t for r in TABLES[fmt] for t in r.theirs if t is not None} | set(MIM_EXTRAS.get(fmt, ()))


@functools.cache
def distinctive_templates() -> dict[str, frozenset[str]]:
    """Per format, the key templates of its table that no other format stores (derived from TABLES)."""
    out = {}
    for fmt in FORMATS:
        others = set().union(*(_their_templates(f) for f in FORMATS if f != fmt))
        out[fmt] = frozenset(_their_templates(fmt) - others)
    return out


def detect_format(sd: StateDict) -> str:
    """Tell the checkpoint format from key names, using the conversion tables: the format whose own key
    templates (those no other table has) appear; a file with only shared names is in our layout (which
    is also the official Ti/S fine-tuned layout, key for key)."""
    keys = [k for k in sd if "rope" not in k]  # RoPE buffers are recomputed, whatever the format
    for fmt, templates in distinctive_templates().items():
        if fmt != "eva02" and any(_match(k, t) is not None for k in keys for t in templates):
            return fmt
    if any(_match(k, t) is not None for k in keys for t in _their_templates("eva02") if t.startswith("blocks.")):
        return "eva02"
    shown = ", ".join(keys[:5])
    raise ValueError(f"cannot tell the checkpoint format from its keys ({shown}, ...); pass fmt= or --fmt")


# --------------------------------------------------------------------------------- resampling
def resize_patch(x: Tensor, size: int, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """Resize (..., p, p) patches to (..., size, size): the resize the patch-kernel resampling inverts.

    With antialias, torch's bicubic uses the PIL kernel (a = -0.5) also when upsampling, as images are
    usually resized with PIL; timm resamples patch kernels with the same setting.
    """
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    out = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=antialias)
    return out.reshape(*lead, size, size)


def resample_patch_embed(weight: Tensor, new_size: int, mode: str = "bicubic", antialias: bool = True) -> Tensor:
    """Resize a (D, C, p, p) patch kernel to (D, C, q, q) keeping each token the same (FlexiViT pinv).

    With M the resize matrix (resize(x).flatten() = x.flatten() @ M), the new kernel w' solves M w' = w
    in the least-squares / minimum-norm sense, so <resize(x), w'> = <x, w> for every patch x when
    upsampling (M has full row rank) and as nearly as possible when downsampling.
    """
    D, C, p, _ = weight.shape
    if p == new_size:
        return weight
    basis = torch.eye(p * p, dtype=torch.float64).reshape(p * p, p, p)
    resize = resize_patch(basis, new_size, mode, antialias).reshape(p * p, new_size * new_size)  # M
    pinv = torch.linalg.pinv(resize)  # (q*q, p*p)
    w = weight.reshape(D * C, p * p).to(torch.float64)
    return (w @ pinv.T).reshape(D, C, new_size, new_size).to(weight.dtype)


def fit_to_config(sd: StateDict, cfg: Eva02Config) -> StateDict:
    """Resample the patch kernel and the position embedding of our state dict to `cfg`'s patch and grid."""
    sd = dict(sd)
    pos = sd.get("pos_embed")
    if not cfg.cls_token:  # a dense backbone from a model with a class token: the token and its slot go
        sd.pop("cls_token", None)
        if pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1:
            sd["pos_embed"] = pos[:, 1:]
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4 and w.shape[-1] != cfg.patch_size and w.shape[-1] == w.shape[-2]:
        sd["patch_embed.proj.weight"] = resample_patch_embed(w, cfg.patch_size)
    pos, prefix = sd.get("pos_embed"), cfg.num_prefix
    if pos is not None and pos.ndim == 3 and pos.shape[1] != prefix + cfg.grid**2:
        old = math.isqrt(pos.shape[1] - prefix)
        if old * old != pos.shape[1] - prefix:
            slot = " plus a cls slot" if prefix else ""
            raise ValueError(f"checkpoint pos_embed {tuple(pos.shape)} is not a square grid{slot}")
        sd["pos_embed"] = resample_pos_embed(pos, (old, old), (cfg.grid, cfg.grid), prefix)
    return sd
