"""Checks that the explanation maps of eva02/explain.py mean what they claim.

1. Attention: the per-block attention probabilities that rollout is built from equal the post-softmax
   attention timm's own `AttentionExtract` pulls out of timm's `Eva` (built with fused attention off,
   so the softmax is an op to trace), for random-weight models converted into ours; so does the rollout.
2. The quadrant test: a small model trained here on images whose class evidence (a square lifted in
   one colour channel) lies in one random quadrant; attention rollout and Grad-CAM, through the public
   API, must put their mass in that quadrant (chance: a quarter).
"""

from __future__ import annotations

import pytest
import torch

from eva02 import explain as ex
from eva02.model import fast
from eva02.model.config import CLIP_VARIANTS, VARIANTS, Eva02Config
from eva02.model.vit import Eva02
from eva02.weights.convert import to_ours

# ------------------------------------------------------------------------------ against timm
# timm model name -> our config of the same layout, cut to 3 blocks at 112 px (CLIP towers narrowed).
LAYOUTS = {
    "eva02_tiny_patch14_224": VARIANTS["tiny"].replace(depth=3, img_size=112, num_classes=10),
    "eva02_base_patch16_clip_224": CLIP_VARIANTS["B-16"].vision.replace(
        depth=3, dim=128, heads=2, mlp_hidden=341, img_size=112, num_classes=32
    ),  # separate q/k/v projections, inner attention norm, class-token pooling
    "eva02_enormous_patch14_clip_224": CLIP_VARIANTS["E-14"].vision.replace(
        depth=3, dim=128, heads=2, mlp_hidden=512, img_size=112, num_classes=32
    ),  # post-norm blocks, no RoPE
}
ATOL = 1e-5  # float32 noise on probabilities in [0, 1]


def timm_eva(name: str, cfg: Eva02Config) -> torch.nn.Module:
    """timm's `Eva` of layout `name` at `cfg`'s sizes, random weights, attention computed unfused."""
    timm = pytest.importorskip("timm")
    from timm.layers import set_fused_attn, use_fused_attn

    was = use_fused_attn()
    set_fused_attn(False)  # read when the attention modules are built
    try:
        torch.manual_seed(0)
        model = timm.create_model(
            name, pretrained=False, num_classes=cfg.num_classes, depth=cfg.depth, img_size=cfg.img_size,
            embed_dim=cfg.dim, num_heads=cfg.heads, mlp_ratio=cfg.mlp_hidden / cfg.dim,
        ).eval()  # fmt: skip
    finally:
        set_fused_attn(was)
    assert not any(blk.attn.fused_attn for blk in model.blocks)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms off their init values: every tensor counts
            p.add_(torch.randn_like(p) * 0.02)
        for blk in model.blocks:  # larger q and k: peaked attention, far from uniform
            a = blk.attn
            if a.qkv is not None:
                a.qkv.weight[: 2 * cfg.dim].mul_(4.0)
                a.q_bias.normal_(0, 0.5)
            else:
                a.q_proj.weight.mul_(4.0)
                a.k_proj.weight.mul_(4.0)
                if a.q_proj.bias is not None:
                    a.q_proj.bias.normal_(0, 0.5)
    return model


