"""Key maps, format detection, container unwrapping, resampling and safe reading of checkpoints."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from ckpt_utils import mmpretrain_state, official_state, outputs, random_model, small_cfg, timm_state, write

from eva02.model.vit import Eva02, resample_pos_embed
from eva02.weights.convert import (
    FORMATS,
    KBiasError,
    detect_format,
    fit_to_config,
    from_ours,
    resample_patch_embed,
    resize_patch,
    to_ours,
)
from eva02.weights.load import UnsafeCheckpointError, load_checkpoint, read_checkpoint

# (variant, num_classes): the split layout (sub-LN: base/large/test) and the fused one (tiny/small),
# each as a classifier and headless.
LAYOUTS = [("test", 0), ("test", 5), ("tiny", 0), ("tiny", 7), ("base", 3), ("large", 0)]


@pytest.mark.parametrize("size,classes", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(size: str, classes: int, fmt: str) -> None:
    cfg = small_cfg(size, classes, depth=1)
    sd = random_model(cfg).state_dict()
    theirs = from_ours(sd, fmt, cfg)
    assert detect_format(theirs) in ({fmt, "eva02"} if fmt == "official" else {fmt})
    back = to_ours(theirs, fmt, cfg)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_layout_key_names() -> None:
    """Spot-check the upstream names the tables must produce (facts file, section 1.5)."""
    base = from_ours(random_model(small_cfg("test", 4, depth=1)).state_dict(), "official")
    assert {"blocks.0.attn.q_proj.weight", "blocks.0.mlp.w1.bias", "blocks.0.mlp.ffn_ln.weight"} <= set(base)
    tiny_timm = timm_state(random_model(small_cfg("tiny", 0, depth=1)))
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight", "fc_norm.weight"} <= set(tiny_timm)
    mmp = from_ours(random_model(small_cfg("test", 4, depth=1)).state_dict(), "mmpretrain")
    assert {"backbone.layers.0.attn.qkv.bias", "backbone.ln2.weight", "head.fc.weight"} <= set(mmp)
    assert mmp["backbone.layers.0.attn.qkv.bias"].shape == (3 * 128,)
    assert torch.count_nonzero(mmp["backbone.layers.0.attn.qkv.bias"][128:256]) == 0


@pytest.mark.parametrize("container", ["module", "model", "model_ema", None])
def test_official_file_loads_to_same_outputs(tmp_path, container) -> None:
    headless = container == "module"  # the official MIM files keep their weights under 'module'
    src = random_model(small_cfg("test", 0 if headless else 6))
    sd = official_state(src, mim=headless)
    if container == "model_ema":
        other = official_state(random_model(src.cfg, seed=5))
        obj = {"model": other, "model_ema": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}
    else:
        obj = {container: sd} if container else sd
    path = write(obj, tmp_path / "ckpt.pt")
    mim: dict = {}
    dst = load_checkpoint(Eva02(src.cfg).eval(), path, mim=mim)
    torch.testing.assert_close(outputs(dst), outputs(src), rtol=0, atol=0)
    assert sorted(mim) == (["lm_head.bias", "lm_head.weight", "mask_token"] if headless else [])


def test_ema_selection(tmp_path) -> None:
    cfg = small_cfg("test", 2)
    plain, ema = random_model(cfg, seed=1), random_model(cfg, seed=2)
    path = write({"model": official_state(plain), "model_ema": official_state(ema)}, tmp_path / "c.pth")
    for use_ema, want in ((None, ema), (True, ema), (False, plain)):
        got = load_checkpoint(Eva02(cfg).eval(), path, use_ema=use_ema)
        assert torch.equal(outputs(got), outputs(want))
    with pytest.raises(ValueError, match="holds only EMA weights"):
        read_checkpoint(write({"model_ema": official_state(ema)}, tmp_path / "ema.pt"), use_ema=False)
    plain_first = read_checkpoint(tmp_path / "c.pth", prefer_ema=False)
    assert torch.equal(plain_first["cls_token"], plain.cls_token) and not torch.equal(plain.cls_token, ema.cls_token)
    flat = write(official_state(plain), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match="no EMA weights"):
        read_checkpoint(flat, use_ema=True)


@pytest.mark.parametrize("classes", [0, 4])
def test_mmpretrain_file_loads(tmp_path, classes) -> None:
    src = random_model(small_cfg("tiny", classes))
    path = write({"state_dict": mmpretrain_state(src), "meta": {"epoch": 1}}, tmp_path / "mmp.pth")
    dst = load_checkpoint(Eva02(src.cfg).eval(), path)
    assert torch.equal(outputs(dst), outputs(src))


def test_mmpretrain_headless_without_ln2_gets_unit_norm() -> None:
    src = random_model(small_cfg("test", 0))
    with pytest.warns(UserWarning, match="no final norm"):
        sd = to_ours(mmpretrain_state(src, keep_final_norm=False), "mmpretrain", src.cfg)
    assert torch.equal(sd["norm.weight"], torch.ones(128)) and torch.equal(sd["norm.bias"], torch.zeros(128))
    assert torch.equal(sd["blocks.1.mlp.w12.weight"], src.state_dict()["blocks.1.mlp.w12.weight"])


def test_nonzero_mmpretrain_k_bias_is_refused() -> None:
    src = random_model(small_cfg("test", 3))
    sd = mmpretrain_state(src)
    sd["backbone.layers.1.attn.qkv.bias"][128 + 7] = 0.01
    with pytest.raises(KBiasError, match=r"non-zero k bias \(block 1.*official EVA-02 attention does not have"):
        to_ours(sd, "mmpretrain", src.cfg)


def test_unknown_and_missing_keys_are_errors() -> None:
    cfg = small_cfg("test", 3)
    sd = official_state(random_model(cfg))
    with pytest.raises(ValueError, match=r"not in the 'official' EVA-02 layout: blocks\.0\.attn\.mystery"):
        to_ours({**sd, "blocks.0.attn.mystery": torch.zeros(1)}, "official", cfg)
    del sd["blocks.1.attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing: blocks\.1\.attn\.k_proj\.weight"):
        to_ours(sd, "official", cfg)
    with pytest.raises(ValueError, match="unknown checkpoint format 'caffe'"):
        to_ours(sd, "caffe", cfg)


def test_detect_format_unknown_keys() -> None:
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        detect_format({"conv1.weight": torch.zeros(1)})


def test_wrong_architecture_names_key_and_shapes(tmp_path) -> None:
    path = write(timm_state(random_model(small_cfg("tiny", 10))), tmp_path / "tiny.safetensors")
    model = Eva02(small_cfg("small", 10))
    with pytest.raises(ValueError, match=r"\(1, 1, 192\) in the checkpoint but \(1, 1, 384\).*matches the checkpoint"):
        load_checkpoint(model, path)


def test_patch_kernel_pinv_property() -> None:
    """<resize(x), w'> == <x, w>: each token is unchanged when patch and kernel are both resized."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 3, 14, 14, generator=g, dtype=torch.float64)
    x = torch.randn(6, 3, 14, 14, generator=g, dtype=torch.float64)
    w16 = resample_patch_embed(w, 16)
    assert w16.shape == (32, 3, 16, 16)
    before = F.conv2d(x, w, stride=14)
    after = F.conv2d(resize_patch(x, 16), w16, stride=16)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-9)
    # A plain bicubic resize of the kernel is not token-preserving: the pinv matters.
    naive = resize_patch(w, 16) * (14 / 16) ** 2
    assert (F.conv2d(resize_patch(x, 16), naive, stride=16) - before).abs().max() > 1e-3


