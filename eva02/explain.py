"""Visual explanations: where in an image an EVA-02 model looks, as a heat map over its patch grid.

Two methods:
- Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", arXiv
  2005.00928): each block's attention probabilities, averaged over the heads, get the identity added
  for the residual path and their rows renormalised; the product over the blocks (last on the left)
  says how much each token draws on each input token. The map is the class token's row over the
  patches. It needs no head, so it works for every model.
- Grad-CAM (Selvaraju et al. 2017, arXiv 1610.02391) on tokens instead of a convolutional map: the
  gradient of one class logit with respect to the patch tokens a block puts out, averaged over the
  tokens, weights each channel; the ReLU of the weighted sum of channels is the map. Classifiers only;
  the last block by default, the one before it where the head reads the class token (pool='token').

The blocks compute attention with fused SDPA, which returns no weights, so `block_attention`
recomputes the probabilities from a block's input exactly as `eva02.model.layers.Attention` does:
norm1 -> the q and k columns of qkv (q bias, no k bias) -> RoPE -> softmax(q k^T / sqrt(hd)).
Forward pre-hooks hand it each block's input, whatever form (reference or fast) the blocks run in.

`overlay` blends a map, stretched to [0, 1], over the part of the image the model saw
(`model_view`: the image after its preprocessing's crop). Explanations run in the model's dtype,
without autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eva02.data.images import ImageSource, load_image
from eva02.data.transforms import eval_transform, preprocess_for_model, resize_size
from eva02.model.layers import Block
from eva02.model.rope import RopeTables, apply_rope
from eva02.model.vit import Eva02
from eva02.weights.zoo import Preprocess

METHODS = ("attention-rollout", "gradcam")
NO_HEAD = "Grad-CAM explains a class score, and this model has no classifier head; use attention-rollout"


# ---------------------------------------------------------------------------------- attention
def block_attention(blk: Block, x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
    """The attention probabilities (B, h, T, T) that block `blk` computes for its input x (B, T, D)."""
    attn = blk.attn
    B, T, D = x.shape
    h = x if blk.post_norm else blk.norm1(x)  # (B, T, D): what the attention reads (post-norm: the stream)
    # Only the q and k columns of the fused projection are needed; k has no bias.
    bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias)))  # (2D,)
    qk = F.linear(h, attn.qkv.weight[: 2 * D], bias)  # (B, T, 2D)
    q, k = qk.view(B, T, 2, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, hd) each
    if rope is not None:  # (towers without RoPE: CLIP-E)
        q = apply_rope(q, rope.cos, rope.sin)
        k = apply_rope(k, rope.cos, rope.sin)
    scores = (q @ k.transpose(-2, -1)) * attn.head_dim**-0.5  # (B, h, T, T)
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


@contextlib.contextmanager
def block_inputs(model: Eva02, fn: Callable[[int, Block, torch.Tensor, RopeTables], None]) -> Iterator[None]:
    """Within the block, `fn(index, block, x, rope)` sees every block's input before the block runs."""

    def hook_for(i: int, blk: Block):
        def hook(module, args, kwargs) -> None:
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs["rope"]
            fn(i, blk, x, rope)

        return hook

    handles = [blk.register_forward_pre_hook(hook_for(i, blk), with_kwargs=True) for i, blk in enumerate(model.blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(model: Eva02, x: torch.Tensor, fuse_heads: bool = True) -> list[torch.Tensor]:
    """Every block's attention probabilities for images x (B, 3, H, W), first block first:
    (B, T, T) averaged over the heads, or (B, h, T, T) with `fuse_heads=False`. T = 1 + patches."""
    maps: list[torch.Tensor] = []

    def keep(i: int, blk: Block, tokens: torch.Tensor, rope: RopeTables) -> None:
        probs = block_attention(blk, tokens, rope)  # (B, h, T, T)
        maps.append(probs.mean(dim=1) if fuse_heads else probs)

    with torch.no_grad(), block_inputs(model, keep):
        model.forward_features(x.to(_device_of(model)))
    return maps


def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Head-averaged attentions [(B, T, T)], first block first -> their rollout (B, T, T).

    Each block: A' = (A + I) / rowsum(A + I), the residual path counted as attention to oneself;
    then R = A'_L ... A'_2 A'_1, so row t of R says how much token t draws on each input token.
    """
    B, T, _ = attentions[0].shape
    eye = torch.eye(T, dtype=attentions[0].dtype, device=attentions[0].device)
    result = eye.expand(B, T, T)
    for a in attentions:
        a = a + eye
        result = (a / a.sum(dim=-1, keepdim=True)) @ result  # (B, T, T)
    return result


def attention_rollout(model: Eva02, x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) -> rollout maps (B, H/p, W/p): the class token's row over the patches."""
    grid = model.grid_of(x)
    r = rollout(attention_maps(model, x))  # (B, T, T)
    return r[:, 0, 1:].reshape(r.shape[0], *grid)


# ------------------------------------------------------------------------------------ Grad-CAM
def gradcam(
    model: Eva02, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) -> (Grad-CAM maps (B, H/p, W/p) >= 0, the class explained per image (B,)).

    Args:
        target: the class whose logit is explained, one for all images or one per image (a list
            may hold None for some); None: each image's top class.
        block: whose output tokens are weighted by their gradient; default: the last block whose patch
            tokens reach the head (see `gradcam_block`).
    """
    if not model.is_classifier:
        raise ValueError(NO_HEAD)
    j = gradcam_block(model, block)
    x = x.to(_device_of(model))
    grid = model.grid_of(x)
    # The blocks up to `block` run once without a graph; only the part after it is differentiated.
    with torch.inference_mode(False):
        with torch.no_grad():
            (tokens,) = model.extract_feat(x, out_type="raw", out_indices=(j,))  # (B, 1+N, D)
        acts = tokens.clone().requires_grad_(True)
        with torch.enable_grad():
            t = acts
            rope = model.rope_for(grid, x.device)
            for blk in model.blocks[j + 1 :]:
                t = blk(t, rope)  # the reference form: the same maths as the model's own call
            logits = model.forward_head(model.norm(t))  # (B, C), as model(x)
            classes = _targets(target, logits)
            score = logits.gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(score, acts)  # (B, 1+N, D)
    weights = grad[:, 1:].mean(dim=1, keepdim=True)  # (B, 1, D): mean gradient per channel
    cam = (acts.detach()[:, 1:] * weights).sum(dim=-1).clamp_min(0)  # (B, N)
    return cam.reshape(cam.shape[0], *grid), classes


def gradcam_block(model: Eva02, block: int | None = None) -> int:
    """The index of the block whose output Grad-CAM weights: `block` checked, or by default the last one
    whose patch tokens reach the head. A class-token-pooled head (pool='token') reads the class token
    alone, after the last block, so that block's patch tokens get no gradient and their map would be
    all zeros: such models default to the block before the last."""
    n = len(model.blocks)
    token = model.cfg.pool == "token"
    if block is None:
        if token and n < 2:
            raise ValueError("Grad-CAM of a class-token-pooled model needs a block before the last; this one has 1")
        block = -2 if token else -1
    j = block + n if block < 0 else block
    if not 0 <= j < n:
        raise IndexError(f"block {block} is out of range for a {n}-block model")
    if token and j == n - 1:
        raise ValueError(
            "the last block's patch tokens do not reach a class-token-pooled head (their gradient is 0); "
            "use an earlier block, e.g. block=-2"
        )
    return j


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    """The class to explain per image (B,): given, or each image's top class where the target (or its
    entry for that image) is None; checked against the head."""
    B, C = logits.shape
    top = logits.argmax(dim=-1)  # (B,)
    if target is None:
        return top
    if isinstance(target, (list, tuple)) and len(target) == B and None in target:
        target = [int(top[i]) if t is None else t for i, t in enumerate(target)]
    classes = torch.as_tensor(target, dtype=torch.long, device=logits.device).flatten()
    if classes.numel() == 1:
        classes = classes.expand(B)
    if classes.numel() != B:
        raise ValueError(f"give one target class or one per image ({B}), got {classes.numel()}")
    bad = classes[(classes < 0) | (classes >= C)]
    if bad.numel():
        raise ValueError(f"target class {int(bad[0])} is out of range: the model has classes 0 to {C - 1}")
    return classes


# ----------------------------------------------------------------------------------- together
def explain(
    model: Eva02, x: torch.Tensor, method: str = "attention-rollout", target=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (B, 3, H, W) -> (maps (B, H/p, W/p) stretched to [0, 1], classes explained (B,) or None)."""
    if method == "attention-rollout":
        if target is not None:
            raise ValueError("attention rollout does not depend on a class; a target class applies to gradcam only")
        return normalise(attention_rollout(model, x)), None
    if method == "gradcam":
        maps, classes = gradcam(model, x, target)
        return normalise(maps), classes
    raise ValueError(f"unknown explanation method {method!r}; one of {', '.join(METHODS)}")


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Stretch each map (B, H, W) to [0, 1], min to max; a constant map (no information) becomes 0."""
    flat = maps.detach().float().flatten(1)  # (B, HW)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(span.dtype).tiny), torch.zeros_like(flat))
    return out.reshape(maps.shape)


# ------------------------------------------------------------------------------------- images
def model_view(image: Image.Image, pre: Preprocess) -> Image.Image:
    """The part of `image` the model sees after `pre`'s crop, at the image's own resolution."""
    if pre.crop_mode == "squash":
        return image
    W, H = image.size
    side = round(min(W, H) * pre.img_size / resize_size(pre))  # the centre crop's side in the image's pixels
    left, top = round((W - side) / 2), round((H - side) / 2)
    return image.crop((left, top, left + side, top + side))


# Colour map anchors (value, RGB): dark blue through cyan and yellow to dark red, brighter where hotter.
_ANCHORS = np.array([0.0, 0.2, 0.45, 0.7, 0.88, 1.0])
_COLOURS = np.array(
    [[35, 23, 80], [40, 100, 220], [30, 200, 200], [240, 220, 40], [240, 100, 20], [150, 10, 10]], dtype=np.float32
)


def colourise(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB colours (H, W, 3) float32 in [0, 255]."""
    v = np.clip(heat, 0.0, 1.0)
    return np.stack([np.interp(v, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def overlay(view: Image.Image, heat: np.ndarray | torch.Tensor, alpha: float = 0.5, max_side: int = 512) -> Image.Image:
    """A map (h, w) in [0, 1] stretched smoothly over `view`, colourised and blended with weight `alpha`;
    the result's longest side is at most `max_side` pixels."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    img = view.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    heat = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]  # (1, 1, h, w)
    up = F.interpolate(heat, size=(img.height, img.width), mode="bilinear", align_corners=False)[0, 0].numpy()
    blended = np.asarray(img, dtype=np.float32) * (1.0 - alpha) + colourise(up) * alpha  # (H, W, 3)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


@dataclass
class Explanation:
    """One image's explanation: the map over the patch grid, the class explained, and the drawing."""

    method: str
    heat: np.ndarray  # (H/p, W/p) float32 in [0, 1]
    target: int | None  # the class explained (gradcam), None for attention rollout
    image: Image.Image  # the map blended over the image region the model saw


def explain_image(
    model: Eva02,
    image: ImageSource,
    method: str = "attention-rollout",
    target: int | None = None,
    preprocess: Preprocess | None = None,
    alpha: float = 0.5,
) -> Explanation:
    """Explain one image (a path, PIL image, array or tensor) with a loaded model."""
    pre = preprocess or preprocess_for_model(model)
    img = load_image(image)
    x = eval_transform(pre)(img)[None]  # (1, 3, S, S)
    maps, classes = explain(model, x, method, target)
    heat = maps[0].cpu().numpy()
    return Explanation(
        method, heat, None if classes is None else int(classes[0]), overlay(model_view(img, pre), heat, alpha)
    )


def _device_of(model: Eva02) -> torch.device:
    return next(model.parameters()).device
