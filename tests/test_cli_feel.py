"""How the command line treats a user: inputs checked before a model loads, warnings as plain lines, fixes
named in the command's own flags, counts that agree with their number."""

from __future__ import annotations

import warnings

from ckpt_utils import random_model, small_cfg, timm_state

from eva02.cli import _plain_warnings, main


def test_a_missing_input_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import eva02.cli.features as features
    import eva02.cli.predict as predict

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    for module in (predict, features):
        monkeypatch.setattr(module, "load_model_from_args", no_model)
    for cmd in (["predict"], ["features", "-o", str(tmp_path / "f.npy")]):
        assert main([*cmd, str(tmp_path / "nope.jpg"), "--model", "eva02-tiny-p14_in21k-pre_3rdparty_in1k"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"no such file or folder: {tmp_path / 'nope.jpg'}; check the path") and "\n" not in err


def test_warnings_are_plain_lines(capsys):
    with _plain_warnings():
        warnings.warn("adding a new 3-class head", stacklevel=1)
    err = capsys.readouterr().err
    assert err == "warning: adding a new 3-class head\n"  # no file name, line number or category


def test_predict_names_its_own_flag_for_a_file_without_config(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import save_file

    model = random_model(small_cfg("test", 3))
    ckpt = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state(model).items()}, str(ckpt))
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "--model NAME" in err and "get_model" not in err


def test_one_failed_image_is_counted_in_the_singular(tmp_path, capsys):
    from eva02.weights.load import save_checkpoint

    ckpt = save_checkpoint(random_model(small_cfg("test", 3)), tmp_path / "m.safetensors")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(bad), "--checkpoint", str(ckpt)]) == 1
    assert "1 of 1 image failed" in capsys.readouterr().err
