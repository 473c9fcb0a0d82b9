"""Tests of image loading (every PIL mode, arrays, tensors, EXIF, bad files), path expansion and eval transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from eva02.data.images import ImageError, iter_image_paths, load_image, save_image_atomic
from eva02.data.transforms import eval_transform, preprocess_for_model
from eva02.imagenet import IMAGENET_CLASSES
from eva02.weights.zoo import CLIP_MEAN, CLIP_STD, Preprocess


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.fromarray(data.chelsea())  # (300, 451) RGB photo


# ----------------------------------------------------------------------------------- PIL modes
def test_rgb_file_round_trip(tmp_path, cat):
    path = tmp_path / "cat.png"
    cat.save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (451, 300)
    np.testing.assert_array_equal(np.asarray(img), data.chelsea())
    assert load_image(str(path)).size == (451, 300)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr"])
def test_plain_modes_convert_like_pil(tmp_path, cat, mode):
    src = cat.convert(mode)
    ext = ".jpg" if mode in ("CMYK", "YCbCr") else ".png"
    path = tmp_path / f"img{ext}"
    src.save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == cat.size
    with Image.open(path) as ref:
        expected = np.asarray(ref.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., 0] = 200  # hidden red under transparent pixels
    a[:, :3, 3] = 255  # left half opaque red, right half fully transparent
    a[0, 0, 3] = 128  # one half-transparent pixel
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert rgb[1, 1].tolist() == [200, 0, 0]
    assert rgb[1, 4].tolist() == [255, 255, 255]
    assert np.abs(rgb[0, 0] - [228, 127, 127]).max() <= 1  # 0.5 * red + 0.5 * white
    la = Image.fromarray(np.stack([np.full((3, 3), 10, np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    assert np.asarray(load_image(la)).min() == 255


def test_palette_with_transparent_index(tmp_path):
    p = Image.new("P", (5, 5), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "p.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255]  # transparent black -> white
    assert rgb[2, 2].tolist() == [10, 20, 30]


def test_16bit_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100], [32768, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb[..., 0].tolist() == [[0, 100], [128, 255]]
    assert (rgb[..., 0] == rgb[..., 2]).all()
    i32 = Image.fromarray(a.astype(np.int32), "I")
    assert np.asarray(load_image(i32))[..., 1].tolist() == [[0, 100], [128, 255]]
    assert np.asarray(load_image(a))[..., 0].tolist() == [[0, 100], [128, 255]]  # uint16 array


# ------------------------------------------------------------------------------ arrays, tensors
def test_arrays_and_tensors():
    rgb = data.coffee()  # (400, 600, 3) uint8
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(rgb / 255.0)), rgb)
    gray = data.camera()  # (512, 512) uint8
    out = np.asarray(load_image(gray))
    assert out.shape == (512, 512, 3) and (out[..., 1] == gray).all()
    assert np.asarray(load_image(gray[..., None])).shape == (512, 512, 3)
    rgba = np.concatenate([rgb[:2, :2], np.zeros((2, 2, 1), np.uint8)], -1)
    assert np.asarray(load_image(rgba)).min() == 255
    t = torch.from_numpy(rgb).permute(2, 0, 1)  # CHW uint8
    np.testing.assert_array_equal(np.asarray(load_image(t)), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(t.float() / 255)), rgb)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 2), np.uint8), "expected HW or HWC"),
        (np.full((4, 4, 3), 2.0), r"must be in \[0, 1\]"),
        (np.full((4, 4), -3, np.int32), "outside 0..255"),
        (torch.zeros(2, 3, 8, 8), "not one image"),
        (torch.zeros(5, 8, 8), "not CHW"),
        (12345, "cannot load an image from a int"),
    ],
)
def test_bad_arrays(bad, match):
    with pytest.raises(ImageError, match=match):
        load_image(bad)


# -------------------------------------------------------------------------------------- EXIF
def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left red
    a[:, 20:] = (0, 0, 255)  # right blue
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left column becomes the top row
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    px = np.asarray(out).astype(int)
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60  # top red
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 60  # bottom blue


# --------------------------------------------------------------------------------- bad files
def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _corrupt_png(path):
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    start = raw.index(b"IDAT") + 200
    raw[start : start + 400] = bytes(400)  # zeros inside the compressed stream
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "no such file"),
        ("empty", "empty"),
        ("text", "not an image"),
        ("truncated", "truncated or corrupt"),
        ("corrupt", "truncated or corrupt"),
        ("dir", "directory"),
    ],
)
def test_bad_files_name_the_file(tmp_path, kind, reason):
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a picture\n")
    elif kind == "truncated":
        _truncated_jpeg(path)
    elif kind == "corrupt":
        path = tmp_path / "bad_corrupt.png"
        _corrupt_png(path)
    elif kind == "dir":
        path.mkdir()
    with pytest.raises(ImageError, match=reason) as e:
        load_image(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


@pytest.mark.parametrize("side", [40, 60])  # 1600 px: PIL warns; 3600 px: PIL raises
def test_decompression_bomb_refused(tmp_path, monkeypatch, side):
    Image.new("RGB", (side, side)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too many pixels.*MAX_IMAGE_PIXELS") as e:
        load_image(tmp_path / "big.png")
    assert "big.png" in str(e.value)


# ------------------------------------------------------------------------------- paths, saving
def test_iter_image_paths(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for rel in ["z.jpg", "a.PNG", "b/c/d.webp", "b/x.tiff", "b/notes.txt", ".cache/h.jpg", "b/.hidden.png"]:
        (tmp_path / rel).write_bytes(b"x")
    explicit = tmp_path / "b" / "notes.txt"
    got = iter_image_paths([tmp_path, explicit, tmp_path / "z.jpg", tmp_path / "missing.jpg"])
    rel = [p.relative_to(tmp_path).as_posix() for p in got]
    assert rel == ["a.PNG", "b/c/d.webp", "b/x.tiff", "z.jpg", "b/notes.txt", "missing.jpg"]
    assert iter_image_paths(str(tmp_path / "z.jpg")) == [tmp_path / "z.jpg"]


def test_save_image_atomic(tmp_path, cat):
    out = save_image_atomic(cat, tmp_path / "sub" / "o.png")
    assert out.exists() and list(out.parent.iterdir()) == [out]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(cat))
    with pytest.raises(ImageError, match="unknown image extension"):
        save_image_atomic(cat, tmp_path / "o.xyz")
    assert not (tmp_path / "o.xyz").exists()


# ---------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("crop_pct, crop_mode", [(1.0, "center"), (0.9, "center"), (1.0, "squash")])
def test_eval_transform_matches_timm(cat, crop_pct, crop_mode):
    timm_data = pytest.importorskip("timm.data")
    pre = Preprocess(img_size=112, crop_pct=crop_pct, crop_mode=crop_mode)
    ours = eval_transform(pre)(cat)
    ref = timm_data.create_transform(
        input_size=(3, 112, 112),
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation="bicubic",
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )(cat)
    assert ours.shape == (3, 112, 112) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_eval_transform_override_and_errors(cat):
    pre = Preprocess(img_size=224)
    x = eval_transform(pre, img_size=70)(cat)
    assert x.shape == (3, 70, 70)
    # normalised with the CLIP statistics: a white image maps to (1 - mean) / std
    white = eval_transform(pre, img_size=28)(Image.new("RGB", (50, 40), (255, 255, 255)))
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(white[:, 3, 3], expected)
    with pytest.raises(ValueError, match="crop_mode"):
        eval_transform(Preprocess(img_size=28, crop_mode="border"))
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(Preprocess(img_size=28, crop_pct=0.0))

    class Fake(torch.nn.Module):
        cfg = type("C", (), {"img_size": 336})()

    assert preprocess_for_model(Fake()) == Preprocess(img_size=336, crop_pct=1.0)


def test_imagenet_classes():
    assert len(IMAGENET_CLASSES) == 1000 == len(set(IMAGENET_CLASSES))
    assert (
        IMAGENET_CLASSES[0] == "tench" and IMAGENET_CLASSES[281] == "tabby" and IMAGENET_CLASSES[999] == "toilet tissue"
    )
    meta = pytest.importorskip("torchvision.models._meta")
    assert IMAGENET_CLASSES == tuple(meta._IMAGENET_CATEGORIES)
