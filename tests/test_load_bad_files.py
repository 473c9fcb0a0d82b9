"""Broken and hostile checkpoint files: what failed downloads leave (empty files, web pages, images,
truncated files), pickles that are not weights, configs that do not match their tensors, NaN weights.

Every loader (get_model, load_model, load_checkpoint, `eva02 predict / convert / test`, `model.init`)
must refuse them with one ValueError naming the file, and the CLI with a one-line error and exit 2.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re

import pytest
import torch
from ckpt_utils import mmpretrain_state, official_state, random_model, small_cfg, timm_state, write
from PIL import Image
from safetensors.torch import save_file

from eva02.cli import main as cli_main
from eva02.engine.config import ModelCfg, RunConfig
from eva02.engine.tasks import build_eva02
from eva02.model.vit import Eva02
from eva02.weights.load import (
    NotACheckpointError,
    UnsafeCheckpointError,
    check_checkpoint_file,
    get_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

TINY = "eva02-tiny-p14_in21k-pre_3rdparty_in1k"  # a zoo name; with --checkpoint nothing is downloaded


@pytest.fixture(scope="module")
def model() -> Eva02:
    return random_model(small_cfg("test", 3))


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def _broken_files(folder, model: Eva02) -> dict[str, tuple[object, str]]:
    """name -> (path, what the error must say), one file per way a download goes wrong."""
    pt = write({"model": official_state(model)}, folder / "whole.pt").read_bytes()
    st = write(timm_state(model), folder / "whole.safetensors").read_bytes()
    ours = save_checkpoint(model, folder / "ours_whole.safetensors").read_bytes()
    torch.save({"model": official_state(model)}, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (folder / "legacy.pt").read_bytes()
    cases = {
        "empty.pt": (b"", r"an empty file"),
        "page.pt": (b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n", r"an HTML page"),
        "notes.safetensors": (b"Entry not found", r"a text file"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", r"a Git LFS pointer"),
        "photo.pt": (_image_bytes("JPEG"), r"a JPEG image"),
        "photo.safetensors": (_image_bytes("PNG"), r"a PNG image"),
        "half.pt": (pt[: len(pt) // 2], r"a torch zip file cut short"),
        "half.safetensors": (st[: len(st) // 2], r"a safetensors file cut short: \d+ of \d+ bytes"),
        "header.safetensors": (st[:20], r"a safetensors file cut short: 20 bytes"),
        "half_ours.safetensors": (ours[: len(ours) // 2], r"a safetensors file cut short"),
        "half_legacy.pt": (legacy[: len(legacy) // 2], r"a torch file cut short"),
        "start_legacy.pt": (legacy[:40], r"a torch file cut short"),
    }
    out = {}
    for name, (data, what) in cases.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, rf"{name} is not a checkpoint \({what}.*\); re-download it or pass the right file")
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory, model: Eva02) -> dict[str, tuple[object, str]]:
    return _broken_files(tmp_path_factory.mktemp("broken"), model)


def _one_line_error(capsys, cmd: str, pattern: str) -> str:
    """Check the CLI's stderr is one `eva02 CMD: error: ...` line matching `pattern`; returns stdout."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Please file an issue" not in err, err
    lines = [line for line in err.splitlines() if "Warning" not in line and line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"eva02 {cmd}: error: "), err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    return out


# ------------------------------------------------------------------------------------ A: broken files
def test_broken_files_are_named_before_any_loader_runs(broken, model: Eva02) -> None:
    loaders = [lambda p: get_model(model.cfg, p), lambda p: load_checkpoint(Eva02(model.cfg), p)]
    for name, (path, pattern) in broken.items():
        if "legacy" in name:
            # A legacy torch pickle has no end record: a cut shows while unpickling, which load_model (our
            # safetensors only) never does.
            with pytest.raises(ValueError, match=rf"{name} is not an eva02 checkpoint"):
                load_model(path)
        else:
            with pytest.raises(NotACheckpointError, match=pattern):
                check_checkpoint_file(path)
            with pytest.raises(NotACheckpointError, match=pattern):
                load_model(path)
        for load in loaders:
            with pytest.raises(NotACheckpointError, match=pattern):
                load(path)


