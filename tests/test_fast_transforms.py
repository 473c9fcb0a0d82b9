"""The train transform's fast form (`eva02.data.fast_transforms`) against the reference
(`train_transforms.train_transform`): the same random crops, the same augmentation statistics, outputs within
resize rounding; reduced-size JPEG decoding that keeps the crop distribution and stays close to full decoding;
deferred decoding in the datasets (folders and shards alike)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.transforms import v2

from eva02.data.datasets import BadSample, ImageDataset, build_dataset, takes_encoded
from eva02.data.fast_transforms import (
    FastTrainTransform,
    decode_hwc,
    decode_reduction,
    sample_crop,
)
from eva02.data.images import EncodedImage, decode_image, deferred_jpeg_decoding
from eva02.data.train_transforms import train_transform, train_transform_from
from eva02.engine.config import DataCfg
from eva02.weights.zoo import CLIP_MEAN, CLIP_STD

FT = dict(mean=CLIP_MEAN, std=CLIP_STD, scale=(0.08, 1.0), randaug_n=2, randaug_m=9, randaug_mstd=0.5)


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def encoded(data_: bytes, name: str = "x.jpg") -> EncodedImage:
    with deferred_jpeg_decoding():
        out = decode_image(data_, name)
    assert isinstance(out, EncodedImage)
    return out


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg_bytes(Image.fromarray(data.astronaut()))  # 512 x 512


def seeded(fn, seed: int, *args):
    torch.manual_seed(seed)
    return fn(*args)


# ------------------------------------------------------------------------------------ the crop
@pytest.mark.parametrize("hw", [(375, 500), (500, 333), (64, 2000), (2000, 40)])  # the last two: the fallback
def test_crops_are_torchvision_draws(hw) -> None:
    rrc = v2.RandomResizedCrop(112, scale=(0.08, 1.0))
    make_params = getattr(rrc, "make_params", None) or rrc._get_params
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    probe = torch.empty((3, *hw), dtype=torch.uint8)
    for seed in range(200):
        ref = seeded(make_params, seed, [probe])
        ours = seeded(sample_crop, seed, hw[0], hw[1], (0.08, 1.0), log_ratio)
        assert ours == (ref["top"], ref["left"], ref["height"], ref["width"]), seed


def test_reduction_never_makes_the_crop_smaller_than_the_output() -> None:
    assert decode_reduction(1000, 900, 224, 224) == 4 and decode_reduction(447, 1000, 224, 224) == 1
    assert decode_reduction(448, 448, 224, 224) == 2 and decode_reduction(4000, 4000, 224, 224) == 8
    for h in range(1, 1200, 7):
        r = decode_reduction(h, h + 13, 112, 112)
        assert r in (1, 2, 4, 8) and (r == 1 or h >= r * 112)


def test_reduced_decoding_keeps_the_crop_distribution(monkeypatch) -> None:
    """The boxes the reduced path resamples, mapped back to full size, against torchvision's draws for the
    same seeds: the same area fractions and aspect ratios, sample by sample and in distribution."""
    width, height, size = 800, 600, 48
    raw = jpeg_bytes(Image.fromarray(data.astronaut()).resize((width, height)), quality=80)
    tf = FastTrainTransform(size, CLIP_MEAN, CLIP_STD, scale=(0.01, 1.0), hflip=0.0, randaug_n=0)
    rrc = v2.RandomResizedCrop(size, scale=(0.01, 1.0))
    make_params = getattr(rrc, "make_params", None) or rrc._get_params
    probe = torch.empty((3, height, width), dtype=torch.uint8)
    boxes, resize = [], Image.Image.resize

    def spy(img, size_, resample=None, box=None, reducing_gap=None):
        f = width / img.size[0]  # the decoder's scale, 2, 4 or 8
        boxes.append((f, box[0] * f, box[1] * f, box[2] * f, box[3] * f))
        return resize(img, size_, resample, box, reducing_gap)

    monkeypatch.setattr(Image.Image, "resize", spy)
    ref, red = [], []
    for seed in range(240):
        p = seeded(make_params, seed, [probe])
        boxes.clear()
        seeded(tf, seed, encoded(raw))
        if not boxes:  # not reduced: cropped on the full-size pixels
            continue
        f, x0, y0, x1, y1 = boxes[0]
        assert f in (2, 4, 8) and min(x1 - x0, y1 - y0) >= f * size
        ref.append((p["height"] * p["width"] / (width * height), p["width"] / p["height"], p["left"], p["top"]))
        red.append(((x1 - x0) * (y1 - y0) / (width * height), (x1 - x0) / (y1 - y0), x0, y0))
    ref, red = np.array(ref), np.array(red)
    assert len(red) > 120 and {b[0] for b in boxes} <= {2, 4, 8}
    np.testing.assert_allclose(red, ref, rtol=1e-9)  # sample by sample: the reference's box
    for k in range(2):  # and so its statistics: scale, ratio
        assert abs(red[:, k].mean() - ref[:, k].mean()) < 1e-6 and abs(red[:, k].std() - ref[:, k].std()) < 1e-6


# ------------------------------------------------------------------------------------ outputs
def test_fast_output_is_the_reference_output_within_resize_rounding(photo) -> None:
    """Same seed, same draws: the fast transform (full decoding) gives the reference's tensor but for the
    uint8 resize's rounding (values within 2 of PIL's, most equal)."""
    img = decode_image(photo, "astronaut")
    ref, fast = train_transform(96, reprob=0.25, **FT), FastTrainTransform(96, reprob=0.25, reduced_decode=False, **FT)
    for seed in range(24):
        a, b = seeded(ref, seed, img), seeded(fast, seed, encoded(photo))
        assert a.shape == b.shape == (3, 96, 96) and a.dtype == b.dtype == torch.float32
        assert (a - b).abs().mean() < 0.01, seed  # normalised units; one uint8 level is ~0.015


def test_uint8_output_is_the_normalised_output_before_normalising(photo) -> None:
    u8, f32 = FastTrainTransform(80, normalize=False, **FT), FastTrainTransform(80, **FT)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for seed in range(6):
        x, y = seeded(u8, seed, encoded(photo)), seeded(f32, seed, encoded(photo))
        assert x.dtype == torch.uint8 and x.shape == (3, 80, 80) and x.is_contiguous()
        torch.testing.assert_close((x / 255 - mean) / std, y, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reprob"):
        FastTrainTransform(80, normalize=False, reprob=0.25, **FT)


def test_output_statistics_match_the_reference(photo) -> None:
    """Per-channel mean and spread of the outputs over many seeds, reduced decoding on, against the reference."""
    img = decode_image(photo, "astronaut")
    ref, fast = train_transform(64, **FT), FastTrainTransform(64, **FT)
    a = torch.stack([seeded(ref, s, img) for s in range(96)])
    b = torch.stack([seeded(fast, s, encoded(photo)) for s in range(96)])
    torch.testing.assert_close(b.mean((0, 2, 3)), a.mean((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(b.std((0, 2, 3)), a.std((0, 2, 3)), atol=0.01, rtol=0)


def test_reduced_decoding_is_close_to_full_decoding(photo) -> None:
    """Without RandAugment (whose histogram ops amplify small differences), the reduced path's image for a
    seed is the full-decode image up to the decoder's scaling: PSNR over 33 dB, where the crop allowed it."""
    kw = dict(mean=CLIP_MEAN, std=CLIP_STD, scale=(0.08, 1.0), randaug_n=0)
    full, reduced = FastTrainTransform(112, reduced_decode=False, **kw), FastTrainTransform(112, **kw)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    psnr = []
    for seed in range(40):
        if seeded(reduced.plan, seed, 512, 512)[-1] == 1:
            continue
        a, b = seeded(full, seed, encoded(photo)), seeded(reduced, seed, encoded(photo))
        mse = (((a - b) * std) ** 2).mean().item()  # in [0, 1] pixel units
        psnr.append(10 * math.log10(1 / mse))
    assert len(psnr) >= 8 and min(psnr) > 33, psnr


