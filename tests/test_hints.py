"""Error messages name the fix in the caller's words: Python API, command line, or run config."""

from __future__ import annotations

import pytest
from ckpt_utils import random_model, small_cfg, timm_state

from eva02 import hints
from eva02.weights.load import get_model, load_checkpoint, load_model


@pytest.fixture(scope="module")
def three_class_timm_file(tmp_path_factory):
    from safetensors.torch import save_file

    model = random_model(small_cfg("test", 3))
    path = tmp_path_factory.mktemp("h") / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state(model).items()}, str(path))
    return path


@pytest.mark.parametrize(
    "words, expect",
    [
        (hints.PYTHON, "get_model(NAME, pretrained=FILE)"),
        (hints.CLI, "--model NAME"),
        (hints.CONFIG, "--set model.name=NAME"),
    ],
)
def test_a_file_without_config_names_the_model_option_of_the_caller(three_class_timm_file, words, expect):
    with hints.using(words), pytest.raises(ValueError) as e:
        load_model(three_class_timm_file)
    assert expect in str(e.value)


@pytest.mark.parametrize(
    "words, expect, absent",
    [
        (hints.PYTHON, "num_classes=N (get_model)", "--"),
        (hints.CLI, "a --model NAME with that many classes", "num_classes"),
        (hints.CONFIG, "--set model.num_classes=N", "--num-classes"),
    ],
)
def test_a_head_mismatch_names_the_class_option_of_the_caller(three_class_timm_file, words, expect, absent):
    model = get_model(small_cfg("test", 5))
    with hints.using(words), pytest.raises(ValueError) as e:
        load_checkpoint(model, three_class_timm_file)
    assert expect in str(e.value) and absent not in str(e.value).split("; ")[-1]


def test_offline_words_per_caller(tmp_path, monkeypatch):
    from eva02.weights.download import download
    from eva02.weights.zoo import WeightSource

    src = WeightSource("official", "http://127.0.0.1:9/w.pt", "w.pt")
    for words, expect in ((hints.PYTHON, "pretrained='FILE'"), (hints.CLI, "--checkpoint FILE"),
                          (hints.CONFIG, "--set model.init=FILE")):  # fmt: skip
        with hints.using(words), pytest.raises(OSError) as e:
            download(src, tmp_path, progress=False)
        assert expect in str(e.value)
    assert hints.hint("local_file") == hints.PYTHON["local_file"]  # restored after each block


def test_train_and_test_speak_config_fields(tmp_path, three_class_timm_file, capsys):
    from safetensors.torch import save_file
    from test_engine_digits import config_text, write_digits

    from eva02.cli import main

    root = write_digits(tmp_path / "d", limit=60)
    cfg = tmp_path / "c.py"
    cfg.write_text(config_text(root, epochs=1, batch=8, global_batch=8))
    # The digits config's architecture with a 3-class head, as timm would store it.
    same = random_model(small_cfg("test", 3, img_size=16, patch_size=4, dim=64, heads=1, mlp_hidden=128))
    three = tmp_path / "three.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state(same).items()}, str(three))
    assert main(["test", str(cfg), str(three)]) == 2  # a 3-class file, a 10-class config
    err = capsys.readouterr().err
    assert "--set model.num_classes=N" in err and "--num-classes" not in err
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w"), "--set",
                 f"model.init={three_class_timm_file}", "model.dim=32"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--set model.name=NAME" in err and "--model" not in err


def test_counts_agree_with_their_number():
    assert hints.count(1, "image") == "1 image" and hints.count(0, "image") == "0 images"
    assert (
        hints.count(1, "process", "processes") == "1 process"
        and hints.count(2, "process", "processes") == "2 processes"
    )
