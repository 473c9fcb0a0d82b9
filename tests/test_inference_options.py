"""inference_model / eva02 predict options: dtype, torch.compile, threads."""

import functools

import numpy as np
import pytest
import torch
from skimage import data

from eva02 import VARIANTS, Eva02, inference_model
from eva02.inference import Predictor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Eva02(VARIANTS["test"].replace(num_classes=1000))
    with torch.no_grad():
        m.head.weight.normal_(0, 0.5)  # spread the scores so top-1 is well defined
    return m.eval()


def test_bf16_close_to_fp32(model):
    img = data.chelsea()
    ref = inference_model(model, img)
    low = inference_model(model, img, dtype="bf16")
    assert low["pred_scores"].dtype == np.float32
    assert np.abs(low["pred_scores"] - ref["pred_scores"]).max() < 5e-3
    assert not np.array_equal(low["pred_scores"], ref["pred_scores"]), "bf16 must really change the arithmetic"


# "aot_eager" runs the graphs dynamo and AOTAutograd make of the model on PyTorch's kernels; "inductor"
# (what `compile=True` uses, with freezing on CPU) also generates and builds C++ for them: tens of seconds
# on 2 cores whenever the model's code changed since its cache was filled.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_matches_eager(model, backend, monkeypatch):
    if backend != "inductor":
        compile_with = functools.partial(torch.compile, backend=backend)
        monkeypatch.setattr(torch, "compile", compile_with)
    imgs = [data.chelsea(), data.coffee(), data.astronaut()]
    ref = inference_model(model, imgs, batch_size=2)
    # One batch: one graph to compile (each further batch shape costs as much again on CPU).
    predictor = Predictor(model, batch_size=3, compile=True)
    assert predictor.compile_options == {"freezing": True}  # what makes compiled inference pay on CPU
    comp = predictor.predict(imgs)
    for a, b in zip(ref, comp, strict=True):
        np.testing.assert_allclose(a["pred_scores"], b["pred_scores"], atol=1e-5)
        assert a["pred_label"] == b["pred_label"]


def test_threads_and_bad_values(model):
    before = torch.get_num_threads()
    try:
        Predictor(model, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        Predictor(model, threads=0)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Predictor(model, dtype="fp16", device="cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Predictor(model, dtype="int8")


def test_predict_cli_dtype_and_threads(model, tmp_path, capsys):
    from PIL import Image

    from eva02.cli import main
    from eva02.weights.load import save_checkpoint

    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(model, ckpt)
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    before = torch.get_num_threads()
    try:
        rc = main(["predict", str(tmp_path / "cat.png"), "--checkpoint", str(ckpt), "--json", "--dtype", "bf16",
                   "--threads", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    assert '"pred_label"' in capsys.readouterr().out
    rc = main(["predict", str(tmp_path / "cat.png"), "--checkpoint", str(ckpt), "--dtype", "fp16"])
    assert rc == 2
    assert "needs a CUDA device" in capsys.readouterr().err