def test_fit_to_config_resamples_kernel_and_pos_embed() -> None:
    src = random_model(small_cfg("test", 0, img_size=56))  # p14, grid 4
    sd = src.state_dict()
    cfg = src.cfg.replace(patch_size=16, img_size=96)  # grid 6
    fitted = fit_to_config(sd, cfg)
    assert torch.equal(fitted["patch_embed.proj.weight"], resample_patch_embed(sd["patch_embed.proj.weight"], 16))
    torch.testing.assert_close(fitted["pos_embed"], resample_pos_embed(sd["pos_embed"], (4, 4), (6, 6)))
    model = Eva02(cfg)
    model.load_state_dict(fitted)  # shapes fit exactly
    assert torch.equal(fitted["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


class _RunsCode:
    """Pickles to a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused: loading it would execute code.*safetensors"):
        read_checkpoint(path)
    assert not marker.exists()


def test_unreadable_files_give_clear_errors(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read .*junk.pt"):
        read_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")


def test_detection_follows_the_tables(monkeypatch) -> None:
    """A new format is one table: detection learns its own key names from it, nothing else to edit."""
    from eva02.weights import convert

    new = [*convert.TABLES["timm"], convert.Rule(("cls_token",), ("trunk.class_embedding",))]
    monkeypatch.setitem(convert.TABLES, "newfmt", new)
    monkeypatch.setattr(convert, "FORMATS", (*convert.FORMATS, "newfmt"))
    convert.distinctive_templates.cache_clear()
    try:
        assert convert.distinctive_templates()["newfmt"] == frozenset({"trunk.class_embedding"})
        sd = {"trunk.class_embedding": torch.zeros(1), "blocks.0.mlp.fc1.weight": torch.zeros(1)}
        assert detect_format(sd) == "newfmt"  # timm's keys are shared with it now: its own key decides
    finally:
        convert.distinctive_templates.cache_clear()
