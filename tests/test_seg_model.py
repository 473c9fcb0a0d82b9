"""The segmentor (EVA-02 + UperNet + FCN auxiliary head): the official structure and shapes, the backbone
features, sliding-window and augmented inference, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eva02.model.config import VARIANTS, dense_config
from eva02.model.seg import Segmentor, SegmentorConfig, UPerHead, default_out_indices


def small(num_classes: int = 5, windowed: bool = True, img: int = 64, **kw) -> Segmentor:
    base = VARIANTS["test"].replace(img_size=img, patch_size=16, depth=4)
    backbone = dense_config(base, img, window_size=2, global_blocks=(1, 3)) if windowed else base
    torch.manual_seed(0)
    return Segmentor(SegmentorConfig(backbone, num_classes, **{"channels": 32, "aux_channels": 16, **kw}))


def test_official_out_indices() -> None:
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)
    assert default_out_indices(2) == (0, 0, 0, 1)


def test_official_base_structure() -> None:
    """EVA-02-B UperNet at 512 px: the mmseg module sizes (meta device: no memory, no init)."""
    with torch.device("meta"):
        m = Segmentor(SegmentorConfig(VARIANTS["base"].replace(img_size=512, patch_size=16), 150))
    head = m.decode_head
    assert m.cfg.out_indices == (3, 5, 7, 11) and m.cfg.backbone.cls_token and not m.cfg.backbone.window_size
    assert [s[0].output_size for s in head.psp.stages] == [1, 2, 3, 6]
    assert head.bottleneck.conv.weight.shape == (768, 768 + 4 * 768, 3, 3)
    assert head.fpn_bottleneck.conv.weight.shape == (768, 4 * 768, 3, 3)
    assert head.cls.conv_seg.weight.shape == (150, 768, 1, 1)
    assert m.auxiliary_head.convs.conv.weight.shape == (256, 768, 3, 3)
    assert m.neck.fpn1[0].weight.shape == (768, 768, 2, 2) and m.neck.fpn2.weight.shape == (768, 768, 2, 2)
    assert not any(k.startswith("backbone.norm.") for k in m.state_dict())  # raw block outputs, no final norm
    assert all(c.bias is None for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3))


@pytest.mark.parametrize("windowed", [True, False])
def test_shapes_at_strides_4_to_32(windowed: bool) -> None:
    m = small(windowed=windowed)
    x = torch.randn(2, 3, 64, 96)  # a grid of 4 x 6 (windows of 2)
    feats = m.features(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    logits, aux = m(x, aux=True)
    assert logits.shape == (2, 5, 16, 24) and aux.shape == (2, 5, 4, 6)
    assert m(x).shape == logits.shape


def test_features_are_the_raw_outputs_of_the_chosen_blocks() -> None:
    m = small(windowed=False, out_indices=(0, 1, 2, 3)).eval()  # the class token attends, it is no position
    x = torch.randn(1, 3, 64, 64)
    vit = m.backbone
    with torch.no_grad():
        _, outs = vit.forward_tokens(vit.prepare_tokens(x), (4, 4), [2, 3])
        feats = m.features(x)
    block2, block3 = (t[:, 1:].transpose(1, 2).reshape(1, -1, 4, 4) for t in outs)
    torch.testing.assert_close(feats[2], block2)  # fpn3 is the identity
    torch.testing.assert_close(feats[3], F.max_pool2d(block3, 2))


def test_uperhead_fuses_top_down() -> None:
    """A change in the coarsest map reaches every position of the output (PPM and top-down path)."""
    torch.manual_seed(0)
    head = UPerHead([8, 8, 8, 8], 16, 3, dropout=0.0).eval()
    feats = [torch.randn(1, 8, 16 // 2**i, 16 // 2**i) for i in range(4)]
    with torch.no_grad():
        a = head(feats)
        feats[3] = feats[3] + 1.0
        b = head(feats)
    assert a.shape == (1, 3, 16, 16)
    assert bool(((a - b).abs() > 0).all())


def test_no_auxiliary_head() -> None:
    m = small(aux_channels=0)
    assert m.auxiliary_head is None
    logits, aux = m(torch.randn(2, 3, 64, 64), aux=True)
    assert aux is None and logits.shape == (2, 5, 16, 16)


def test_config_round_trip_and_checks() -> None:
    cfg = small().cfg
    assert SegmentorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="out_indices"):
        SegmentorConfig(cfg.backbone, 5, out_indices=(0, 1, 9, 3))
    with pytest.raises(ValueError, match="headless"):
        SegmentorConfig(VARIANTS["test"].replace(num_classes=10), 5)


class _Pointwise(Segmentor):
    """A segmentor whose logits are a fixed per-pixel function of the input at full resolution: every
    window covering a pixel gives it the same score, so window bookkeeping can be checked exactly."""

    def forward(self, images: torch.Tensor, aux: bool = False):
        w = torch.arange(1.0, 1.0 + 3 * self.cfg.num_classes).reshape(self.cfg.num_classes, 3)
        return torch.einsum("kc,bchw->bkhw", w, images.sin())


@pytest.mark.parametrize("size", [(64, 64), (80, 112), (40, 50)])  # one window, overlapping ones, smaller than a crop
def test_sliding_windows_cover_every_pixel(size) -> None:
    m = _Pointwise(small().cfg).eval()
    x = torch.randn(1, 3, *size)
    whole = m.predict(x)
    slid = m.predict(x, crop=64, stride=40)
    assert slid.shape == (1, 5, *size)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)


def test_flip_and_scales_average_probabilities() -> None:
    m = _Pointwise(small().cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    probs = m.predict(x).softmax(dim=1)
    torch.testing.assert_close(m.predict(x, flip=True), probs)  # a pointwise model is flip-invariant
    two = m.predict(x, scales=(0.5, 1.0), size=(64, 64))
    half = F.interpolate(m.predict(F.interpolate(x, size=(32, 32), mode="bilinear")), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(two, (half.softmax(dim=1) + probs) / 2)
    # the official multi-scale test: no view below the crop, so the 0.5 view is the 1.0 view
    torch.testing.assert_close(m.predict(x, scales=(0.5, 1.0), min_side=64), probs)


def test_whole_image_inference_upsamples_stride_4_logits() -> None:
    m = small().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = F.interpolate(m(x), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m.predict(x), ref)
    assert m.predict(torch.randn(1, 3, 50, 70), size=(100, 140)).shape == (1, 5, 100, 140)  # padded to the patch


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        m = small(dropout=0.0)
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        logits, aux = m(torch.randn(2, 3, 64, 64), aux=True)
        (logits.square().mean() + aux.square().mean()).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert m.backbone.grad_checkpointing and len(m.blocks) == 4
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-4, atol=1e-6, msg=k)