def test_broken_files_in_the_cli(broken, tmp_path, capsys) -> None:
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    for name in ("empty.pt", "page.pt", "photo.pt", "half.safetensors"):
        path, pattern = broken[name]
        assert cli_main(["predict", "--checkpoint", str(path), str(img)]) == 2
        _one_line_error(capsys, "predict", pattern)
        assert cli_main(["predict", "--model", TINY, "--checkpoint", str(path), str(img)]) == 2
        _one_line_error(capsys, "predict", pattern)
        dst = tmp_path / f"{name}.safetensors"
        assert cli_main(["convert", str(path), str(dst), "--model", TINY]) == 2
        _one_line_error(capsys, "convert", pattern)
        assert not dst.exists()


def test_broken_files_in_eva02_test_and_model_init(broken, tmp_path, capsys) -> None:
    for c in ("a", "b", "c"):  # a real validation split, so only the checkpoint can be wrong
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        Image.new("RGB", (56, 56)).save(tmp_path / "data" / "val" / c / "0.png")
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from eva02.engine.config import *\n\nconfig = RunConfig(model=ModelCfg(name='test', num_classes=3, "
        f"img_size=56, depth=2), data=DataCfg(root={str(tmp_path / 'data')!r}, workers=0))\n"
    )
    for name in ("empty.pt", "photo.safetensors", "half.safetensors"):
        path, pattern = broken[name]
        assert cli_main(["test", str(cfg_file), str(path), "--work-dir", str(tmp_path / "wd")]) == 2
        _one_line_error(capsys, "test", pattern)
        run = RunConfig(model=ModelCfg(name="test", num_classes=3, img_size=56, depth=2, init=str(path)))
        with pytest.raises(ValueError, match=pattern):
            build_eva02(run)


# ------------------------------------------------------------------------ B: pickles that are not weights
class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_non_weight_pickles_are_refused_naming_the_file(tmp_path, model: Eva02) -> None:
    cases = {
        "int_keys.pt": ({0: torch.zeros(2)}, r"int_keys.pt has keys that are not parameter names: \[0\]"),
        "nested_int_keys.pt": ({"model": {1: torch.zeros(2)}}, r"not parameter names: \[1\]"),
        "a_list.pt": ([torch.zeros(2)], r"a_list.pt holds no state dict \(a list where a dict of tensors"),
        "a_tensor.pt": (torch.zeros(2), r"a_tensor.pt holds no state dict \(a Tensor"),
    }
    for name, (obj, pattern) in cases.items():
        path = write(obj, tmp_path / name)
        with pytest.raises(ValueError, match=pattern):
            get_model(model.cfg, path)
    code = tmp_path / "code.pt"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "x": _RunsCode()}, code)
    plain = tmp_path / "plain.pth"
    with open(plain, "wb") as f:  # pickle.dump, not torch.save: torch.load(weights_only=True) cannot read it
        pickle.dump({"cls_token": torch.zeros(1), "x": _RunsCode()}, f)
    for path in (code, plain):
        with pytest.raises(UnsafeCheckpointError, match=rf"{path.name} contains Python objects other than tensors"):
            get_model(model.cfg, path)
    with pytest.raises(UnsafeCheckpointError, match="plain.pth contains .*only weights files are accepted"):
        load_model(plain)  # refused from its first bytes; load_model never unpickles anything


def test_non_weight_pickles_in_the_cli(tmp_path, capsys) -> None:
    path = write({0: torch.zeros(2)}, tmp_path / "int_keys.pt")
    assert cli_main(["convert", str(path), str(tmp_path / "o.safetensors"), "--model", TINY]) == 2
    _one_line_error(capsys, "convert", r"int_keys.pt has keys that are not parameter names")


