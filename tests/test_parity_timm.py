"""Parity with timm's `Eva`: timm's random weights through our converters give the same outputs.

Covers the four released layouts (depth cut to 2 for speed), classifier and headless forms, a
resolution other than the native one, and the official layout checked through timm's own converter.
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")
from ckpt_utils import official_state, random_model, small_cfg  # noqa: E402
from timm.models.eva import checkpoint_filter_fn  # noqa: E402

from eva02.model.vit import Eva02, resample_pos_embed  # noqa: E402
from eva02.weights.convert import to_ours  # noqa: E402

SIZES = ("tiny", "small", "base", "large")
ATOL = 1e-4


def _timm_model(size: str, num_classes: int, img_size: int = 112, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(
        f"eva02_{size}_patch14_224", pretrained=False, num_classes=num_classes, depth=2, img_size=img_size, **kw
    ).eval()
    with torch.no_grad():  # move biases / norms off their init values so every tensor matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _ours_from(tm: torch.nn.Module, size: str, num_classes: int, img_size: int = 112) -> Eva02:
    cfg = small_cfg(size, num_classes, depth=2, img_size=img_size)
    model = Eva02(cfg).eval()
    model.load_state_dict(to_ours(tm.state_dict(), "timm", cfg), strict=True)
    return model


@pytest.mark.parametrize("size", SIZES)
def test_classifier_logits_and_features(size: str) -> None:
    tm = _timm_model(size, 10)
    ours = _ours_from(tm, size, 10)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_tok = tm.forward_features(x)
        o_tok = ours.forward_features(x)
        torch.testing.assert_close(o_tok, t_tok, atol=ATOL, rtol=0)
        pre = tm.forward_head(t_tok, pre_logits=True)
        torch.testing.assert_close(ours.forward_head(o_tok, pre_logits=True), pre, atol=ATOL, rtol=0)
        logits = tm(x)
        torch.testing.assert_close(ours(x), logits, atol=ATOL, rtol=0)
    assert logits.abs().max() > 1e-3  # the comparison is not between two near-zero outputs


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_headless_tokens(size: str) -> None:
    """timm keeps the MIM final norm as fc_norm; ours applies it per token as the official model does."""
    tm = _timm_model(size, 0)
    ours = _ours_from(tm, size, 0)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tm.fc_norm(tm.forward_features(x))  # (B, 1+N, D), normalised per token
        torch.testing.assert_close(ours.forward_features(x), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", ["small", "large"])
def test_other_resolution(size: str) -> None:
    """Built at 112 px, run at 168 px: RoPE positions rescaled to the 16-grid, pos_embed resampled.

    timm's reference is a model built natively at 168 px whose pos_embed is the official bicubic
    resample (F.interpolate, no antialias) of the 112 px one. (timm's own `dynamic_img_size` path
    resamples with antialias, i.e. PIL's bicubic kernel, and differs from the official code by ~1e-3.)
    """
    tm = _timm_model(size, 5)
    ours = _ours_from(tm, size, 5)
    sd = dict(tm.state_dict())
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (8, 8), (12, 12))
    big = timm.create_model(f"eva02_{size}_patch14_224", pretrained=False, num_classes=5, depth=2, img_size=168)
    big.eval().load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 168, 168, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), big(x), atol=ATOL, rtol=0)
        assert ours(x).abs().max() > 1e-3


@pytest.mark.parametrize("size,classes", [("tiny", 4), ("base", 0)])
def test_official_layout_through_timm_converter(size: str, classes: int) -> None:
    """Our official-format export, read by timm's own official-checkpoint filter, gives our outputs."""
    ours = random_model(small_cfg(size, classes, depth=2, img_size=112), scale=0.02)
    sd = official_state(ours, mim=classes == 0)
    tm = timm.create_model(
        f"eva02_{size}_patch14_224", pretrained=False, num_classes=classes, depth=2, img_size=112
    ).eval()
    tm.load_state_dict(checkpoint_filter_fn({"module": sd}, tm), strict=True)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        if classes:
            torch.testing.assert_close(ours(x), tm(x), atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(ours.forward_features(x), tm.fc_norm(tm.forward_features(x)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_training_gradients(size: str) -> None:
    """One training step's loss and every parameter gradient equal timm's (eager autograd path)."""
    tm = _timm_model(size, 10).train()
    ours = _ours_from(tm, size, 10).train()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([3, 7])
    losses = []
    for m in (tm, ours):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    cfg = small_cfg(size, 10, depth=2, img_size=112)
    expected = to_ours({n: p.grad for n, p in tm.named_parameters()}, "timm", cfg)
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert sorted(got) == sorted(expected)
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    assert max(g.abs().max().item() for g in got.values()) > 1e-3
