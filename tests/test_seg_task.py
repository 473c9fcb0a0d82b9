"""The segmentation task on the engine: config section and rules, the model a run builds (backbone init
from a headless checkpoint, resampled), the loss, a short run with evaluation, export and `run_test`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva02.engine.config import (
    ConfigError,
    DataCfg,
    ModelCfg,
    OptimCfg,
    RunConfig,
    ScheduleCfg,
    SegCfg,
    TrainCfg,
    override,
)
from eva02.engine.tasks import TASKS
from eva02.engine.tasks.segment import SegmentTask, load_segmentor, pixel_cross_entropy

MODEL = dict(name="test", num_classes=3, img_size=64, patch_size=16, depth=2, drop_path=0.0, patch_grad_scale=1.0)
SEG = dict(layout="folders", reduce_zero_label=False, scale=(256, 64), stride=48, channels=16, aux_channels=8,
           window_size=2, global_blocks=(1,), cls_token=False)  # fmt: skip


def write_folder(root: Path, n_train: int = 8, n_val: int = 3) -> Path:
    """Images of a bright square (class 1) and a dark stripe (class 2) on gray (class 0)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("images", "masks"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(56, 80, 2))
            img = np.full((h, w, 3), 128, np.uint8)
            lab = np.zeros((h, w), np.uint8)
            y, x = (int(v) for v in rng.integers(0, 30, 2))
            img[y : y + 20, x : x + 20], lab[y : y + 20, x : x + 20] = 250, 1
            img[:, w - 10 :], lab[:, w - 10 :] = 10, 2
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            Image.fromarray(lab, "L").save(root / "masks" / split / f"{i}.png")
    return root


def run_config(root: Path, **train) -> RunConfig:
    return RunConfig(
        model=ModelCfg(**MODEL),
        data=DataCfg(root=str(root), batch_size=4, workers=0, mean=(0.5,) * 3, std=(0.5,) * 3),
        optim=OptimCfg(lr=1e-3, layer_decay=1.0, global_batch=4),
        schedule=ScheduleCfg(epochs=1, warmup_epochs=0.0),
        train=TrainCfg(task="segment", threads=1, **train),
        seg=SegCfg(**SEG),
    )


def test_registered_and_checked() -> None:
    assert TASKS["segment"] is SegmentTask
    cfg = run_config(Path("unused"))
    for key, value, words in [
        ("seg.window_size", "2", None),
        ("seg.cls_token", "true", "a class token belongs to no window"),
        ("seg.aux_weight", "0", "0 without one"),
        ("seg.stride", "65", "model.img_size=64"),
        ("data.batch_size", "1", "two images per device"),
        ("seg.layout", "coco", "'ade20k', 'folders'"),
        ("seg.out_indices", "(1, 2)", "four block indexes"),
        ("seg.scale", "(512,)", "two whole numbers"),
    ]:
        if words is None:
            override(cfg, {key: value})
            continue
        with pytest.raises(ConfigError, match=words):
            override(cfg, {key: value})
    # a classification config keeps its own checks: seg's defaults never refuse it
    RunConfig(model=ModelCfg(img_size=224), data=DataCfg(batch_size=1))


def test_backbone_init_from_a_headless_checkpoint(tmp_path: Path) -> None:
    """A p14 224-px headless file (class token, 16x16 grid) into the p16 windowed backbone at 64 px."""
    from eva02.model import VARIANTS, Eva02
    from eva02.weights.convert import fit_to_config
    from eva02.weights.load import save_checkpoint

    torch.manual_seed(3)
    src = Eva02(VARIANTS["test"].replace(depth=2, img_size=224))
    path = save_checkpoint(src, tmp_path / "headless.safetensors")
    cfg = override(run_config(tmp_path), {"model.init": str(path)})
    model = SegmentTask().build_model(cfg)
    assert model.backbone.cfg.patch_size == 16 and model.backbone.cls_token is None
    want = fit_to_config({k: v for k, v in src.state_dict().items() if not k.startswith("norm.")}, model.backbone.cfg)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=k)
    # the official layout keeps the class token and its position slot
    official = SegmentTask().build_model(override(cfg, {"seg.window_size": "0", "seg.cls_token": "true"}))
    torch.testing.assert_close(official.backbone.cls_token, src.cls_token)


def test_loss_is_mmsegs_mean_over_all_pixels() -> None:
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :4] = 255
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    per_pixel = torch.nn.functional.cross_entropy(up, target, ignore_index=255, reduction="none")
    assert float(per_pixel[0, :4].abs().sum()) == 0.0
    torch.testing.assert_close(pixel_cross_entropy(logits, target), per_pixel.sum() / target.numel())


def test_a_batch_left_with_one_image_still_trains(tmp_path: Path) -> None:
    """Unreadable images can leave one image in a batch: the heads' BatchNorm (pooled 1 x 1) needs two."""
    from eva02.engine.tasks.segment import SegLoss

    cfg = run_config(tmp_path)
    model = SegmentTask().build_model(cfg).train()
    batch = {"images": torch.randn(1, 3, 64, 64), "targets": torch.randint(0, 3, (1, 64, 64))}
    loss = SegLoss(0.4)(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.decode_head.cls.conv_seg.weight.grad is not None


def test_layer_decay_warning_names_the_gap(tmp_path: Path) -> None:
    from eva02.engine.optim import layer_id

    cfg = override(run_config(tmp_path), {"optim.layer_decay": "0.9"})
    if layer_id("backbone.blocks.0.attn.qkv.weight", 2) == 1:  # the engine reads the prefix: no warning
        SegmentTask().build_model(cfg)
        return
    with pytest.warns(UserWarning, match="layer_decay=0.9 does not reach the segmentor's backbone"):
        SegmentTask().build_model(cfg)


def test_short_run_evaluates_exports_and_tests(tmp_path: Path) -> None:
    from eva02.engine.testing import run_test
    from eva02.engine.train import train

    root = write_folder(tmp_path / "data")
    cfg = run_config(root, grad_checkpointing=True)
    metrics = train(cfg, tmp_path / "run")
    assert {"mIoU", "mAcc", "aAcc", "count", "bad"} <= metrics.keys() and metrics["count"] == 3
    assert metrics["global_step"] == 2 and "best_mIoU" in metrics
    final = tmp_path / "run" / "final.safetensors"
    from safetensors import safe_open

    with safe_open(str(final), framework="pt") as f:
        stored = json.loads(f.metadata()["config"])
    assert stored["kind"] == "segmentor" and stored["num_classes"] == 3
    for ckpt in (final, tmp_path / "run" / "checkpoints" / "last.pt"):
        res, classes = run_test(cfg, str(ckpt))
        assert res["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-9) and classes == ["class_0", "class_1", "class_2"]
    with pytest.raises(ValueError, match="does not fit the segmentor"):
        load_segmentor(override(cfg, {"seg.channels": "8"}), str(final))