def plain_rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Rollout by the paper from per-head maps [(B, h, T, T)]: R = prod_l (A_l / 2 + I / 2), last on the left."""
    B, _, T, _ = attentions[0].shape
    eye = torch.eye(T, dtype=attentions[0].dtype)
    r = eye.expand(B, T, T)
    for a in attentions:
        r = (0.5 * a.mean(dim=1) + 0.5 * eye) @ r  # a's rows sum to 1, so the mix's rows do too
    return r


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_attention_and_rollout_equal_timms_extracted_attention(name: str) -> None:
    cfg = LAYOUTS[name]
    tm = timm_eva(name, cfg)  # skips without timm
    from timm.utils import AttentionExtract

    ours = Eva02(cfg).eval()
    ours.load_state_dict(to_ours(tm.state_dict(), "timm", cfg), strict=True)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    extract = AttentionExtract(tm)  # torch.fx: the output of every block's attention softmax
    assert extract.names == [f"blocks.{i}.attn.softmax" for i in range(cfg.depth)]
    with torch.no_grad():
        theirs = list(extract(x).values())  # [(B, h, T, T)], first block first
    mine = ex.attention_maps(ours, x, fuse_heads=False)
    T = 1 + cfg.grid**2
    assert len(mine) == len(theirs) == cfg.depth
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert a.shape == b.shape == (2, cfg.heads, T, T)
        assert b.amax(-1).mean() > 5.0 / T, f"block {i}: timm's attention is too flat to tell anything apart"
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, i=i: f"block {i}: {m}")
    fused = ex.attention_maps(ours, x)  # the head-averaged maps rollout uses
    for a, b in zip(fused, theirs, strict=True):
        torch.testing.assert_close(a, b.mean(1), atol=ATOL, rtol=0)
    want = plain_rollout(theirs)  # (B, T, T)
    torch.testing.assert_close(ex.rollout(fused), want, atol=ATOL, rtol=0)
    got = ex.attention_rollout(ours, x)  # (B, g, g): the class token's row over the patches
    torch.testing.assert_close(got, want[:, 0, 1:].reshape(2, cfg.grid, cfg.grid), atol=ATOL, rtol=0)
    if cfg.rope:  # the comparison sees RoPE: attention computed without it is far off timm's
        unrotated = []
        with (
            torch.no_grad(),
            ex.block_inputs(ours, lambda i, blk, t, rope: unrotated.append(ex.block_attention(blk, t, None))),
        ):
            ours.forward_features(x)
        assert max((a - b).abs().max().item() for a, b in zip(unrotated, theirs, strict=True)) > 100 * ATOL


def test_gradcam_of_a_class_token_head_weights_the_block_before_the_last() -> None:
    """A class-token-pooled head reads the class token alone after the last block, so that block's patch
    tokens get no gradient and Grad-CAM there is all zeros: the default is the block before the last."""
    torch.manual_seed(0)
    model = Eva02(VARIANTS["test"].replace(depth=3, num_classes=5, pool="token")).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    outputs = []
    handle = model.blocks[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    with fast.use(None):  # the reference blocks, whose outputs the hook sees
        logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), outputs[0])  # (B, 1+N, D)
    assert grad[:, 1:].abs().max() == 0 and grad[:, 0].abs().max() > 0
    maps, classes = ex.gradcam(model, x)
    torch.testing.assert_close(maps, ex.gradcam(model, x, block=-2)[0], rtol=0, atol=0)
    assert ex.gradcam_block(model) == 1 and (maps.flatten(1).amax(1) > 0).all()
    with pytest.raises(ValueError, match="do not reach a class-token-pooled head"):
        ex.gradcam(model, x, block=-1)
    one = Eva02(VARIANTS["test"].replace(depth=1, num_classes=5, pool="token")).eval()
    with pytest.raises(ValueError, match="needs a block before the last"):
        ex.gradcam(one, x)
    assert ex.gradcam_block(Eva02(VARIANTS["test"].replace(num_classes=5))) == 1  # mean pooling: the last


# ------------------------------------------------------------------------------ the quadrant test
SIDE, PATCH, SPOT, LIFT = 64, 8, 24, 1.0  # an 8 x 8 grid; the evidence is a 24 px square, 3 x 3 patches or more
CLASSES = 3  # the class is the colour channel lifted by LIFT inside the square


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n noise images (n, 3, SIDE, SIDE), each with a square lifted in one colour channel somewhere inside
    one random quadrant -> (images, classes (n,): the channel, quadrants (n,): 0 1 / 2 3, row by row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIDE, SIDE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    quad = torch.randint(0, 4, (n,), generator=g)
    half = SIDE // 2
    top = (quad // 2) * half + torch.randint(0, half - SPOT + 1, (n,), generator=g)
    left = (quad % 2) * half + torch.randint(0, half - SPOT + 1, (n,), generator=g)
    for i in range(n):
        x[i, y[i], top[i] : top[i] + SPOT, left[i] : left[i] + SPOT] += LIFT
    return x, y, quad


def train_quadrant_model(pool: str, seed: int, steps: int, batch: int = 32) -> Eva02:
    """A 2-block EVA-02 (dim 64) trained from scratch on fresh quadrant images; eval mode."""
    cfg = Eva02Config(
        dim=64, depth=2, heads=2, mlp_hidden=170, img_size=SIDE, patch_size=PATCH, num_classes=CLASSES, pool=pool
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: more threads only contend on a shared machine
    try:
        torch.manual_seed(seed)
        model = Eva02(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        for step in range(steps):
            x, y, _ = quadrant_images(batch, seed=1000 * seed + step + 1)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def quadrant_shares(maps: torch.Tensor) -> torch.Tensor:
    """Maps (B, g, g) >= 0 -> each quadrant's share of the map's mass (B, 4), quadrants row by row."""
    B, h, w = maps.shape
    mass = maps.reshape(B, 2, h // 2, 2, w // 2).sum(dim=(2, 4)).reshape(B, 4)
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


STEPS = {"avg": 40, "token": 80}  # the class token learns to single out the square more slowly


def evidence_figures(model: Eva02, method: str, seed: int) -> dict[str, float]:
    """Explain 64 held-out quadrant images: held-out accuracy and where the maps' mass lies."""
    x, y, quad = quadrant_images(64, seed=-1 - seed)  # held out: training batches use positive seeds
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).float().mean().item()
    maps, _ = ex.explain(model, x, method)  # (64, 8, 8) in [0, 1], as drawn
    shares = quadrant_shares(maps)  # (64, 4)
    own = shares.gather(1, quad[:, None])[:, 0]  # (64,): the evidence quadrant's share; chance is 0.25
    return {
        "accuracy": accuracy,
        "mean share": own.mean().item(),
        "images over 1/3": (own > 1 / 3).float().mean().item(),
        "images where it is the largest": (shares.argmax(1) == quad).float().mean().item(),
    }


