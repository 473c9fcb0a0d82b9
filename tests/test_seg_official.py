"""Official EVA-02 segmentation checkpoints (`EVA-02/seg`, mmsegmentation 0.29) load into our segmentor
through the key table of `eva02/weights/official_seg.py`: a file written here in the official layout (the
names spelled out below from the official `backbone/eva2.py` and mmseg's `UPerHead` / `PPM` / `FCNHead`,
saved as mmcv saves checkpoints) gives the same outputs through `load_segmentor` (the path of
`tools/test.py`) and `eva02 segment`; keys outside the table, missing tensors and a windowed config are
refused with one line naming them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva02.cli import main
from eva02.engine.checkpoint import save_weights
from eva02.engine.config import RunConfig, load_config, override
from eva02.engine.tasks.segment import load_segmentor, segmentor_config
from eva02.model.seg import Segmentor
from eva02.weights.official_seg import is_official_seg, official_seg_to_ours

DEPTH, CLASSES = 4, 5
CONFIG_TEXT = f"""
from eva02.engine.config import *

config = RunConfig(
    model=ModelCfg(name="test", num_classes={CLASSES}, img_size=64, patch_size=16, depth={DEPTH}, drop_path=0.0),
    data=DataCfg(root="unused", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    train=TrainCfg(task="segment"),
    seg=SegCfg(layout="folders", scale=(256, 64), stride=48, channels=16, aux_channels=8),
)
"""
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def random_segmentor(cfg: RunConfig) -> Segmentor:
    """The config's segmentor (official layout: class token, global attention) with every tensor random,
    BatchNorm statistics included, so that any two tensors swapped by a wrong name show."""
    torch.manual_seed(0)
    model = Segmentor(segmentor_config(cfg)).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1000)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            else:
                t.add_(torch.randn_like(t) * 0.05)
    return model


def official_state(model: Segmentor) -> OrderedDict:
    """`model`'s tensors under the names the official code gives them, written out by hand:
    EVA2 (`EVA-02/seg/backbone/eva2.py`): q_proj / k_proj / v_proj without bias, q_bias and v_bias,
    SwiGLU w1 (gate) / w2 / ffn_ln / w3, a RoPE buffer module at the top and in every block's attention,
    fpn1 = Sequential(ConvTranspose2d, SyncBatchNorm, GELU, ConvTranspose2d), fpn2 = Sequential(ConvTranspose2d);
    mmseg's UPerHead (`psp_modules` a PPM of Sequential(AdaptiveAvgPool2d, ConvModule), `bottleneck`,
    `lateral_convs`, `fpn_convs`, `fpn_bottleneck`, `conv_seg`), FCNHead (`convs` a Sequential of one
    ConvModule, `conv_seg`); a ConvModule is `conv` (no bias) and `bn`."""
    ours = model.state_dict()
    cfg = model.cfg
    grid, head_dim = cfg.backbone.grid, cfg.backbone.dim // cfg.backbone.heads
    rope_cos, rope_sin = torch.randn(grid * grid, head_dim // 2), torch.randn(grid * grid, head_dim // 2)
    sd: OrderedDict = OrderedDict()
    sd["backbone.cls_token"] = ours["backbone.cls_token"]
    sd["backbone.pos_embed"] = ours["backbone.pos_embed"]
    sd["backbone.patch_embed.proj.weight"] = ours["backbone.patch_embed.proj.weight"]
    sd["backbone.patch_embed.proj.bias"] = ours["backbone.patch_embed.proj.bias"]
    sd["backbone.rope.freqs_cos"], sd["backbone.rope.freqs_sin"] = rope_cos, rope_sin
    for i in range(cfg.backbone.depth):
        o = t = f"backbone.blocks.{i}."
        q, k, v = ours[o + "attn.qkv.weight"].chunk(3)
        w1, w2 = ours[o + "mlp.w12.weight"].chunk(2)
        b1, b2 = ours[o + "mlp.w12.bias"].chunk(2)
        sd[t + "norm1.weight"], sd[t + "norm1.bias"] = ours[o + "norm1.weight"], ours[o + "norm1.bias"]
        sd[t + "attn.q_bias"], sd[t + "attn.v_bias"] = ours[o + "attn.q_bias"], ours[o + "attn.v_bias"]
        sd[t + "attn.q_proj.weight"], sd[t + "attn.k_proj.weight"], sd[t + "attn.v_proj.weight"] = q, k, v
        sd[t + "attn.rope.freqs_cos"], sd[t + "attn.rope.freqs_sin"] = rope_cos, rope_sin
        sd[t + "attn.proj.weight"], sd[t + "attn.proj.bias"] = ours[o + "attn.proj.weight"], ours[o + "attn.proj.bias"]
        sd[t + "norm2.weight"], sd[t + "norm2.bias"] = ours[o + "norm2.weight"], ours[o + "norm2.bias"]
        sd[t + "mlp.w1.weight"], sd[t + "mlp.w1.bias"], sd[t + "mlp.w2.weight"], sd[t + "mlp.w2.bias"] = w1, b1, w2, b2
        sd[t + "mlp.ffn_ln.weight"], sd[t + "mlp.ffn_ln.bias"] = ours[o + "mlp.norm.weight"], ours[o + "mlp.norm.bias"]
        sd[t + "mlp.w3.weight"], sd[t + "mlp.w3.bias"] = ours[o + "mlp.w3.weight"], ours[o + "mlp.w3.bias"]
    for p in ("weight", "bias"):
        sd[f"backbone.fpn1.0.{p}"] = ours[f"neck.fpn1.0.{p}"]
    for p in BN:
        sd[f"backbone.fpn1.1.{p}"] = ours[f"neck.fpn1.1.{p}"]
    for p in ("weight", "bias"):
        sd[f"backbone.fpn1.3.{p}"] = ours[f"neck.fpn1.3.{p}"]
        sd[f"backbone.fpn2.0.{p}"] = ours[f"neck.fpn2.{p}"]

    def conv_module(theirs: str, mine: str) -> None:
        sd[f"{theirs}.conv.weight"] = ours[f"{mine}.conv.weight"]
        for p in BN:
            sd[f"{theirs}.bn.{p}"] = ours[f"{mine}.bn.{p}"]

    for j in range(len(cfg.pool_scales)):
        conv_module(f"decode_head.psp_modules.{j}.1", f"decode_head.psp.stages.{j}.1")
    conv_module("decode_head.bottleneck", "decode_head.bottleneck")
    for j in range(3):
        conv_module(f"decode_head.lateral_convs.{j}", f"decode_head.lateral_convs.{j}")
        conv_module(f"decode_head.fpn_convs.{j}", f"decode_head.fpn_convs.{j}")
    conv_module("decode_head.fpn_bottleneck", "decode_head.fpn_bottleneck")
    sd["decode_head.conv_seg.weight"] = ours["decode_head.cls.conv_seg.weight"]
    sd["decode_head.conv_seg.bias"] = ours["decode_head.cls.conv_seg.bias"]
    conv_module("auxiliary_head.convs.0", "auxiliary_head.convs")
    sd["auxiliary_head.conv_seg.weight"] = ours["auxiliary_head.cls.conv_seg.weight"]
    sd["auxiliary_head.conv_seg.bias"] = ours["auxiliary_head.cls.conv_seg.bias"]
    return sd


def save_mmseg(sd: dict, path: Path) -> Path:
    """As mmcv's save_checkpoint writes it (the released files): meta, state_dict, optimizer."""
    meta = {
        "mmcv_version": "1.7.1",
        "time": "Sat Mar 18 17:33:13 2023",
        "mmseg_version": "0.29.1",
        "config": "norm_cfg = dict(type='SyncBN', requires_grad=True)\nmodel = dict(type='EncoderDecoder')\n",
        "CLASSES": tuple(f"class_{i}" for i in range(CLASSES)),
        "PALETTE": [[120, 120, 120]] * CLASSES,
        "seed": 0,
        "exp_name": "upernet_eva02_test.py",
        "epoch": 1,
        "iter": 60000,
        "hook_msgs": {"last_ckpt": "/work_dirs/iter_60000.pth", "best_score": 0.5531},
    }
    optimizer = {"state": {0: {"step": torch.tensor(60000.0)}}, "param_groups": [{"lr": 0.0, "params": [0]}]}
    torch.save({"meta": meta, "state_dict": OrderedDict(sd), "optimizer": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("segofficial")
    cfg_path = d / "seg.py"
    cfg_path.write_text(CONFIG_TEXT)
    cfg = load_config(cfg_path)
    model = random_segmentor(cfg)
    official = official_state(model)
    return {"dir": d, "cfg_path": cfg_path, "cfg": cfg, "model": model, "official": official,
            "pth": save_mmseg(official, d / "eva02_T_ade_seg_upernet_sz64.pth")}  # fmt: skip


def test_the_hand_written_layout_has_every_tensor_once(setup) -> None:
    """The official names above cover the model: q/k/v and w1/w2 split ours, the RoPE tables come on top."""
    ours, official = setup["model"].state_dict(), setup["official"]
    assert len(official) == len(ours) + DEPTH * (2 + 2) + 2 + 2 * DEPTH
    assert is_official_seg(official) and not is_official_seg(ours)


def test_the_official_file_loads_with_the_same_outputs(setup) -> None:
    model, cfg = setup["model"], setup["cfg"]
    loaded = load_segmentor(cfg, str(setup["pth"])).eval()
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, a_aux = model(x, aux=True)
        b, b_aux = loaded(x, aux=True)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(b_aux, a_aux, rtol=0, atol=0)
        slid = loaded.predict(x[:1], crop=64, stride=48)
        torch.testing.assert_close(slid, model.predict(x[:1], crop=64, stride=48), rtol=0, atol=0)


def test_every_key_is_used_or_named(setup) -> None:
    ours, dropped = official_seg_to_ours(setup["official"], setup["model"].cfg)
    assert set(ours) == set(setup["model"].state_dict())
    assert dropped == sorted(k for k in setup["official"] if ".rope.freqs_" in k) and len(dropped) == 2 + 2 * DEPTH


def test_eva02_segment_gives_the_labels_of_our_own_file(setup, tmp_path: Path, capsys) -> None:
    ours = tmp_path / "final.safetensors"
    save_weights(setup["model"], ours)
    image = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(image)
    maps = []
    for weights, out in ((setup["pth"], tmp_path / "a"), (ours, tmp_path / "b")):
        assert main(["segment", str(image), "--config", str(setup["cfg_path"]), "--checkpoint", str(weights),
                     "-o", str(out)]) == 0  # fmt: skip
        maps.append(np.asarray(Image.open(out / "street_labels.png")))
    capsys.readouterr()
    assert maps[0].shape == (70, 90) and np.array_equal(maps[0], maps[1])


def _with(setup, tmp_path: Path, drop: tuple[str, ...] = (), add: dict | None = None) -> str:
    sd = {k: v for k, v in setup["official"].items() if k not in drop}
    return str(save_mmseg({**sd, **(add or {})}, tmp_path / "changed.pth"))


def test_a_key_outside_the_table_is_named(setup, tmp_path: Path) -> None:
    extra = {
        "backbone.blocks.0.attn.relative_position_bias_table": torch.zeros(3, 2),
        "backbone.norm.weight": torch.ones(128),
    }
    with pytest.raises(
        ValueError, match=r"keys of no part of an official EVA-02 seg model .*relative_position_bias_table"
    ):
        load_segmentor(setup["cfg"], _with(setup, tmp_path, add=extra))


@pytest.mark.parametrize(
    "drop, message",
    [
        (("decode_head.conv_seg.bias",), r"missing \['decode_head.cls.conv_seg.bias'\]"),
        (("backbone.blocks.1.attn.k_proj.weight",), r"incomplete, missing: backbone.blocks.1.attn.k_proj.weight"),
        (tuple(f"auxiliary_head.convs.0.bn.{p}" for p in BN), r"missing \['auxiliary_head.convs.bn"),
    ],
)
def test_a_missing_tensor_is_named(setup, tmp_path: Path, drop: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_segmentor(setup["cfg"], _with(setup, tmp_path, drop=drop))


def test_another_config_is_refused_with_the_fix(setup) -> None:
    cfg = setup["cfg"]
    windowed = override(cfg, {"seg.window_size": 2, "seg.cls_token": False, "seg.global_blocks": "1,3"})
    with pytest.raises(ValueError, match="seg.window_size=0 and seg.cls_token=true"):
        load_segmentor(windowed, str(setup["pth"]))
    with pytest.raises(ValueError, match=r"decode_head.cls.conv_seg.weight is \(5, 16, 1, 1\) in the checkpoint"):
        load_segmentor(override(cfg, {"model.num_classes": 7}), str(setup["pth"]))


def test_a_larger_window_gets_the_position_embedding_resampled(setup) -> None:
    cfg = override(setup["cfg"], {"model.img_size": 96})
    loaded = load_segmentor(cfg, str(setup["pth"]))
    assert loaded.backbone.pos_embed.shape == (1, 1 + 6 * 6, 128)
    torch.testing.assert_close(loaded.backbone.cls_token, setup["model"].backbone.cls_token, rtol=0, atol=0)


def test_the_cli_answers_a_bad_file_in_one_line(setup, tmp_path: Path, capsys) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    bad = _with(setup, tmp_path, add={"backbone.blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    code = main(["segment", str(image), "--config", str(setup["cfg_path"]), "--checkpoint", bad])
    err = capsys.readouterr().err
    assert code == 2 and "backbone.blocks.0.attn.qkv.weight" in err and len(err.strip().splitlines()) == 1


def test_given_as_a_classifier_or_backbone_the_file_names_the_segment_commands(setup) -> None:
    from eva02.model import Eva02
    from eva02.weights.load import load_checkpoint

    backbone = setup["model"].cfg.backbone
    with pytest.raises(ValueError, match=r"official EVA-02 segmentation model .* use `eva02 segment"):
        load_checkpoint(Eva02(backbone), setup["pth"])
