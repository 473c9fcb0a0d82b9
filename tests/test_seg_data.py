"""Segmentation data: the ADE20K and folder layouts, label maps (reduce_zero_label, bad files, sizes),
and the official train / eval transforms (resize within the scale, cat_max_ratio crop, padding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva02.data.datasets import BadSample
from eva02.data.segmentation import (
    IGNORE,
    SegDataset,
    SegEvalTransform,
    SegTrainTransform,
    check_sizes,
    collate_seg,
    find_pairs,
    palette,
    photometric_distortion,
    random_crop,
    reduce_zero_label,
    resize_within,
)


def write_pair(root: Path, img_dir: str, mask_dir: str, stem: str, size=(40, 30), ext=".jpg", labels=3) -> None:
    rng = np.random.default_rng(len(stem))
    (root / img_dir).mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / img_dir / f"{stem}{ext}")
    Image.fromarray(rng.integers(0, labels, (size[1], size[0])).astype(np.uint8), "L").save(
        root / mask_dir / f"{stem}.png"
    )


def test_layouts(tmp_path: Path) -> None:
    for stem in ("b", "a"):
        write_pair(tmp_path, "images/training", "annotations/training", stem)
    write_pair(tmp_path, "images/train", "masks/train", "x", ext=".png")
    (tmp_path / "images/training/notes.txt").write_text("not an image")
    pairs = find_pairs(tmp_path, "training", "ade20k")
    assert [Path(i).name for i, _ in pairs] == ["a.jpg", "b.jpg"] and pairs[0][1].endswith("annotations/training/a.png")
    assert [Path(m).name for _, m in find_pairs(tmp_path, "train", "folders")] == ["x.png"]
    with pytest.raises(FileNotFoundError, match="images/validation.*ade20k.*annotations/SPLIT"):
        find_pairs(tmp_path, "validation", "ade20k")
    write_pair(tmp_path, "images/training", "elsewhere", "c")
    with pytest.raises(ValueError, match=r"1 of 3 images .* have no mask.*c\.jpg"):
        find_pairs(tmp_path, "training", "ade20k")


def test_reduce_zero_label() -> None:
    lab = np.array([[0, 1, 150], [255, 2, 0]])
    assert reduce_zero_label(lab).tolist() == [[255, 0, 149], [255, 1, 255]]


def test_bad_samples_are_named_and_sizes_checked(tmp_path: Path) -> None:
    for stem in ("ok", "corrupt", "rgbmask", "label9", "small"):
        write_pair(tmp_path, "images/train", "masks/train", stem)
    (tmp_path / "images/train/corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (40, 30)).save(tmp_path / "masks/train/rgbmask.png")
    Image.fromarray(np.full((30, 40), 9, np.uint8), "L").save(tmp_path / "masks/train/label9.png")
    pairs = find_pairs(tmp_path, "train", "folders")
    ds = SegDataset(pairs, SegEvalTransform(), num_classes=3)
    out = {Path(p[0]).stem: ds[i] for i, p in enumerate(pairs)}
    assert isinstance(out["ok"], tuple) and out["ok"][1].shape == (30, 40)
    assert isinstance(out["corrupt"], BadSample) and "corrupt.jpg" in out["corrupt"].reason
    assert "is a RGB image" in out["rgbmask"].reason and "rgbmask.png" in out["rgbmask"].reason
    assert "holds label 9, outside [0, 3)" in out["label9"].reason
    check_sizes(pairs)  # unreadable headers are left to the loading, which names them
    Image.fromarray(np.zeros((31, 40), np.uint8), "L").save(tmp_path / "masks/train/small.png")
    with pytest.raises(ValueError, match=r"mask '.*small\.png' is 40x31 but its image '.*small\.jpg' is 40x30"):
        check_sizes(pairs)


def test_exif_rotated_images_are_compared_upright(tmp_path: Path) -> None:
    write_pair(tmp_path, "images/train", "masks/train", "turned", size=(30, 40))  # mask 30 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 30, shown rotated a quarter turn: 30 x 40
    Image.new("RGB", (40, 30)).save(tmp_path / "images/train/turned.jpg", exif=exif)
    pairs = find_pairs(tmp_path, "train", "folders")
    check_sizes(pairs)
    assert SegDataset(pairs, SegEvalTransform(), 3)[0][1].shape == (40, 30)


def test_resize_within_the_scale() -> None:
    assert resize_within(np.zeros((512, 683, 3), np.uint8), (2048, 512)).shape == (512, 683, 3)
    assert resize_within(np.zeros((300, 400, 3), np.uint8), (2048, 512)).shape == (512, 683, 3)
    assert resize_within(np.zeros((600, 4000), np.int64), (2048, 512), nearest=True).shape == (307, 2048)
    lab = np.array([[0, 1], [2, 255]])
    assert set(np.unique(resize_within(lab, (8, 8), nearest=True))) == {0, 1, 2, 255}  # no blended labels


def test_crop_avoids_a_dominant_class() -> None:
    label = np.zeros((200, 200), np.int64)
    label[:, 150:] = 1
    img = np.zeros((200, 200, 3), np.uint8)

    def share(ratio: float) -> float:
        ok = 0
        for seed in range(40):
            _, crop = random_crop(img, label, 64, ratio, np.random.default_rng(seed))
            ok += (crop == 0).mean() < 0.75
        return ok / 40

    assert share(0.75) >= 0.85 and share(1.0) < 0.5


def test_train_transform_is_seeded_and_pads_to_the_crop() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    label = np.random.default_rng(1).integers(0, 3, (60, 80))
    t = SegTrainTransform(96, scale=(384, 96), ratio_range=(0.5, 0.5))  # resized to 48 x 64: padded to 96
    x, y = t(img, label, np.random.default_rng(5))
    assert x.shape == (3, 96, 96) and y.shape == (96, 96) and y.dtype == torch.int64
    assert bool((y[48:] == IGNORE).all() and (y[:, 64:] == IGNORE).all()) and bool((x[:, 48:] == 0).all())
    assert set(y[:48, :64].unique().tolist()) <= {0, 1, 2}
    x2, y2 = t(img, label, np.random.default_rng(5))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    flips = {bool(torch.equal(t(img, label, np.random.default_rng(s))[1][:48, :64], y[:48, :64])) for s in range(8)}
    assert flips == {True, False}  # the flip (and nothing else here) changes the label map


def test_photometric_distortion() -> None:
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    outs = [photometric_distortion(img, np.random.default_rng(s)) for s in range(12)]
    assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
    assert sum(not np.array_equal(o, img) for o in outs) >= 10


def test_collate_stacks_crops_and_lists_eval_sizes() -> None:
    a = (torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.int64), 0)
    b = (torch.zeros(3, 8, 6), torch.zeros(16, 12, dtype=torch.int64), 1)
    batch = collate_seg([a, a, BadSample("x.jpg", "bad")])
    assert batch["images"].shape == (2, 3, 8, 8) and batch["bad"] == [("x.jpg", "bad")]
    mixed = collate_seg([a, b])
    assert isinstance(mixed["images"], list) and mixed["targets"][1].shape == (16, 12)
    assert collate_seg([BadSample("y.jpg", "bad")])["images"] is None


def test_palette_is_distinct() -> None:
    p = palette(150)
    assert p.shape == (150, 3) and p.dtype == np.uint8 and len({tuple(c) for c in p}) == 150
