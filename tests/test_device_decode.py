"""Train JPEGs decoded on the device (data.decode_on_device): the workers draw the fast transform's crops and flips,
the loop decodes, crops, resizes and normalises; the pixels are the fast transform's up to the resize's rounding;
what the device decoder does not take is decoded in the workers; training takes the steps of the run that decodes
in the workers; the config allows it only without RandAugment and random erasing.

Tolerance against `FastTrainTransform(normalize=False, reduced_decode=False)` on the CPU: the same libjpeg-turbo
decoder gives the same full-size pixels, and the resize makes the same two rounded passes (horizontal, then
vertical), in float32 instead of torch's fixed-point uint8 weights: values differ by at most 2 (of 255), in well
under 2% of places (0.4% measured on noisy photos at 32-224 px).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_device_normalize import fit_recording
from test_engine_digits import config_text

from eva02.data.datasets import BadSample, ImageDataset, collate
from eva02.data.device_decode import (
    DeviceDecodeTransform,
    EncodedBatch,
    EncodedCrop,
    decode_batch,
    device_decodable,
    stack_images,
)
from eva02.data.fast_transforms import FastTrainTransform, train_transform_for
from eva02.data.images import ImageError, decode_image, deferred_jpeg_decoding
from eva02.engine.config import ConfigError, RunConfig, load_config, override
from eva02.engine.loader import DeviceNormalize, to_device
from eva02.engine.tasks.mim import MimTask, collate_masked

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), randaug_n=0, scale=(0.08, 1.0))


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A detailed, left-right asymmetric RGB image (waves, a ramp, noise): flips and shifted crops show."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / 7.0), 128 + 100 * np.cos(y / 5.0 + x / 11.0), x * 255.0 / w], -1)
    a = a + np.random.default_rng(seed).normal(0, 25, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def encoded(data: bytes, name: str = "x.jpg"):
    with deferred_jpeg_decoding():
        return decode_image(data, name)


def on_device(items: list, device: str = "cpu") -> torch.Tensor:
    """The images (B, 3, S, S) float32 of whole values that the loop gets from these transform outputs."""
    batch = stack_images(items)
    return decode_batch(batch.to(device)) if isinstance(batch, EncodedBatch) else batch.float()


def both(data: bytes, size: int, seeds, **kw) -> tuple[list, list, bool]:
    """(the fast transform's uint8 pixels, the device transform's outputs) of `data` for each seed, and whether
    the generator ended in the same state after both (as many draws)."""
    kw = {**KW, "reduced_decode": False, **kw}  # the device decodes at full size; so does the CPU path here
    dev = DeviceDecodeTransform(FastTrainTransform(size, **kw))
    ref, out, same = [], [], True
    for s in seeds:
        torch.manual_seed(s)
        ref.append(FastTrainTransform(size, normalize=False, **kw)(encoded(data)))
        after = torch.rand(1)
        torch.manual_seed(s)
        out.append(dev(encoded(data)))
        same = same and torch.equal(after, torch.rand(1))
    return ref, out, same


def assert_close_pixels(got: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (got - ref.float()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02, (diff.max(), (diff > 0).float().mean())


def test_crops_and_flips_are_the_fast_transforms() -> None:
    data = encode(Image.fromarray(photo(120, 160)), quality=92)
    fast = FastTrainTransform(32, **KW)
    plans = []
    spy = fast.plan
    fast.plan = lambda w, h: plans.append(spy(w, h)) or plans[-1]  # what the fast transform draws
    seeds = range(12)
    for s in seeds:
        torch.manual_seed(s)
        fast(encoded(data))
    ref, out, same = both(data, 32, seeds)
    assert same  # as many draws: a mask drawn after the image (MIM) stays the same
    assert all(isinstance(o, EncodedCrop) for o in out)
    assert device_decodable(encoded(encode(Image.fromarray(photo(50, 70)), quality=90, progressive=True)))
    assert [o.plan.box for o in out] == [p[:4] for p in plans]
    assert len({o.plan.box for o in out}) == len(out) and {o.plan.flip for o in out} == {True, False}
    got = on_device(out)
    assert_close_pixels(got, torch.stack(ref))
    for g, r in zip(got, ref, strict=True):  # the flip is the drawn one: the mirror image is far off
        assert (g - r.flip(-1).float()).abs().mean() > 10


@pytest.mark.parametrize(
    ("h", "w", "size", "interpolation"),
    [(60, 50, 96, "bicubic"), (301, 203, 64, "bilinear"), (90, 90, 48, "nearest"), (480, 640, 224, "bicubic")],
)
def test_pixels_are_the_fast_transforms_up_to_rounding(h, w, size, interpolation) -> None:
    data = encode(Image.fromarray(photo(h, w, seed=h)), quality=90)
    ref, out, _ = both(data, size, range(6), interpolation=interpolation)
    got = on_device(out)
    assert got.shape == (6, 3, size, size) and got.dtype == torch.float32
    assert_close_pixels(got, torch.stack(ref))
    if interpolation == "nearest":  # no resampling arithmetic: the same pixels
        assert torch.equal(got, torch.stack(ref).float())


def _fallbacks() -> dict[str, bytes]:
    img = Image.fromarray(photo(50, 70, seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    return {
        "png": encode(img, "PNG"),
        "exif_rotated": encode(img, quality=90, exif=exif),
        "cmyk": encode(img.convert("CMYK"), quality=90),
        "gray": encode(img.convert("L"), quality=90),
        "webp": encode(img, "WEBP"),
        "data_after_end": encode(img, quality=90) + b"trailing",
    }


@pytest.mark.parametrize("kind", sorted(_fallbacks()))
def test_images_the_device_does_not_take_are_decoded_in_the_worker(kind) -> None:
    data = _fallbacks()[kind]
    assert not device_decodable(encoded(data))
    ref, out, same = both(data, 24, range(3))
    assert same
    for r, o in zip(ref, out, strict=True):
        assert o.dtype == torch.uint8 and torch.equal(o, r)  # the fast transform's CPU path itself


def test_a_batch_holds_both_kinds_in_order() -> None:
    jpeg = encode(Image.fromarray(photo(64, 80)), quality=90)
    sources = [jpeg, _fallbacks()["png"], jpeg, _fallbacks()["cmyk"], jpeg]
    ref, out = [], []
    for i, data in enumerate(sources):
        r, o, _ = both(data, 24, [i])
        ref += r
        out += o
    batch = stack_images(out)
    assert isinstance(batch, EncodedBatch) and batch.at == (0, 2, 4) and batch.shape == (5, 3, 24, 24)
    assert batch.ready.shape == (2, 3, 24, 24) and batch.data.numel() == 3 * len(jpeg)
    assert all(torch.equal(j, torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)) for j in batch.jpegs())
    got = decode_batch(batch)
    assert_close_pixels(got, torch.stack(ref))
    assert torch.equal(got[1], ref[1].float()) and torch.equal(got[3], ref[3].float())
    parts = decode_batch(batch, max_bytes=1)  # one JPEG at a time: the same images
    assert torch.equal(parts, got)
    plain = stack_images([ref[1], ref[3]])  # no JPEG for the device: stacked as always
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, torch.stack([ref[1], ref[3]]))


def test_loop_step_normalises_as_the_cpu_and_keeps_other_keys() -> None:
    data = encode(Image.fromarray(photo(64, 80)), quality=90)
    seeds = range(4)
    norm_ref = []
    for s in seeds:
        torch.manual_seed(s)
        norm_ref.append(FastTrainTransform(24, reduced_decode=False, **KW)(encoded(data)))
    _, out, _ = both(data, 24, seeds)
    batch = {"images": stack_images(out), "targets": torch.arange(4), "bad": []}
    assert batch["images"].shape[0] == 4  # what the loop counts before moving the batch
    step = DeviceNormalize(KW["mean"], KW["std"])
    got = to_device(batch, torch.device("cpu"), step)
    assert got["images"].dtype == torch.float32 and torch.equal(got["targets"], torch.arange(4))
    one_level = 1 / (255 * min(KW["std"]))
    assert (got["images"] - torch.stack(norm_ref)).abs().max() <= 2 * one_level + 1e-5
    half = DeviceNormalize(KW["mean"], KW["std"], torch.bfloat16)({**batch, "images": stack_images(out)})
    assert half["images"].dtype == torch.bfloat16 and torch.allclose(half["images"].float(), got["images"], atol=0.05)


def test_corrupt_files_are_bad_samples_in_the_worker_or_a_clear_error_on_the_device(tmp_path) -> None:
    good = encode(Image.fromarray(photo(40, 60)), quality=90)
    scan = good.index(b"\xff\xda")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])  # no end marker: decoded in the worker
    (tmp_path / "no_scan.jpg").write_bytes(good[:scan] + good[-2:])  # a header alone: decoded in the worker
    (tmp_path / "good.jpg").write_bytes(good)
    names = ["truncated.jpg", "no_scan.jpg", "good.jpg"]
    ds = ImageDataset([(str(tmp_path / n), i) for i, n in enumerate(names)], names,
                      DeviceDecodeTransform(FastTrainTransform(24, **KW)))  # fmt: skip
    items = [ds[(i, i)] for i in range(3)]
    assert [type(it) for it in items[:2]] == [BadSample, BadSample] and "no_scan.jpg" in items[1].path
    batch = collate(items)
    assert isinstance(batch["images"], EncodedBatch) and batch["targets"].tolist() == [2] and len(batch["bad"]) == 2
    # Markers in place but the data unusable (found only when decoding): an error that names the file and the fix.
    broken = good[:scan] + b"\xff\xda\x00\x02" + good[-2:]
    img = encoded(broken, "broken.jpg")
    assert device_decodable(img)
    torch.manual_seed(0)
    out = DeviceDecodeTransform(FastTrainTransform(24, **KW))(img)
    with pytest.raises(ImageError, match=r"cannot load image 'broken.jpg': .*data.decode_on_device=false"):
        decode_batch(stack_images([out]))


# ------------------------------------------------------------------------------------ through the engine
def write_jpeg_digits(root: Path, limit: int = 60) -> Path:
    """sklearn's digits as 24 px colour JPEG class folders (every 5th image in val)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(limit):
        folder = root / ("val" if i % 5 == 0 else "train") / f"digit_{d.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        g = (d.images[i] * 255 / 16).astype(np.uint8)
        rgb = np.stack([g, 255 - g, g // 2], -1)
        Image.fromarray(rgb).resize((24, 24), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def jpeg_digits(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("devdecode")
    data = write_jpeg_digits(root / "digits")
    cfg = root / "digits.py"
    cfg.write_text(config_text(data, epochs=1, batch=8, global_batch=16, randaug=0, max_steps=2, log_every=1))
    return {"data": data, "cfg": cfg}


def test_training_takes_the_steps_of_decoding_in_the_workers(jpeg_digits, tmp_path, monkeypatch) -> None:
    base = override(load_config(jpeg_digits["cfg"]), {"data.hflip": 0.5})
    loss_a, wa, seen_a = fit_recording(base, tmp_path / "workers", monkeypatch, type)
    # Two DataLoader workers: the packed JPEGs cross shared memory (the order does not depend on workers).
    dev = override(base, {"data.decode_on_device": True, "data.workers": 2})
    loss_b, wb, seen_b = fit_recording(dev, tmp_path / "device", monkeypatch, type)
    assert seen_a == {torch.Tensor} and seen_b == {EncodedBatch}
    # Close, not equal: a few pixel values of the batch differ by 1-2 levels (module docstring).
    assert len(loss_a) == 2 and loss_a == pytest.approx(loss_b, rel=1e-3)
    # Two AdamW steps of lr 3e-3 move each weight by about 3e-3 per step: they differ by under a tenth of a step
    # (1.8e-4 measured).
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 3e-4 for k in wa)


def test_mim_views_keep_their_masks(jpeg_digits) -> None:
    base = override(load_config(jpeg_digits["cfg"]), {
        "train.task": "mim", "model.num_classes": 0, "mim.num_masking": 6, "mim.min_num": 2, "data.val_split": "",
        "data.hflip": 0.5, "data.device_normalize": True,
    })  # fmt: skip
    plain, _ = MimTask().build_datasets(base)
    dev, _ = MimTask().build_datasets(override(base, {"data.decode_on_device": True}))
    keys = [(i, 7 + i) for i in range(4)]
    a, b = collate_masked([plain[k] for k in keys]), collate_masked([dev[k] for k in keys])
    assert isinstance(b["images"], EncodedBatch) and torch.equal(a["mask"], b["mask"]) and a["mask"].dtype == torch.bool
    assert torch.equal(a["index"], b["index"])
    assert_close_pixels(decode_batch(b["images"]), a["images"])


def test_shards_hand_over_the_folders_jpegs_and_plans(jpeg_digits, tmp_path) -> None:
    pytest.importorskip("webdataset")
    from eva02.data.datasets import build_dataset, sample_seed
    from eva02.data.shard_writer import scan_source, write_shards
    from eva02.data.shards import shard_dataset

    write_shards(scan_source(jpeg_digits["data"] / "train"), tmp_path / "shards", shard_size=20_000)
    tf = DeviceDecodeTransform(FastTrainTransform(16, **KW))
    shards = shard_dataset(str(tmp_path / "shards"), tf)
    folders = build_dataset(str(jpeg_digits["data"]), "train", "", "", tf)
    for i in (0, 11, 47):
        key = (i, sample_seed(5, 2, i))
        (a, la, _), (b, lb, _) = shards[key], folders[key]
        assert isinstance(a, EncodedCrop) and la == lb and torch.equal(a.data, b.data)
        assert a.plan.box == b.plan.box and a.plan.flip == b.plan.flip and a.plan.full == b.plan.full


def test_config_allows_it_only_without_per_image_cpu_augmentation() -> None:
    ok = {"data.decode_on_device": "true", "data.randaug_n": "0"}
    assert override(RunConfig(), ok).data.decode_on_device is True
    both_on = override(RunConfig(), {**ok, "data.device_normalize": "true"})  # it includes that step
    assert isinstance(train_transform_for(both_on.data, 32), DeviceDecodeTransform)
    assert isinstance(train_transform_for(override(RunConfig(), {"data.randaug_n": "0"}).data, 32), FastTrainTransform)
    with pytest.raises(ConfigError, match=r"data.decode_on_device=True: expects False with .*data.randaug_n=2.*"
                                          r"set data.randaug_n=0 and data.reprob=0"):  # fmt: skip
        override(RunConfig(), {"data.decode_on_device": "true"})
    with pytest.raises(ConfigError, match=r"data.decode_on_device=True: expects False with .*data.reprob=0.25"):
        override(RunConfig(), {**ok, "data.reprob": "0.25"})
    with pytest.raises(ConfigError, match=r"expects False with data.fast_transforms=False"):
        override(RunConfig(), {**ok, "data.fast_transforms": "false"})
    with pytest.raises(ConfigError, match=r"data.decode_on_device=True: .*train.task='segment'"):
        override(RunConfig(), {**ok, "train.task": "segment", "data.batch_size": "2"})
    with pytest.raises(ValueError, match="data.randaug_n=0, data.reprob=0"):
        DeviceDecodeTransform(FastTrainTransform(32, mean=(0.5,) * 3, std=(0.5,) * 3, randaug_n=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoding_matches_the_cpu() -> None:
    """nvJPEG against libjpeg-turbo: torchvision holds its GPU decoder to a mean difference under 2 (of 255) from
    its CPU decoder; after the crop and resize (averages) the same bound holds per image."""
    baseline = encode(Image.fromarray(photo(375, 500, seed=1)), quality=90)
    progressive = encode(Image.fromarray(photo(333, 444, seed=2)), quality=85, progressive=True)
    sources = [baseline, progressive, _fallbacks()["png"], baseline]
    out = []
    for i, data in enumerate(sources):
        out += both(data, 224, [i])[1]
    batch = stack_images(out).pin_memory()
    cpu = decode_batch(batch)
    cuda = decode_batch(batch.to("cuda"))
    assert cuda.device.type == "cuda" and cuda.shape == cpu.shape
    per_image = (cuda.cpu() - cpu).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 2, per_image
    assert torch.equal(cuda[2].cpu(), cpu[2])  # decoded in the worker: only copied
    assert torch.equal(decode_batch(batch.to("cuda"), max_bytes=1).cpu(), cuda.cpu())
