"""uint8 train batches normalised on the device (data.device_normalize): the loader hands over uint8 images, the
loop normalises them after `to_device`, and training takes the same steps as with batches normalised on the
CPU; the config allows it only where the fast train transform gives uint8 images (no random erasing);
the MIM collate stacks as torch.stack does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_engine_digits import config_text, write_digits

from eva02.data.datasets import BadSample
from eva02.data.fast_transforms import FastTrainTransform, train_transform_for
from eva02.engine import train as train_mod
from eva02.engine.config import RunConfig, load_config, override
from eva02.engine.loader import DeviceNormalize, device_normalizer, to_device
from eva02.engine.tasks.mim import MimTask, collate_masked
from eva02.weights.zoo import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("devnorm")
    data = write_digits(root / "digits", limit=60)  # 48 train images
    cfg = root / "digits.py"
    cfg.write_text(config_text(data, epochs=1, batch=8, global_batch=16, randaug=2, max_steps=2, log_every=1))
    return {"data": data, "cfg": cfg}


def test_device_normalize_is_the_transforms_normalisation() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    kw = dict(mean=CLIP_MEAN, std=CLIP_STD, scale=(0.3, 1.0))
    xs, us = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        xs.append(FastTrainTransform(24, **kw)(img))
        torch.manual_seed(seed)
        us.append(FastTrainTransform(24, normalize=False, **kw)(img))
    batch = to_device({"images": torch.stack(us), "n": 4}, torch.device("cpu"), DeviceNormalize(CLIP_MEAN, CLIP_STD))
    assert batch["images"].dtype == torch.float32 and batch["n"] == 4
    assert torch.equal(batch["images"], torch.stack(xs))  # the same float32 arithmetic as on the CPU
    half = DeviceNormalize(CLIP_MEAN, CLIP_STD, torch.bfloat16)({"images": torch.stack(us)})["images"]
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), torch.stack(xs), atol=0.02)
    floats = {"images": torch.stack(xs)}
    assert DeviceNormalize(CLIP_MEAN, CLIP_STD)(floats) is floats  # normalised images pass as they are


def fit_recording(cfg: RunConfig, wd: Path, monkeypatch, probe=lambda images: images.dtype) -> tuple[list, dict, set]:
    """(train losses, final weights, {probe(images)} of every batch as the loader hands it to the loop) of a run."""
    seen: set = set()

    def spy(batch, device, normalize=None):
        seen.add(probe(batch["images"]))
        return to_device(batch, device, normalize)

    monkeypatch.setattr(train_mod, "to_device", spy)
    train_mod.Trainer(cfg, wd).fit()
    records = [json.loads(s) for s in (wd / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"], load_file(wd / "final.safetensors"), seen


def test_training_steps_are_those_of_cpu_normalised_batches(digits, tmp_path, monkeypatch) -> None:
    base = load_config(digits["cfg"])
    loss_a, wa, seen_a = fit_recording(override(base, {"data.device_normalize": False}), tmp_path / "cpu", monkeypatch)
    # Two DataLoader workers: the uint8 batches also cross shared memory (the order does not depend on workers).
    dev = override(base, {"data.device_normalize": True, "data.workers": 2})
    loss_b, wb, seen_b = fit_recording(dev, tmp_path / "device", monkeypatch)
    assert seen_a == {torch.float32} and seen_b == {torch.uint8}
    assert len(loss_a) == 2 and loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-7)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


def test_mim_views_are_uint8_with_the_same_pixels(digits) -> None:
    base = override(load_config(digits["cfg"]), {
        "train.task": "mim", "model.num_classes": 0, "mim.num_masking": 6, "mim.min_num": 2, "data.val_split": "",
    })  # fmt: skip
    plain, _ = MimTask().build_datasets(override(base, {"data.device_normalize": False}))
    dev, _ = MimTask().build_datasets(override(base, {"data.device_normalize": True}))
    norm = DeviceNormalize(base.data.mean, base.data.std)
    for i in range(3):
        (x, mask), _, _ = plain[(i, 7 + i)]
        (u, mask_u), _, _ = dev[(i, 7 + i)]
        assert u.dtype == torch.uint8 and torch.equal(mask, mask_u)
        assert torch.equal(norm({"images": u[None]})["images"][0], x)


def test_uint8_batches_by_default_where_the_transform_allows() -> None:
    assert RunConfig().data.device_normalize is True
    assert train_transform_for(RunConfig().data, 32).normalize is False  # the default: uint8 pixels
    # random erasing fills with normalised noise, the reference transform normalises: both stay float, no error
    erasing = train_transform_for(override(RunConfig(), {"data.reprob": "0.25"}).data, 32)
    assert erasing.erase is not None and erasing.normalize is True
    reference = train_transform_for(override(RunConfig(), {"data.fast_transforms": "false"}).data, 32)
    assert not isinstance(reference, FastTrainTransform)
    off = train_transform_for(override(RunConfig(), {"data.device_normalize": "false"}).data, 32)
    assert off.normalize is True
    # and the loop's step lets float images through untouched
    x = torch.randn(2, 3, 4, 4)
    assert DeviceNormalize((0.5,) * 3, (0.2,) * 3)({"images": x})["images"] is x


def test_mim_collate_stacks_views_and_lists_bad_samples() -> None:
    views = [(torch.rand(3, 8, 8), torch.rand(16) > 0.5) for _ in range(3)]
    items = [(views[0], 0, 4), BadSample("a.jpg", "corrupt"), (views[1], 0, 9), (views[2], 0, 2)]
    out = collate_masked(items)
    assert torch.equal(out["images"], torch.stack([v[0] for v in views]))
    assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], torch.stack([v[1] for v in views]))
    assert out["index"].tolist() == [4, 9, 2] and out["bad"] == [("a.jpg", "corrupt")]
    assert collate_masked([BadSample("b", "x")])["images"] is None


def test_the_step_is_only_for_the_tasks_with_uint8_train_transforms() -> None:
    model = torch.nn.Linear(2, 2)
    assert isinstance(device_normalizer(RunConfig(), model), DeviceNormalize)  # classify, the default
    # detection batches are uint8 images that the detector normalises itself: the loop must leave them alone
    for task in ("detect", "segment"):
        cfg = RunConfig()
        cfg = SimpleNamespace(data=cfg.data, train=SimpleNamespace(task=task))  # a config check needs more fields
        assert device_normalizer(cfg, model) is None
