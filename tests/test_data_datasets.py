"""Datasets, samplers, train transforms and mixup: folders and list files, checks before training,
unreadable images skipped and counted, epoch-seeded sharding, per-sample seeded augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine_digits import config_text, write_digits

from eva02.data.datasets import BadSample, ImageDataset, TrainSampler, build_dataset, collate, read_list
from eva02.data.mixup import Mixup, smooth_one_hot
from eva02.data.train_transforms import train_transform


def _img(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)
    return path


def test_list_file_with_prefix_and_names(tmp_path: Path) -> None:
    for i in range(3):
        _img(tmp_path / "imgs" / "val" / f"v{i}.png", 40 * i)
    (tmp_path / "imgs" / "meta").mkdir()
    (tmp_path / "imgs" / "meta" / "val.txt").write_text("v0.png 2\n\n# comment\nv1.png 0\nv2.png 1\n")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    ds = build_dataset(str(tmp_path / "imgs"), "val", "", str(tmp_path / "names.txt"), lambda im: torch.ones(1))
    assert [(Path(p).name, lab) for p, lab in ds.samples] == [("v0.png", 2), ("v1.png", 0), ("v2.png", 1)]
    assert ds.classes == ["cat", "dog", "bird"]
    ds.check(3, "validation")
    with pytest.raises(ValueError, match=r"label 2 .* outside \[0, 2\); fix the list file or set model.num_classes"):
        ds.check(2, "validation")
    (tmp_path / "bad.txt").write_text("v0.png two\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'relative/path label'"):
        read_list(tmp_path / "bad.txt", tmp_path)
    (tmp_path / "missing.txt").write_text("nope.png 0\n")
    ds = build_dataset(str(tmp_path / "imgs"), "val", str(tmp_path / "missing.txt"), "", lambda im: im)
    with pytest.raises(FileNotFoundError, match="lists 1 missing file"):
        ds.check(1, "train")


def _trainer_cfg(tmp_path: Path, root: Path, **changes):
    from eva02.engine.config import load_config, override

    (tmp_path / "cfg.py").write_text(config_text(root, epochs=1, batch=8, global_batch=16))
    return override(load_config(tmp_path / "cfg.py"), changes)


def test_empty_and_mislabelled_datasets_fail_before_training(tmp_path: Path) -> None:
    from eva02.engine.train import Trainer

    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="the train dataset is empty"):
        Trainer(_trainer_cfg(tmp_path, tmp_path / "empty"), tmp_path / "wd")
    root = write_digits(tmp_path / "digits", limit=40)
    with pytest.raises(ValueError, match="has 10 classes but model.num_classes=7; set model.num_classes=10"):
        Trainer(_trainer_cfg(tmp_path, root, **{"model.num_classes": 7}), tmp_path / "wd")
    _img(root / "val" / "digit_x" / "odd.png")
    with pytest.raises(ValueError, match=r"validation class folders \['digit_x'\] are not train classes"):
        Trainer(_trainer_cfg(tmp_path, root), tmp_path / "wd")


def test_unreadable_images_are_skipped_counted_and_capped(tmp_path: Path, capsys) -> None:
    from eva02.engine.train import Trainer, TrainingError

    root = write_digits(tmp_path / "digits", limit=60)  # 48 train images: 3 steps of 16 see them all
    bad = root / "train" / "digit_3" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    trainer = Trainer(_trainer_cfg(tmp_path, root, **{"data.max_bad_fraction": 0.05}), tmp_path / "ok")
    trainer.fit()
    assert trainer.bad_images == 1
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "broken.png" in err
    strict = Trainer(_trainer_cfg(tmp_path, root, **{"data.max_bad_fraction": 0.0}), tmp_path / "strict")
    msg = r"1 unreadable image in epoch 1, more than data.max_bad_fraction=0.0 of 49"
    with pytest.raises(TrainingError, match=msg):
        strict.fit()


def test_collate_drops_bad_samples() -> None:
    good = (torch.zeros(3, 4, 4), 1, 7)
    batch = collate([good, BadSample("x.jpg", "corrupt"), good])
    assert batch["images"].shape == (2, 3, 4, 4) and batch["targets"].tolist() == [1, 1]
    assert batch["bad"] == [("x.jpg", "corrupt")]
    assert collate([BadSample("y.jpg", "r")])["images"] is None


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_sampler_global_batches_do_not_depend_on_world_size(world: int, accum: int) -> None:
    n, G, per = 50, 8, 2  # 6 global batches per epoch, 2 images per device and micro-batch
    ref = [k for k, _ in TrainSampler(n, G, 0, 1, seed=3)]
    shards = []
    for r in range(world):
        s = TrainSampler(n, G, r, world, seed=3)
        s.set_epoch(0)
        shards.append([k for k, _ in s])
    assert all(len(sh) == len(shards[0]) == 6 * G // world for sh in shards)
    for g in range(6):  # each optimizer step sees exactly the same set of samples
        got = {i for sh in shards for i in sh[g * per * accum : (g + 1) * per * accum]}
        assert got == set(ref[g * G : (g + 1) * G])
    s = TrainSampler(n, G, 0, 1, seed=3)
    s.set_epoch(0, start_step=4)  # resume after 4 steps: only the last 2 global batches remain
    assert [k for k, _ in s] == ref[4 * G :] and len(s) == 2 * G
    s.set_epoch(1)
    assert [k for k, _ in s] != ref  # a new order every epoch


def test_train_transform_is_seeded_per_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _img(tmp_path / "a" / "x.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    tf = train_transform(24, (0.5,) * 3, (0.25,) * 3, randaug_n=2, randaug_m=9, randaug_mstd=0.5, reprob=0.25)
    ds = ImageDataset([(str(tmp_path / "a" / "x.png"), 0)], ["a"], tf)
    a, b, c = ds[(0, 11)][0], ds[(0, 11)][0], ds[(0, 12)][0]
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)  # same key, same augmentation, whatever ran in between
    assert not torch.equal(a, c)


def test_mixup_and_label_smoothing() -> None:
    t = torch.tensor([0, 2, 1, 2])
    y = smooth_one_hot(t, 4, 0.1)
    torch.testing.assert_close(y.sum(1), torch.ones(4))
    assert y[0, 0] == pytest.approx(0.925) and y[0, 1] == pytest.approx(0.025)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8)
    mix = Mixup(4, mixup=0.8, cutmix=0.0, smoothing=0.0)
    xm, ym = mix(x, t, torch.Generator().manual_seed(0))
    lam = float(xm[0, 0, 0, 0] - x[3, 0, 0, 0]) / float(x[0, 0, 0, 0] - x[3, 0, 0, 0])
    assert 0.0 < lam < 1.0
    assert ym[0, 0] == pytest.approx(lam) and ym[0, 2] == pytest.approx(1 - lam)  # sample 3 has label 2
    cut = Mixup(4, mixup=0.0, cutmix=1.0, smoothing=0.0)
    xc, yc = cut(x, t, torch.Generator().manual_seed(1))
    area = float((xc[0, 0] == 3.0).float().mean())  # pixels pasted from the flipped batch
    assert yc[0, 2] == pytest.approx(area, abs=1e-6) and yc[0, 0] == pytest.approx(1 - area, abs=1e-6)


def test_symlink_loops_and_unicode_names_are_listed_once(tmp_path: Path) -> None:
    from PIL import Image

    from eva02.data.datasets import scan_folders
    from eva02.data.images import iter_image_paths

    cat = tmp_path / "train" / "cat"
    cat.mkdir(parents=True)
    for name in ("a.png", "ü ñ 猫.png", "e\u0301.png"):
        Image.new("RGB", (8, 8)).save(cat / name)
    (cat / "loop").symlink_to("..")  # a folder linking to its parent
    (cat / "loop2").symlink_to(tmp_path / "train")
    (cat / "self").symlink_to(".")
    samples, classes = scan_folders(tmp_path / "train")
    assert classes == ["cat"]
    assert sorted(Path(p).name for p, _ in samples) == sorted(["a.png", "ü ñ 猫.png", "e\u0301.png"])
    assert sorted(p.name for p in iter_image_paths(tmp_path / "train")) == sorted(Path(p).name for p, _ in samples)
