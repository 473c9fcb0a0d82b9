"""Training from Hugging Face datasets (data.format='hf'): a save_to_disk DatasetDict or a folder of parquet
files, made here from image folders, reads row i as image i of the folder, pixel for pixel; class names
come from the ClassLabel feature; a fine-tune on it ends with the weights of the same fine-tune on the
folders; MIM needs no label column; wrong splits, columns and labels are named in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_shards import _fit, _same_weights, noisy, pixels
from test_engine_digits import config_text, write_digits
from torch.utils.data import DataLoader

from eva02.data.datasets import TrainSampler, build_dataset, collate, sample_seed, scan_folders
from eva02.data.hf import hf_dataset
from eva02.engine.config import ConfigError, RunConfig, load_config, override

datasets = pytest.importorskip("datasets")


def to_hf(split_dirs: dict[str, Path]):
    """A DatasetDict of the class folders: PIL images (stored by `datasets` as PNG) and ClassLabel labels."""
    out = {}
    for split, folder in split_dirs.items():
        samples, classes = scan_folders(folder)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        images = [Image.open(p).copy() for p, _ in samples]  # a copy: pixels only, no file behind it
        out[split] = datasets.Dataset.from_dict({"image": images, "label": [lab for _, lab in samples]}, features)
    return datasets.DatasetDict(out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    root = write_digits(tmp / "digits", limit=60)  # 48 train, 12 val images
    dd = to_hf({"train": root / "train", "val": root / "val"})
    dd.save_to_disk(str(tmp / "saved"))
    for split in dd:
        dd[split].to_parquet(str(tmp / "parquet" / f"{split}-00000-of-00001.parquet"))
    dd["train"].save_to_disk(str(tmp / "one"))
    (tmp / "cfg.py").write_text(config_text(root, epochs=2, batch=8, global_batch=16, randaug=2, drop_path=0.1,
                                            every_steps=2, log_every=1))  # fmt: skip
    return {"tmp": tmp, "root": root, "cfg": tmp / "cfg.py"}


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_rows_read_as_the_folder_they_were_made_from(digits, kind: str) -> None:
    ds = hf_dataset(str(digits["tmp"] / kind), "train", pixels, cache_dir=str(digits["tmp"] / "cache"))
    folder = build_dataset(str(digits["root"]), "train", "", "", pixels)
    assert len(ds) == len(folder) == 48 and ds.classes == folder.classes == [f"digit_{k}" for k in range(10)]
    for i in range(len(ds)):
        (a, la, ia), (b, lb, ib) = ds[i], folder[i]
        assert (la, ia) == (lb, ib) and np.array_equal(a, b), i
    ds.transform = folder.transform = noisy
    for i in (0, 30):
        key = (i, sample_seed(1, 2, i))
        assert torch.equal(ds[key][0], folder[key][0])
    sampler = TrainSampler(len(ds), 8, 0, 1, seed=4)
    loaded = [DataLoader(ds, batch_size=8, sampler=sampler, num_workers=w, collate_fn=collate) for w in (0, 2)]
    for a, b in zip(*loaded, strict=True):  # worker processes read the rows the main process reads
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
    ds.check(10, "train")
    with pytest.raises(ValueError, match=r"label \d outside \[0, 5\)"):
        ds.check(5, "train")


def test_fine_tune_on_a_hf_dataset_ends_with_the_weights_of_the_folder_run(digits) -> None:
    base = load_config(digits["cfg"])
    hf = override(base, {"data.format": "hf", "data.hf_name": str(digits["tmp"] / "saved")})
    folder = _fit(base, digits["tmp"] / "run_folder")
    rows = _fit(hf, digits["tmp"] / "run_hf")
    assert folder["global_step"] == rows["global_step"] == 6 and folder["top1"] == rows["top1"]
    _same_weights(digits["tmp"] / "run_folder", digits["tmp"] / "run_hf")


def test_mim_needs_no_label_column(digits, tmp_path: Path) -> None:
    from eva02.engine.tasks.mim import MimTask

    images = [Image.open(p).copy() for p, _ in scan_folders(digits["root"] / "train")[0]]
    datasets.Dataset.from_dict({"picture": images}).save_to_disk(str(tmp_path / "plain"))
    changes = {"train.task": "mim", "model.num_classes": 0, "mim.num_masking": 6, "mim.min_num": 2,
               "data.val_split": "", "data.format": "hf", "data.hf_name": str(tmp_path / "plain"),
               "data.hf_image": "picture"}  # fmt: skip
    cfg = override(load_config(digits["cfg"]), changes)
    ds, _ = MimTask().build_datasets(cfg)
    (x, mask), label, index = ds[(3, sample_seed(0, 0, 3))]
    assert len(ds) == 48 and ds.classes == ["image"] and (label, index) == (0, 3) and mask.dtype == torch.bool


def test_wrong_splits_columns_and_labels_are_named(digits, tmp_path: Path) -> None:
    saved = str(digits["tmp"] / "saved")
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits: train, val \(set data.\*_split\)"):
        hf_dataset(saved, "validation", pixels)
    with pytest.raises(ValueError, match=r"has no label column 'fine_label'; its columns: image, label"):
        hf_dataset(saved, "train", pixels, label="fine_label")
    with pytest.raises(ValueError, match=r"is one dataset \(split 'train'\), not 'val'"):
        hf_dataset(str(digits["tmp"] / "one"), "val", pixels)
    assert len(hf_dataset(str(digits["tmp"] / "one"), "train", pixels)) == 48
    # Unlabelled rows (-1, as in ImageNet's test split) stop a classifier before training.
    img = Image.new("RGB", (4, 4))
    datasets.Dataset.from_dict({"image": [img, img], "label": [0, -1]}).save_to_disk(str(tmp_path / "test"))
    with pytest.raises(ValueError, match=r"label -1 outside \[0, 1\)"):
        hf_dataset(str(tmp_path / "test"), "train", pixels).check(1, "validation")
    with pytest.raises(ConfigError, match=r"data.hf_name='': expects a save_to_disk folder"):
        override(RunConfig(), {"data.format": "hf"})
