"""`eva02 segment`: inputs and outputs checked before the model loads, unreadable images skipped with a
one-line warning (exit 1), JSON lines, label maps and overlays; the shipped segmentation configs load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva02.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TEXT = """
from eva02.engine.config import *

config = RunConfig(
    model=ModelCfg(name="test", num_classes=3, img_size=64, patch_size=16, depth=2, drop_path=0.0),
    data=DataCfg(root="unused", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    train=TrainCfg(task="segment"),
    seg=SegCfg(layout="folders", scale=(256, 64), stride=48, channels=16, aux_channels=8, window_size=2,
               global_blocks=(1,), cls_token=False),
)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config, final weights of a random segmentor, folder of 2 images + 1 unreadable one)."""
    import torch

    from eva02.engine.checkpoint import save_weights
    from eva02.engine.config import load_config
    from eva02.engine.tasks.segment import segmentor_config
    from eva02.model.seg import Segmentor

    d = tmp_path_factory.mktemp("segcli")
    cfg_path = d / "seg.py"
    cfg_path.write_text(CONFIG_TEXT)
    torch.manual_seed(0)
    model = Segmentor(segmentor_config(load_config(cfg_path)))
    save_weights(model, d / "final.safetensors")
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (70, 50)), ("b.png", (64, 96))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_bytes(b"not an image")
    return cfg_path, d / "final.safetensors", images


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["segment", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_outputs_json_and_bad_images(setup, tmp_path: Path, capsys) -> None:
    cfg, weights, images = setup
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, str(images), "--config", str(cfg), "--checkpoint", str(weights), "-o", str(out_dir),
                         "--json")  # fmt: skip
    assert code == 1
    assert err.count("warning") == 1 and "broken.jpg" in err and "1 of 3 images failed" in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["file"]).name for r in records] == ["a.jpg", "b.png"]
    for r in records:
        labels = Image.open(r["labels"])
        assert labels.mode == "P" and labels.size == tuple(r["size"])
        assert sum(c["fraction"] for c in r["classes"]) == pytest.approx(1.0, abs=1e-5)
        assert {c["label"] for c in r["classes"]} == set(np.unique(np.asarray(labels)).tolist())
        assert Image.open(r["overlay"]).size == labels.size
    assert records[0]["size"] == [70, 50]
    # the same outputs again: refused before any work, then replaced with --force
    code, _, err = run(capsys, str(images / "a.jpg"), "--config", str(cfg), "--checkpoint", str(weights),
                       "-o", str(out_dir))  # fmt: skip
    assert code == 2 and "already exists; pass --force" in err
    code, out, _ = run(capsys, str(images / "a.jpg"), "--config", str(cfg), "--checkpoint", str(weights),
                       "-o", str(out_dir), "--force")  # fmt: skip
    assert code == 0 and out.startswith(str(images / "a.jpg")) and "%" in out


TINY_CLS = str(ROOT / "configs/eva02/eva02_tiny_p14_8xb16_in1k.py")
BASE = ["--config", "{cfg}", "--checkpoint", "{weights}"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["missing.jpg", *BASE], "no such file or folder: missing.jpg"),
        (["{images}/a.jpg", *BASE, "--alpha", "2"], "--alpha must be in [0, 1]"),
        (["{images}/a.jpg", "--config", "{cfg}", "--checkpoint", "nope.pt"], "--checkpoint file 'nope.pt' does not"),
        (["{images}/a.jpg", "--config", TINY_CLS, "--checkpoint", "{weights}"], "train.task='classify' config"),
        (["{images}/a.jpg", *BASE, "--set", "seg.stride=-1"], "seg.stride=-1"),
    ],
)
def test_refusals_name_the_input(setup, capsys, argv, words) -> None:
    cfg, weights, images = setup
    code, _, err = run(capsys, *(a.format(cfg=cfg, weights=weights, images=images) for a in argv))
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_an_output_never_replaces_an_input(setup, tmp_path: Path, capsys) -> None:
    cfg, weights, images = setup
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "x_labels.png")
    Image.new("RGB", (40, 40)).save(folder / "x.png")
    code, _, err = run(capsys, str(folder / "x.png"), str(folder / "x_labels.png"), "--config", str(cfg),
                       "--checkpoint", str(weights), "-o", str(folder), "--force")  # fmt: skip
    assert code == 2 and "is also an input" in err


def test_a_backbone_file_is_not_a_segmentor(setup, tmp_path: Path, capsys) -> None:
    from eva02.model import VARIANTS, Eva02
    from eva02.weights.load import save_checkpoint

    cfg, _, images = setup
    backbone = save_checkpoint(Eva02(VARIANTS["test"]), tmp_path / "backbone.safetensors")
    code, _, err = run(capsys, str(images / "a.jpg"), "--config", str(cfg), "--checkpoint", str(backbone))
    assert code == 2 and "not a segmentor; set it as model.init" in err


def test_shipped_configs_load() -> None:
    from eva02.engine.config import load_config
    from eva02.engine.tasks.segment import segmentor_config

    expected = {
        "eva02_base_upernet_ade20k_512.py": (768, 512, 768, 6e-5, 0.85, 32, 60_000),
        "eva02_large_upernet_ade20k_512.py": (1024, 512, 1024, 4e-5, 0.9, 16, 80_000),
        "eva02_large_upernet_ade20k_640.py": (1024, 640, 1536, 4e-5, 0.9, 16, 80_000),
    }
    for name, (dim, img, channels, lr, decay, batch, iters) in expected.items():
        cfg = load_config(ROOT / "configs" / "eva02_seg" / name)
        seg = segmentor_config(cfg)
        steps = 20_210 // cfg.optim.global_batch
        assert (seg.backbone.dim, seg.backbone.img_size, seg.channels) == (dim, img, channels), name
        assert (cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.global_batch) == (lr, decay, batch), name
        assert min(steps * cfg.schedule.epochs, cfg.train.max_steps) == iters
        assert round(cfg.schedule.warmup_epochs * steps) == 1500
        assert seg.backbone.patch_size == 16 and seg.backbone.cls_token and not seg.backbone.window_size
        assert cfg.model.init == "pretrained" and cfg.model.patch_grad_scale == 1.0
