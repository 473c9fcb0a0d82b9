"""MAC and parameter counting: the page's Flops column, mmpretrain's exact metafile numbers, hand arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eva02.flops import MacCounter, count_flops, count_flops_by_op, count_params, mmpretrain_macs, mmpretrain_params
from eva02.model import VARIANTS, Eva02
from eva02.weights.zoo import ZOO

# mmpretrain configs/eva02/metafile.yml: (Parameters, FLOPs) per model, keyed by our page name.
METAFILE = {
    "eva02-tiny-p14_in21k-pre_3rdparty_in21k": (5_504_064, 1_703_439_360),
    "eva02-tiny-p14_in21k-pre_3rdparty_in1k": (5_758_888, 4_675_416_000),
    "eva02-small-p14_in21k-pre_3rdparty_in21k": (21_624_960, 6_135_404_544),
    "eva02-small-p14_in21k-pre_3rdparty_in1k": (22_133_608, 15_476_744_064),
    "eva02-base-p14_in21k-pre_3rdparty_in21k": (85_766_400, 23_216_492_544),
    "eva02-base-p14_in21k-pre_3rdparty_in1k": (87_126_760, 107_105_984_256),
    "eva02-base-p14_in21k-pre_in21k-medft_3rdparty_in1k": (87_126_760, 107_105_984_256),
    "eva02-large-p14_in21k-pre_3rdparty_in21k": (303_291_328, 81_146_703_792),
    "eva02-large-p14_m38m-pre_3rdparty_m38m": (303_291_328, 81_146_703_792),
    "eva02-large-p14_in21k-pre_in21k-medft_3rdparty_in1k": (305_104_808, 362_333_836_208),
    "eva02-large-p14_m38m-pre_in21k-medft_3rdparty_in1k": (305_104_808, 362_333_836_208),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_flops_within_one_percent_of_the_page(name):
    e = ZOO[name]
    g = count_flops(e.cfg) / 1e9
    assert abs(g - e.page_flops_g) / e.page_flops_g < 0.01, (g, e.page_flops_g)


@pytest.mark.parametrize("name", sorted(METAFILE))
def test_mmpretrain_conventions_reproduce_the_metafile_exactly(name):
    params, macs = METAFILE[name]
    cfg = ZOO[name].cfg
    assert mmpretrain_params(cfg) == params
    assert mmpretrain_macs(cfg) == macs


def _hand_macs(dim: int, depth: int, hidden: int, sub_ln: bool, img: int, patch: int, classes: int) -> int:
    """The fvcore convention written out for the EVA-02 layer list, independently of the counter."""
    n = (img // patch) ** 2
    t = n + 1
    conv = n * dim * 3 * patch * patch
    linear = t * dim * (3 * dim + dim + 2 * hidden) + t * hidden * dim  # qkv, proj, w12, w3
    attn = 2 * t * t * dim  # q @ k^T and attn @ v over all heads
    norms = 5 * t * dim * 2 + (5 * t * hidden if sub_ln else 0)
    tail = 5 * dim + dim * classes if classes else 5 * t * dim  # fc_norm + head, or the per-token norm
    return conv + depth * (linear + attn + norms) + tail


@pytest.mark.parametrize("size", ["test", "tiny", "base"])
@pytest.mark.parametrize("classes", [0, 10])
def test_count_matches_hand_arithmetic(size, classes):
    cfg = VARIANTS[size].replace(num_classes=classes, img_size=112)
    expected = _hand_macs(cfg.dim, cfg.depth, cfg.mlp_hidden, cfg.sub_ln, 112, cfg.patch_size, classes)
    assert count_flops(cfg) == expected


def test_batch_size_and_img_size_scale_the_count():
    cfg = VARIANTS["test"]
    one = count_flops(cfg)
    assert count_flops(cfg, batch=3) == 3 * one
    assert count_flops(cfg, img_size=112) == count_flops(cfg.replace(img_size=112)) > one
    with pytest.raises(ValueError, match="batch"):
        count_flops(cfg, batch=0)


def test_real_cpu_forward_counts_like_the_meta_model():
    # On CPU, SDPA runs a fused kernel; on the meta device it decomposes into bmm: same MACs either way.
    cfg = VARIANTS["test"].replace(num_classes=7)
    model = Eva02(cfg).eval()
    counter = MacCounter()
    with torch.no_grad(), counter:
        model(torch.randn(2, 3, 56, 56))
    assert counter.by_op == count_flops_by_op(cfg, batch=2)
    assert count_flops(model) == count_flops(cfg)  # a model instance is counted through its config
    assert count_params(model) == count_params(cfg) == sum(p.numel() for p in model.state_dict().values())


def test_by_op_categories():
    cfg = VARIANTS["test"]
    by_op = count_flops_by_op(cfg)
    assert set(by_op) == {"matmul", "conv", "norm"}
    assert by_op["conv"] == 16 * cfg.dim * 3 * 14 * 14  # 4x4 patches of 14x14x3 pixels
    assert sum(by_op.values()) == count_flops(cfg)


def test_other_modules_count_linear_and_conv():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    expected = 8 * 8 * 8 * 3 * 9 + 8 * 8 * 8 * 5
    assert count_flops(net, img_size=8) == expected
    assert count_flops(net, img_size=8, batch=2) == 2 * expected
    with pytest.raises(ValueError, match="img_size"):
        count_flops(net)
    up = nn.ConvTranspose2d(3, 4, 2, stride=2)  # every input pixel feeds 4 channels x 2x2 outputs
    assert count_flops(up, img_size=5) == 5 * 5 * 3 * 4 * 2 * 2


def test_params_do_not_include_the_zero_k_bias_buffer():
    cfg = VARIANTS["tiny"].replace(num_classes=1000, img_size=336)
    model_names = {n for n, _ in Eva02(VARIANTS["test"]).named_parameters()}
    assert not any("k_bias" in n for n in model_names)
    assert count_params(cfg) == 5_756_584
    assert mmpretrain_params(cfg) == 5_756_584 + 12 * 192
