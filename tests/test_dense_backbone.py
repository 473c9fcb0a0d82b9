"""The dense EVA-02 backbone (ViTDet layout): window attention with global blocks, RoPE per window, no
class token; checked in float64 against global attention under a block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from eva02.model import fast
from eva02.model.config import VARIANTS
from eva02.model.layers import Windows
from eva02.model.rope import RopeTables, rope_complex, rope_tables
from eva02.model.vit import Eva02

D64 = torch.float64


def dense_cfg(img: int, window: int, global_blocks=(1,), depth: int = 2):
    return VARIANTS["test"].replace(
        img_size=img, depth=depth, cls_token=False, window_size=window, global_blocks=tuple(global_blocks)
    )


def model64(cfg) -> Eva02:
    torch.manual_seed(0)
    m = Eva02(cfg).to(D64).eval()
    with torch.no_grad():  # non-zero q/v biases, so that padded keys (zeros before the projection) would matter
        for blk in m.blocks:
            blk.attn.q_bias.normal_(0, 0.5)
            blk.attn.v_bias.normal_(0, 0.5)
    return m


def test_a_window_as_large_as_the_grid_is_global_attention() -> None:
    win = model64(dense_cfg(56, 4, global_blocks=()))
    glob = Eva02(dense_cfg(56, 0, global_blocks=())).to(D64).eval()
    glob.load_state_dict(win.state_dict())
    x = torch.randn(2, 3, 56, 56, dtype=D64)
    with torch.no_grad():
        torch.testing.assert_close(win.forward_features(x), glob.forward_features(x), rtol=1e-12, atol=1e-12)


def _window_reference(attn, x: torch.Tensor, grid: tuple[int, int], size: int, head_dim: int) -> torch.Tensor:
    """Global attention over the real tokens only, each token rotated by its position inside its window,
    attending only to tokens of its own window (a block-diagonal mask)."""
    H, W = grid
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    window_id = (rows // size) * 10_000 + cols // size
    cos_w, sin_w = rope_tables((size, size), head_dim, 16, 10000.0, num_prefix=0, dtype=D64)
    local = (rows % size) * size + cols % size
    cos, sin = cos_w[local], sin_w[local]
    rope = RopeTables(cos, sin, rope_complex(cos, sin))
    mask = (window_id[:, None] == window_id[None, :])[None, None]  # (1, 1, N, N)
    return attn(x, rope, mask.expand(x.shape[0], 1, -1, -1))


@pytest.mark.parametrize("grid,size", [((8, 8), 4), ((6, 7), 4), ((5, 5), 3)])
def test_windowed_attention_equals_masked_global_attention(grid, size) -> None:
    """Divisible and padded grids: padding never reaches a real token (the masked keys)."""
    m = model64(dense_cfg(56, size))
    attn, hd = m.blocks[0].attn, m.cfg.head_dim
    B, D = 2, m.cfg.dim
    x = torch.randn(B, grid[0] * grid[1], D, dtype=D64)
    win = Windows(grid, size, B, True, x.device)
    cos, sin = rope_tables((size, size), hd, 16, 10000.0, num_prefix=0, dtype=D64)
    with torch.no_grad():
        out = win.merge(attn(win.split(x), RopeTables(cos, sin, rope_complex(cos, sin)), win.mask))
        ref = _window_reference(attn, x, grid, size, hd)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_unmasked_padding_is_vitdet_and_differs_only_with_padding() -> None:
    m = model64(dense_cfg(56, 4))
    attn, B, D = m.blocks[0].attn, 1, m.cfg.dim
    cos, sin = rope_tables((4, 4), m.cfg.head_dim, 16, 10000.0, num_prefix=0, dtype=D64)
    rope = RopeTables(cos, sin, rope_complex(cos, sin))
    for grid, differs in (((8, 8), False), ((6, 6), True)):
        x = torch.randn(B, grid[0] * grid[1], D, dtype=D64)
        masked, plain = Windows(grid, 4, B, True, x.device), Windows(grid, 4, B, False, x.device)
        with torch.no_grad():
            a = masked.merge(attn(masked.split(x), rope, masked.mask))
            b = plain.merge(attn(plain.split(x), rope, plain.mask))
        assert (not torch.equal(a, b)) == differs


@pytest.mark.parametrize("img", [56, 84])  # a 4x4 grid in 4x4 windows... and a 6x6 grid (padded)
def test_every_fast_form_equals_the_reference(img: int) -> None:
    m = model64(dense_cfg(img, 4))
    x = torch.randn(2, 3, img, img, dtype=D64)
    with torch.no_grad():
        with fast.use(None):
            ref = m.forward_features(x)
        torch.testing.assert_close(m.forward_features(x), ref, rtol=1e-12, atol=1e-12)  # Inference
    m.train()
    grads = []
    for path in (None, fast.Training(), fast.Traced()):
        m.zero_grad()
        with fast.use(path):
            m.forward_features(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_class_token_and_checkpoints_with_one_load() -> None:
    from eva02.weights.convert import fit_to_config

    cfg = dense_cfg(112, 4, global_blocks=(1,))
    m = Eva02(cfg)
    assert m.cls_token is None and m.pos_embed.shape == (1, 8 * 8, cfg.dim)
    headless = Eva02(VARIANTS["test"].replace(depth=2)).state_dict()  # 56 px, 4x4 grid + a cls slot
    m.load_state_dict(fit_to_config(headless, cfg))
    x = torch.randn(1, 3, 112, 112)
    assert m.forward_features(x).shape == (1, 64, cfg.dim)
    (fmap,) = m.extract_feat(x, out_type="featmap")
    assert fmap.shape == (1, cfg.dim, 8, 8)
    with pytest.raises(ValueError, match="no class token"):
        m.extract_feat(x, out_type="cls_token")


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="cls_token=False"):
        VARIANTS["test"].replace(window_size=4)
    with pytest.raises(ValueError, match="global_blocks"):
        dense_cfg(56, 4, global_blocks=(7,))


def test_the_model_rotates_each_window_by_its_own_positions() -> None:
    """A windowed block of the model equals the block-diagonal reference with window-local RoPE."""
    m = model64(dense_cfg(84, 4))  # 6x6 grid: padded windows
    x = torch.randn(2, 3, 84, 84, dtype=D64)
    with torch.no_grad():
        tokens = m.prepare_tokens(x)
        _, (out0,) = m.forward_tokens(tokens, (6, 6), [0])
        blk = m.blocks[0]
        h = tokens + _window_reference(blk.attn, blk.norm1(tokens), (6, 6), 4, m.cfg.head_dim)
        ref = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(out0, ref, rtol=1e-7, atol=1e-7)  # the model's RoPE tables are fp32


# ------------------------------------------------------------------------------- simple pyramid
def test_official_global_blocks() -> None:
    from eva02.model.config import dense_config

    assert dense_config(VARIANTS["base"], 1024).global_blocks == (2, 5, 8, 11)
    assert dense_config(VARIANTS["large"], 1024).global_blocks == (5, 11, 17, 23)
    cfg = dense_config(VARIANTS["large"], 640)
    assert (cfg.grid, cfg.patch_size, cfg.window_size, cfg.cls_token) == (40, 16, 16, False)


@pytest.mark.parametrize("img,grid", [(512, 32), (640, 40), (560, 35)])
def test_pyramid_shapes(img: int, grid: int) -> None:
    """Strides 4, 8, 16, 32 (and 64) of 256 channels at 512 and 640 px and on an odd grid (35: padded
    windows, pooling rounding down)."""
    from eva02.model.config import dense_config
    from eva02.model.dense import DenseBackbone, SimpleFeaturePyramid

    cfg = dense_config(VARIANTS["test"].replace(depth=2), img, window_size=16, global_blocks=(1,))
    net = DenseBackbone(Eva02(cfg), SimpleFeaturePyramid(cfg.dim, 16, 256, top_level=True)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, img, img))
    sides = {"p2": grid * 4, "p3": grid * 2, "p4": grid, "p5": grid // 2, "p6": -(-(grid // 2) // 2)}
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] == net.pyramid.levels
    for level, side in sides.items():
        assert out[level].shape == (1, 256, side, side), level
