"""Our safetensors format, `get_model` (names, paths, head replacement, sizes) and `eva02 convert`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from ckpt_utils import mmpretrain_state, official_state, outputs, random_model, small_cfg, timm_state, write
from safetensors import safe_open

from eva02.cli import build_parser
from eva02.cli import main as cli_main
from eva02.model.vit import Eva02
from eva02.weights import load, zoo
from eva02.weights.load import get_model, load_checkpoint, load_model, save_checkpoint
from eva02.weights.zoo import Preprocess, WeightSource, ZooEntry


def test_save_and_load_model_restores_config(tmp_path) -> None:
    src = random_model(small_cfg("test", 4, img_size=70, patch_grad_scale=0.5))
    path = save_checkpoint(src, tmp_path / "m.safetensors", name="my-model")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "eva02" and meta["name"] == "my-model"
    assert json.loads(meta["config"])["img_size"] == 70
    dst = load_model(path)
    assert dst.cfg == src.cfg and not dst.training
    assert torch.equal(outputs(dst), outputs(src))
    assert torch.equal(outputs(get_model(None, path)), outputs(src))


def test_save_checkpoint_honours_the_umask_and_never_leaves_half_a_file(tmp_path, monkeypatch) -> None:
    model = random_model(small_cfg())
    old = os.umask(0o022)
    try:
        shared = save_checkpoint(model, tmp_path / "shared.safetensors")
        os.umask(0o007)
        group = save_checkpoint(model, tmp_path / "group.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644  # what open() gives, not mkstemp's 0600
    assert stat.S_IMODE(group.stat().st_mode) == 0o660
    before = shared.read_bytes()

    def full_disk(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(load, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, shared)
    assert shared.read_bytes() == before  # the old file is intact and no temporary is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group.safetensors", "shared.safetensors"]


def test_our_format_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"use a name ending in \.safetensors"):
        save_checkpoint(random_model(small_cfg()), tmp_path / "m.pt")
    foreign = write(timm_state(random_model(small_cfg("tiny", 2))), tmp_path / "timm.safetensors")
    with pytest.raises(ValueError, match="not an eva02 checkpoint.*eva02 convert"):
        load_model(foreign)
    with pytest.raises(ValueError, match="model=None needs pretrained=PATH"):
        get_model(None, foreign)


def test_get_model_replaces_head_and_keeps_backbone(tmp_path) -> None:
    src = random_model(small_cfg("test", 5))
    path = write({"model": official_state(src)}, tmp_path / "c.pt")
    with pytest.warns(UserWarning, match="5-class head by a new 3-class head"):
        net = get_model(src.cfg, path, num_classes=3)
    assert net.cfg.num_classes == 3 and net.head.weight.shape == (3, 128) and not net.training
    torch.testing.assert_close(
        net.forward_features(torch.ones(1, 3, 56, 56)), src.forward_features(torch.ones(1, 3, 56, 56))
    )
    same = get_model(src.cfg.replace(num_classes=0), path)  # the checkpoint's classes win over the config's
    assert same.cfg.num_classes == 5 and torch.equal(outputs(same), outputs(src))
    with pytest.raises(ValueError, match="num_classes=0 asks for a headless model.*pre_logits=True"):
        get_model(src.cfg, path, num_classes=0)


def test_get_model_headless_checkpoint_into_classifier(tmp_path) -> None:
    src = random_model(small_cfg("tiny", 0))
    path = write({"state_dict": mmpretrain_state(src)}, tmp_path / "mmp.pth")
    with pytest.warns(UserWarning, match="new 10-class head"):
        net = get_model(src.cfg, path, num_classes=10)
    assert net.is_classifier and outputs(net).shape == (2, 10)
    assert torch.equal(net.state_dict()["blocks.1.mlp.w3.weight"], src.state_dict()["blocks.1.mlp.w3.weight"])


def test_get_model_img_size_resamples_pos_embed(tmp_path) -> None:
    src = random_model(small_cfg("test", 2, img_size=56))
    path = write(timm_state(src), tmp_path / "t.safetensors")
    net = get_model(src.cfg, path, img_size=84)
    assert net.cfg.img_size == 84 and net.pos_embed.shape == (1, 1 + 6 * 6, 128)
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():  # the source model resamples on the fly to the same grid: same numbers
        torch.testing.assert_close(net(x), src(x), atol=1e-5, rtol=0)


def test_get_model_without_weights() -> None:
    net = get_model(small_cfg("test", 0), num_classes=7, img_size=84)
    assert net.cfg.num_classes == 7 and net.cfg.img_size == 84 and not net.training


def _entry(cfg, *sources: WeightSource, ema: bool = False) -> ZooEntry:
    return ZooEntry(
        name="unit-test-model", cfg=cfg, preprocess=Preprocess(img_size=cfg.img_size), sources=sources, official_ema=ema
    )


def test_get_model_pretrained_downloads_verifies_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EVA02_HOME", str(tmp_path / "cache"))
    src = random_model(small_cfg("test", 3))
    ema = random_model(src.cfg, seed=9)
    path = write({"model": official_state(src), "model_ema": official_state(ema)}, tmp_path / "published.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    broken = WeightSource("timm", (tmp_path / "absent.safetensors").as_uri(), "absent.safetensors")
    good = WeightSource("official", path.as_uri(), "eva02_unit.pt", sha256=digest, fmt="official")
    net = get_model(_entry(src.cfg, broken, good), pretrained=True)  # first source fails, second works
    assert (tmp_path / "cache" / "eva02_unit.pt").is_file()
    assert torch.equal(outputs(net), outputs(src))  # this entry reports non-EMA weights
    net = get_model(_entry(src.cfg, good, ema=True), pretrained=True)
    assert torch.equal(outputs(net), outputs(ema))
    with pytest.raises(ValueError, match="has no 'mmpretrain' weights; choose source from"):
        get_model(_entry(src.cfg, good), pretrained=True, source="mmpretrain")
    with pytest.raises(OSError, match="cannot download .*absent.safetensors.*pretrained='FILE'"):
        get_model(_entry(src.cfg, broken), pretrained=True)


def test_get_model_offline_uses_a_dropped_in_file(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EVA02_HOME", str(cache))
    src = random_model(small_cfg("test", 3))
    off = WeightSource("official", (tmp_path / "gone.pt").as_uri(), "gone.pt", fmt="official")
    mmp = WeightSource("mmpretrain", (tmp_path / "gone.pth").as_uri(), "mmp_20230505-abcd.pth", fmt="mmpretrain")
    with pytest.raises(OSError) as info:
        get_model(_entry(src.cfg, off, mmp), pretrained=True)
    msg = str(info.value)
    assert f"put it in {cache} under its name (gone.pt, mmp_20230505-abcd.pth)" in msg and "pretrained='FILE'" in msg
    cache.mkdir(exist_ok=True)
    write({"state_dict": mmpretrain_state(src)}, cache / "mmp_20230505-abcd.pth")  # the user drops a file in
    assert torch.equal(outputs(get_model(_entry(src.cfg, off, mmp), pretrained=True)), outputs(src))


def test_get_model_by_zoo_name(monkeypatch, tmp_path) -> None:
    cfg = small_cfg("test", 2)
    monkeypatch.setattr(zoo, "resolve", lambda name: _entry(cfg))
    path = write(timm_state(random_model(cfg)), tmp_path / "w.safetensors")
    assert get_model("whatever", path).cfg.num_classes == 2
    with pytest.raises(ValueError, match="has no published weights"):
        get_model("whatever", pretrained=True)


def test_cli_convert(tmp_path, monkeypatch, capsys) -> None:
    src = random_model(small_cfg("base", 4, depth=1))
    # Import every command module first: one that imports `resolve` by name must keep the real one.
    build_parser()
    monkeypatch.setattr(zoo, "resolve", lambda name: _entry(src.cfg))
    ckpt = write({"module": official_state(src, mim=False)}, tmp_path / "official.pt")
    dst = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(ckpt), str(dst), "--model", "unit-test-model"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert torch.equal(outputs(load_model(dst)), outputs(src))
    assert cli_main(["convert", str(ckpt), str(dst), "--model", "m"]) == 2  # exists, no --force
    assert cli_main(["convert", str(ckpt), str(dst), "--model", "m", "--force", "--fmt", "official"]) == 0
    same = write(timm_state(src), tmp_path / "timm.safetensors")
    before = same.read_bytes()
    assert cli_main(["convert", str(same), str(same), "--model", "m", "--force"]) == 2
    assert same.read_bytes() == before
    assert cli_main(["convert", str(ckpt), str(tmp_path / "out.pt"), "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite the source" in err and "must end in .safetensors" in err
    assert cli_main(["convert", str(ckpt), str(tmp_path / "x.safetensors"), "--model", "m", "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err


def test_load_checkpoint_accepts_a_state_dict() -> None:
    src = random_model(small_cfg("small", 0, depth=1))
    dst = load_checkpoint(Eva02(src.cfg).eval(), official_state(src, mim=True), fmt="official")
    assert torch.equal(outputs(dst), outputs(src))


@pytest.mark.parametrize("task,command", [({"task": "detect"}, "eva02 detect"), ({}, "eva02 segment")])
def test_task_model_files_name_their_command(tmp_path, task, command) -> None:
    """A detector's or segmentor's final weights are not a classifier: the error names the command that reads them."""
    import json

    from safetensors.torch import save_file

    from eva02.weights.load import get_model

    path = tmp_path / "final.safetensors"
    cfg = {**task, "backbone": {"dim": 128}, "num_classes": 3}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "eva02", "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match=command):
        get_model(None, pretrained=path)