def test_exif_rotated_jpeg_is_cropped_upright() -> None:
    """The crop is drawn on the upright geometry and the reduced image is rotated like the full one."""
    src = Image.fromarray(data.astronaut()).resize((512, 384))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    raw = jpeg_bytes(src, exif=exif.tobytes())
    upright = decode_image(raw, "rotated")
    assert encoded(raw).size == upright.size == (384, 512)
    kw = dict(mean=CLIP_MEAN, std=CLIP_STD, randaug_n=0)
    ref, fast = train_transform(64, **kw), FastTrainTransform(64, **kw)
    for seed in range(12):
        a, b = seeded(ref, seed, upright), seeded(fast, seed, encoded(raw))
        assert (a - b).abs().mean() < 0.1, seed


def test_torchvision_decoder_gives_pils_pixels(photo) -> None:
    hwc = decode_hwc(encoded(photo))
    assert hwc.shape == (512, 512, 3) and hwc.dtype == torch.uint8
    diff = (hwc.int() - torch.from_numpy(np.array(decode_image(photo, "x"))).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    small, factor = encoded(photo).decode(4)
    assert factor == 4 and small.size == (128, 128)


# ------------------------------------------------------------------------------------ datasets
def write_jpegs(root: Path) -> None:
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=85 + i)
    Image.fromarray(data.astronaut()[::4, ::4]).save(root / "c1" / "small.png")  # decoded as always


