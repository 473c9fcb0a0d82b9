"""Tests of `inference_model`, `Predictor`, the batched file loop and the top-k drawing (small random models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from eva02.data.transforms import eval_transform
from eva02.imagenet import IMAGENET_CLASSES
from eva02.inference import Predictor, draw_topk, inference_model, iter_file_batches
from eva02.model.config import VARIANTS
from eva02.model.vit import Eva02
from eva02.weights.zoo import Preprocess


@pytest.fixture(scope="module")
def model() -> Eva02:
    torch.manual_seed(0)
    m = Eva02(VARIANTS["test"].replace(num_classes=1000)).eval()
    with torch.no_grad():  # a head with spread-out logits, so the ranking is not a near-tie
        m.head.weight.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    arrays = {"cat": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut()}
    for name, a in arrays.items():
        Image.fromarray(a).save(d / f"{name}.png")
    return d, arrays


def _expected_probs(m: Eva02, img: Image.Image, pre: Preprocess) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(m(eval_transform(pre)(img)[None]), -1)[0].numpy()


def _check_result(r: dict, names=IMAGENET_CLASSES) -> None:
    num_classes = len(names)
    p = r["pred_scores"]
    assert p.dtype == np.float32 and p.shape == (num_classes,)
    assert abs(float(p.sum()) - 1.0) < 1e-5 and (p >= 0).all()
    assert r["pred_label"] == int(p.argmax()) and isinstance(r["pred_label"], int)
    assert r["pred_score"] == pytest.approx(float(p.max()))
    scores = [s for _, _, s in r["topk"]]
    assert scores == sorted(scores, reverse=True)
    assert r["topk"][0] == (r["pred_label"], r["pred_class"], r["pred_score"])
    for label, name, score in r["topk"]:
        assert score == pytest.approx(float(p[label])) and name == names[label]


def test_inference_on_path_pil_array_list(model, photos):
    d, arrays = photos
    pre = Preprocess(img_size=model.cfg.img_size)
    expected = _expected_probs(model, Image.fromarray(arrays["cat"]), pre)
    for src in (d / "cat.png", str(d / "cat.png"), Image.fromarray(arrays["cat"]), arrays["cat"]):
        r = inference_model(model, src, topk=3)
        _check_result(r)
        assert len(r["topk"]) == 3
        assert r["pred_class"] == IMAGENET_CLASSES[r["pred_label"]]
        np.testing.assert_allclose(r["pred_scores"], expected, atol=1e-6)
    assert len({np.argmax(_expected_probs(model, Image.fromarray(a), pre)) for a in arrays.values()}) > 1

    many = inference_model(model, [d / "cat.png", arrays["coffee"], Image.fromarray(arrays["astronaut"])], batch_size=2)
    assert isinstance(many, list) and len(many) == 3
    for r, a in zip(many, arrays.values(), strict=True):
        _check_result(r)
        np.testing.assert_allclose(r["pred_scores"], _expected_probs(model, Image.fromarray(a), pre), atol=1e-5)


def test_preprocess_override_changes_the_input_size(model, photos):
    _, arrays = photos
    pre = Preprocess(img_size=28, crop_pct=0.875)
    r = inference_model(model, arrays["coffee"], preprocess=pre)
    np.testing.assert_allclose(
        r["pred_scores"], _expected_probs(model, Image.fromarray(arrays["coffee"]), pre), atol=1e-6
    )
    default = inference_model(model, arrays["coffee"])
    assert np.abs(default["pred_scores"] - r["pred_scores"]).max() > 1e-6


def test_class_names():
    torch.manual_seed(1)
    m = Eva02(VARIANTS["test"].replace(num_classes=4, img_size=28))
    img = np.full((30, 40, 3), 128, np.uint8)
    r = inference_model(m, img, topk=10)
    _check_result(r, names=[f"class_{i}" for i in range(4)])
    assert len(r["topk"]) == 4  # topk is clipped to the number of classes
    assert r["pred_class"] == f"class_{r['pred_label']}"
    names = ["ant", "bee", "cat", "dog"]
    r = inference_model(m, img, class_names=names)
    assert r["pred_class"] == names[r["pred_label"]]
    with pytest.raises(ValueError, match="class_names has 2 names but the model has 4 classes"):
        inference_model(m, img, class_names=["a", "b"])
    with pytest.raises(ValueError, match="topk must be >= 1"):
        inference_model(m, img, topk=0)


def test_headless_model_refused():
    m = Eva02(VARIANTS["test"])
    with pytest.raises(ValueError, match=r"no classifier head.*extract_feat\(x\).*eva02 features"):
        inference_model(m, np.zeros((8, 8, 3), np.uint8))


def test_headless_zoo_name_refused_before_download():
    with pytest.raises(ValueError, match="eva02-tiny-p14_in21k-pre_3rdparty_in21k' has no classifier head"):
        inference_model("eva02-tiny-p14_in21k-pre_3rdparty_in21k", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown model name"):
        inference_model("eva02-huge-p14", np.zeros((8, 8, 3), np.uint8))


def test_predictor_reuse_and_errors(model, photos):
    d, _ = photos
    pred = Predictor(model, batch_size=2)
    assert pred.device == torch.device("cpu") and len(pred.class_names) == 1000
    res = pred.predict([d / "cat.png", d / "coffee.png", d / "astronaut.png"], topk=2)
    assert [len(r["topk"]) for r in res] == [2, 2, 2]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Predictor(model, batch_size=0)
    with pytest.raises(ValueError, match="unknown device"):
        Predictor(model, device="tpu:9")


@pytest.mark.parametrize("workers", [0, 2])
def test_file_batches_skip_bad_files(photos, tmp_path, workers):
    d, arrays = photos
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [d / "cat.png", bad, d / "coffee.png", tmp_path / "gone.png", d / "astronaut.png"]
    tf = eval_transform(Preprocess(img_size=28))
    seen, errors = [], []
    for idx, batch, errs in iter_file_batches(paths, tf, batch_size=2, workers=workers):
        assert batch is None or batch.shape == (len(idx), 3, 28, 28)
        if batch is not None:
            torch.testing.assert_close(batch[0], tf(Image.fromarray(arrays[paths[idx[0]].stem])))
        seen += idx
        errors += errs
    assert seen == [0, 2, 4]
    assert [i for i, _ in errors] == [1, 3]
    assert "broken.jpg" in errors[0][1] and "gone.png" in errors[1][1] and "no such file" in errors[1][1]


def test_draw_topk_bars_proportional():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    result = {"topk": [(281, "tabby", 0.8), (285, "Egyptian cat", 0.1)]}
    out = draw_topk(img, result, width=400)
    assert out.size[0] == 400 and out.size[1] > 200  # image scaled to 400x200 plus a panel
    px = np.asarray(out).astype(int)
    panel = px[200:]
    green = (panel[..., 1] > 140) & (panel[..., 0] < 60) & (panel[..., 2] < 100)  # top-1 bar colour
    blue = (panel[..., 2] > 200) & (panel[..., 0] < 100)  # other bars
    bar_w = 400 // 2 - 8 - 56
    assert abs(green.sum(axis=1).max() - 0.8 * bar_w) <= 2
    assert abs(blue.sum(axis=1).max() - 0.1 * bar_w) <= 2


def test_zoo_name_with_timm_checkpoint_matches_timm_pipeline(tmp_path, capsys):
    """Name + checkpoint: zoo preprocessing, conversion and softmax equal timm's own pipeline end to end."""
    timm = pytest.importorskip("timm")
    timm_data = pytest.importorskip("timm.data")
    from safetensors.torch import save_file

    from eva02.assets import DEMO_IMAGE
    from eva02.cli import main

    torch.manual_seed(0)
    ref_model = timm.create_model("eva02_tiny_patch14_336.mim_in22k_ft_in1k", pretrained=False).eval()
    with torch.no_grad():
        ref_model.head.weight.normal_(0, 0.5)
    ckpt = tmp_path / "timm_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, ckpt)
    tf = timm_data.create_transform(**timm_data.resolve_data_config({}, model=ref_model))
    with torch.no_grad():
        ref = torch.softmax(ref_model(tf(Image.open(DEMO_IMAGE).convert("RGB"))[None]), -1)[0].numpy()

    name = "eva02-tiny-p14_in21k-pre_3rdparty_in1k"
    pred = Predictor(name, checkpoint=ckpt, device="cpu")
    assert pred.preprocess.img_size == 336
    r = pred.predict([DEMO_IMAGE])[0]
    np.testing.assert_allclose(r["pred_scores"], ref, atol=1e-5)
    assert r["pred_label"] == int(ref.argmax())

    assert main(["predict", str(DEMO_IMAGE), "--model", name, "--checkpoint", str(ckpt), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["pred_label"] == int(ref.argmax()) and rec["pred_score"] == pytest.approx(float(ref.max()), abs=1e-5)
