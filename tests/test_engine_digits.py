"""Learning test on real data: a small EVA-02 trained on scikit-learn's bundled digits through
`eva02 train` reaches >= 90% validation top-1; `eva02 test` and `eva02 plot` on the same run.

Also holds the helpers other engine tests import (digits written as PNG class folders, a tiny config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY_MODEL = (
    "ModelCfg(name='test', num_classes=10, img_size=16, patch_size=4, dim={dim}, heads={heads}, mlp_hidden={mlp}, "
    "drop_path={drop_path}, patch_grad_scale=1.0)"
)


def write_digits(root: Path, val_every: int = 5, limit: int | None = None) -> Path:
    """The 1797 8x8 digits as grayscale PNGs in root/{train,val}/digit_<k>/ (every 5th image is val)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    n = len(d.target) if limit is None else limit
    for i in range(n):
        split = "val" if i % val_every == 0 else "train"
        folder = root / split / f"digit_{d.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        img = (d.images[i] * 255 / 16).round().astype(np.uint8)
        Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    return root


def config_text(
    root: Path,
    *,
    epochs: int = 6,
    lr: float = 3e-3,
    batch: int = 32,
    global_batch: int = 32,
    drop_path: float = 0.0,
    randaug: int = 0,
    ema: bool = False,
    every_steps: int = 0,
    max_steps: int = 0,
    log_every: int = 5,
    warmup: float = 1.0,
    dim: int = 64,
    heads: int = 1,
) -> str:
    """A config file for the digits: 16 px input, 4 px patches (a 4x4 grid), a 2-block model (64 wide by default)."""
    model = TINY_MODEL.format(drop_path=drop_path, dim=dim, heads=heads, mlp=2 * dim)
    return f"""
from eva02.engine.config import *

config = RunConfig(
    model={model},
    data=DataCfg(root={str(root)!r}, batch_size={batch}, workers=0, rrc_scale=(0.85, 1.0), rrc_ratio=(0.9, 1.1),
                 hflip=0.0, randaug_n={randaug}, randaug_m=5, smoothing=0.1, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5)),
    optim=OptimCfg(lr={lr}, layer_decay=0.9, global_batch={global_batch}),
    schedule=ScheduleCfg(epochs={epochs}, warmup_epochs={warmup}),
    ema=EmaCfg(enabled={ema}, decay=0.9),
    checkpoint=CheckpointCfg(every_steps={every_steps}, keep_last=2),
    train=TrainCfg(log_every={log_every}, threads=1, max_steps={max_steps}),
)
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def test_digits_learning_through_cli(digits: Path, tmp_path: Path) -> None:
    from eva02.cli import main
    from eva02.weights.load import get_model

    cfg = tmp_path / "digits.py"
    # Reading images dominates the run's time, so a wider model learns more per epoch at little cost:
    # 96 wide reaches ~94% in 4 epochs where the 64-wide one needs 6.
    cfg.write_text(config_text(digits, epochs=4, lr=3e-3, dim=96, heads=2))
    wd = tmp_path / "run"
    assert main(["train", str(cfg), "--work-dir", str(wd)]) == 0
    evals = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert len(evals) == 4
    assert evals[-1]["top1"] >= 90.0, evals[-1]
    assert evals[0]["top1"] < evals[-1]["top1"]  # it learned during the run, not by chance at the start
    # The resolved config and the checkpoints are in the work dir; the final weights load by path.
    assert json.loads((wd / "config.json").read_text())["model"]["dim"] == 96
    assert (wd / "checkpoints" / "last.pt").is_file() and (wd / "checkpoints" / "best.pt").is_file()
    model = get_model(None, pretrained=wd / "final.safetensors")
    assert model.cfg.num_classes == 10 and model.cfg.img_size == 16

    # tools/test.py: the same top-1 from the training checkpoint and from the final safetensors.
    out = tmp_path / "test.json"
    assert main(["test", str(cfg), str(wd / "checkpoints" / "last.pt"), "--out", str(out), "--per-class"]) == 0
    res = json.loads(out.read_text())
    assert res["top1"] == pytest.approx(evals[-1]["top1"], abs=1e-6)
    assert res["count"] == 360 and set(res["per_class"]) == {f"digit_{k}" for k in range(10)}
    out2 = tmp_path / "test2.json"
    assert main(["test", str(cfg), str(wd / "final.safetensors"), "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["top1"] == pytest.approx(res["top1"], abs=1e-6)

    pytest.importorskip("matplotlib")
    assert main(["plot", str(wd)]) == 0
    for name in ("loss", "lr", "top1"):
        png = wd / f"{name}.png"
        assert png.is_file() and os.path.getsize(png) > 1000