def test_folder_and_shards_give_the_same_tensors(tmp_path: Path) -> None:
    pytest.importorskip("wids")
    from eva02.data.shard_writer import scan_source, write_shards
    from eva02.data.shards import shard_dataset

    write_jpegs(tmp_path / "train")
    write_shards(scan_source(tmp_path / "train"), tmp_path / "shards", shard_size=300_000)
    tf = FastTrainTransform(64, **FT)
    folder = build_dataset(str(tmp_path), "train", "", "", tf)
    shards = shard_dataset(str(tmp_path / "shards"), tf)
    assert len(folder) == len(shards) == 5
    for i in range(len(folder)):
        for seed in (0, 12345):
            a, b = folder[(i, seed)], shards[(i, seed)]
            assert a[1:] == b[1:]
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)


def test_datasets_defer_decoding_only_for_transforms_that_take_it(tmp_path: Path) -> None:
    write_jpegs(tmp_path)
    (tmp_path / "c0" / "broken.jpg").write_bytes(jpeg_bytes(Image.fromarray(data.coffee()))[:5000])
    seen = []

    class Spy:
        takes_encoded = True

        def __call__(self, img):
            seen.append(type(img).__name__)
            return img.decode()[0] if isinstance(img, EncodedImage) else img

    class Wrapper:  # as the MIM task's MaskedView wraps the train transform
        def __init__(self, transform) -> None:
            self.transform = transform

        def __call__(self, img):
            return self.transform(img)

    assert takes_encoded(Wrapper(Spy())) and not takes_encoded(Wrapper(lambda x: x))
    samples = [(str(p), 0) for p in sorted(tmp_path.rglob("*.*"))]
    ds = ImageDataset(samples, ["a"], Wrapper(Spy()))
    out = [ds[(i, 0)] for i in range(len(ds))]
    assert sorted(seen) == ["EncodedImage"] * 5 + ["Image"]  # the PNG decoded as always; the broken JPEG too
    bad = [o for o in out if isinstance(o, BadSample)]
    assert len(bad) == 1 and "broken.jpg" in bad[0].path and "truncated" in bad[0].reason
    seen.clear()
    assert not isinstance(ImageDataset(samples, ["a"], lambda x: x)[(0, 0)][0], EncodedImage)


def test_the_config_chooses_the_transform() -> None:
    assert isinstance(train_transform_from(DataCfg(), 64), FastTrainTransform)
    assert train_transform_from(DataCfg(), 64).reduced_decode
    assert not train_transform_from(DataCfg(reduced_decode=False), 64).reduced_decode
    assert isinstance(train_transform_from(DataCfg(fast_transforms=False), 64), v2.Compose)


def test_eval_transforms_name_torchvisions_interpolations_without_importing_it() -> None:
    from eva02.data.transforms import INTERPOLATIONS

    assert set(INTERPOLATIONS) == {m.value for m in v2.InterpolationMode}
    code = "import sys, eva02.data.transforms, eva02.inference; print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