# ------------------------------------------------------------------------- C: configs against tensors
def _with_config(model: Eva02, path, **changes) -> object:
    meta = {"format": "eva02", "config": json.dumps({**model.cfg.to_dict(), **changes})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


@pytest.fixture
def no_absurd_models(monkeypatch) -> None:
    """Fail the test (instead of the machine) if anything starts to build an absurd model. On the meta
    device, tensors cost nothing, but blocks and RoPE tables (sized by the grid) still do."""
    init = Eva02.__init__

    def guarded(self, cfg) -> None:
        assert cfg.depth <= 64 and cfg.grid <= 64, cfg
        if torch.get_default_device().type != "meta":
            assert cfg.dim <= 4096 and cfg.mlp_hidden <= 16384 and cfg.num_classes <= 10**5, cfg
        init(self, cfg)

    monkeypatch.setattr(Eva02, "__init__", guarded)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"depth": 10**9}, r"config says depth=1000000000, the file holds 2 blocks"),
        ({"dim": 10**7, "heads": 10**5}, r"config says dim=10000000, the patch embedding gives 128"),
        ({"img_size": 14 * 10**6}, r"pos_embed is \(1, 17, 128\) in the file but the config needs"),
        ({"mlp_hidden": 10**9}, r"blocks.0.mlp.w12.weight is \(682, 128\) in the file but the config needs"),
        ({"num_classes": 10**9}, r"head.weight is \(3, 128\) in the file but the config needs \(1000000000, 128\)"),
        ({"sub_ln": False}, r"tensors the config has no place for: \['blocks.0.mlp.norm.bias'"),
        ({"depth": "2"}, r"is invalid \('<=' not supported"),
    ],
)
def test_stored_config_is_checked_against_the_tensors(tmp_path, model, no_absurd_models, changes, pattern) -> None:
    path = _with_config(model, tmp_path / "m.safetensors", **changes)
    for load in (load_model, lambda p: get_model(None, p)):
        with pytest.raises(ValueError, match=rf"m.safetensors: its stored config .*{pattern}"):
            load(path)


def test_absurd_config_in_the_cli(tmp_path, model, no_absurd_models, capsys) -> None:
    path = _with_config(model, tmp_path / "m.safetensors", depth=10**9, dim=10**7)
    img = tmp_path / "x.png"
    Image.new("RGB", (56, 56)).save(img)
    assert cli_main(["predict", "--checkpoint", str(path), str(img)]) == 2
    _one_line_error(capsys, "predict", r"m.safetensors: its stored config does not match its tensors \(the config")


# -------------------------------------------------------------------------------- D: non-finite weights
def _poisoned(model: Eva02, value: float) -> Eva02:
    bad = random_model(model.cfg)
    with torch.no_grad():
        bad.blocks[1].mlp.w3.weight[0, 1] = value
    return bad


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_in_every_format(tmp_path, model, value) -> None:
    bad = _poisoned(model, value)
    files = {  # the first bad tensor, named as the file stores it
        save_checkpoint(bad, tmp_path / "ours.safetensors"): "blocks.1.mlp.w3.weight",
        write(timm_state(bad), tmp_path / "timm.safetensors"): "blocks.1.mlp.fc2.weight",
        write({"model": official_state(bad)}, tmp_path / "official.pt"): "blocks.1.mlp.w3.weight",
        write({"state_dict": mmpretrain_state(bad)}, tmp_path / "mmp.pth"): "backbone.layers.1.mlp.w3.weight",
    }
    for path, key in files.items():
        with pytest.raises(ValueError, match=rf"{path.name} holds non-finite weights: {key} has 1 NaN/Inf"):
            get_model(model.cfg, path)
    with pytest.raises(ValueError, match="ours.safetensors holds non-finite weights"):
        load_model(tmp_path / "ours.safetensors")
    with pytest.raises(ValueError, match="state dict holds non-finite weights: blocks.1.mlp.w3.weight"):
        load_checkpoint(Eva02(model.cfg), bad.state_dict(), fmt="eva02")


def test_nan_weights_do_not_predict_nan(tmp_path, model, capsys) -> None:
    path = save_checkpoint(_poisoned(model, float("nan")), tmp_path / "nan.safetensors")
    img = tmp_path / "x.png"
    Image.new("RGB", (56, 56)).save(img)
    assert cli_main(["predict", "--checkpoint", str(path), str(img)]) == 2
    out = _one_line_error(capsys, "predict", r"nan.safetensors holds non-finite weights: blocks.1.mlp.w3.weight")
    assert "nan" not in out.lower()


# ------------------------------------------------------------------ good files are still read by content
def test_a_misnamed_good_file_still_loads(tmp_path, model) -> None:
    path = write(timm_state(model), tmp_path / "model.safetensors")
    renamed = path.rename(tmp_path / "model.bin")  # a download saved under the wrong extension
    assert check_checkpoint_file(renamed) == "safetensors"
    assert torch.equal(get_model(model.cfg, renamed).head.weight, model.head.weight)
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": mmpretrain_state(model)}, legacy, _use_new_zipfile_serialization=False)
    assert check_checkpoint_file(legacy) == "torch"
    assert torch.equal(get_model(model.cfg, legacy).head.weight, model.head.weight)