def check_maps_find_the_quadrant(pool: str, method: str, seed: int) -> dict[str, float]:
    """Train, check the model learned, then the maps: the evidence quadrant holds the largest share of
    the mass in at least 85% of the images and 1.5 times chance on average. The untrained model's maps
    do not, so the maps follow what was learned, not the square's mere brightness."""
    untrained = evidence_figures(train_quadrant_model(pool, seed, steps=0), method, seed)
    assert untrained["mean share"] < 0.3 and untrained["images where it is the largest"] < 0.6, untrained
    figures = evidence_figures(train_quadrant_model(pool, seed, steps=STEPS[pool]), method, seed)
    assert figures["accuracy"] >= 0.95, f"the model did not learn the task: {figures}"
    assert figures["images where it is the largest"] >= 0.85, figures
    assert figures["mean share"] > 1.5 * 0.25, figures
    return figures


def test_gradcam_mass_lies_in_the_evidence_quadrant() -> None:
    """EVA-02's own classifier layout (mean of the patch tokens): Grad-CAM at the last block."""
    check_maps_find_the_quadrant("avg", "gradcam", seed=0)


def test_attention_rollout_mass_lies_in_the_evidence_quadrant() -> None:
    """Class-token pooling (the EVA-02-CLIP towers' layout), where the answer goes through the class
    token's attention, so the class token's rollout row is the path to it."""
    check_maps_find_the_quadrant("token", "attention-rollout", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("pool,method", [("avg", "gradcam"), ("token", "attention-rollout")])
def test_maps_find_the_quadrant_whatever_the_seed(pool: str, method: str, seed: int) -> None:
    check_maps_find_the_quadrant(pool, method, seed)
