"""A real open_clip EVA-CLIP tower (random weights: no download) as the MIM teacher."""

import pytest
import torch

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def teacher():
    from eva02.model.teacher import build_open_clip_teacher

    torch.manual_seed(0)
    return build_open_clip_teacher("EVA02-B-16", "", amp_dtype=None)


def test_targets_are_final_norm_patch_tokens_through_the_projection(teacher):
    from eva02.model.teacher import align_tokens

    x = torch.randn(1, 3, 224, 224)  # one image: a base-size tower at 224 px is the cost of this test
    out = teacher(x, grid=(16, 16))  # EVA02-CLIP-B/16 has a 14x14 grid; the student's is 16x16 (p14)
    assert out.shape == (1, 256, 512) and teacher.out_dim == 512
    trunk, head = teacher.net["trunk"], teacher.net["head"]
    with torch.no_grad():
        tokens = trunk.forward_features(x)[:, trunk.num_prefix_tokens :]  # (1, 196, 768)
        ref = align_tokens(head(tokens), (14, 14), (16, 16))
    torch.testing.assert_close(out, ref)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training, "a teacher stays in eval mode"


def test_mim_step_with_open_clip_teacher(teacher, tmp_path, monkeypatch):
    from PIL import Image
    from skimage import data

    from eva02.engine.config import DataCfg, MimCfg, ModelCfg, OptimCfg, RunConfig, ScheduleCfg, TrainCfg
    from eva02.engine.tasks import mim, task_for
    from eva02.engine.train import train

    asked = []

    def build_once(name, pretrained, amp_dtype):  # the tower of the fixture: building one takes seconds
        asked.append((name, pretrained, amp_dtype))
        return teacher

    monkeypatch.setattr(mim, "build_open_clip_teacher", build_once)

    folder = tmp_path / "photos" / "train"
    folder.mkdir(parents=True)
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    cfg = RunConfig(
        model=ModelCfg(name="test", num_classes=0, img_size=56, patch_grad_scale=0.1),
        data=DataCfg(root=str(tmp_path / "photos"), val_split="", batch_size=2, workers=0, randaug_n=0),
        optim=OptimCfg(lr=1e-3, layer_decay=1.0, betas=(0.9, 0.98), eps=1e-6, clip_grad=3.0, global_batch=2),
        schedule=ScheduleCfg(epochs=1, warmup_epochs=0.0),
        train=TrainCfg(task="mim", threads=1),
        mim=MimCfg(teacher_kind="open_clip", teacher_name="EVA02-B-16", teacher_pretrained="", teacher_amp="none"),
    )
    task = task_for(cfg)
    out = train(cfg, tmp_path / "run", task=task)
    assert out["global_step"] == 1
    assert asked == [("EVA02-B-16", "", None)]  # the config's tower, random weights, no autocast
    assert task.teacher is teacher and task.teacher.out_dim == 512
    # the student's regressor maps to the teacher's width; the final file is the headless backbone
    from eva02 import get_model

    backbone = get_model(None, pretrained=tmp_path / "run" / "final.safetensors")
    assert backbone.cfg.num_classes == 0 and backbone.cfg.dim == 128


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_offline_mim_teacher_fails_fast_with_one_message(tmp_path, monkeypatch, capsys):
    """The default MIM config offline: one error line naming the file and both ways on, at once."""
    import time
    from pathlib import Path

    from test_engine_digits import write_digits

    from eva02.cli import main

    monkeypatch.setenv("EVA02_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("EVA02_HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    root = write_digits(tmp_path / "d", limit=20)
    cfg = Path(__file__).resolve().parents[1] / "configs/eva02/eva02_tiny_p14_mim_in21k.py"
    t0 = time.time()
    rc = main(["train", str(cfg), "--work-dir", str(tmp_path / "wd"), "--set", f"data.root={root}",
               "data.batch_size=4", "optim.global_batch=4", "data.workers=0", "model.img_size=56"])  # fmt: skip
    took = time.time() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "mim.teacher_pretrained=FILE" in err[0] and "mim.teacher_kind=eva02" in err[0]
    assert "eva_giant_patch14_clip_224.laion400m_s11b_b41k" in err[0]
    assert took < 30, took


def test_cached_open_clip_weights_are_used_without_network(tmp_path, monkeypatch):

    from eva02.engine.tasks.mim import open_clip_weights
    from eva02.weights.download import cached_path
    from eva02.weights.zoo import WeightSource

    monkeypatch.setenv("EVA02_HOME", str(tmp_path))
    monkeypatch.setenv("EVA02_HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    url = "https://huggingface.co/timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k/resolve/main/"
    url += "open_clip_pytorch_model.bin"
    name = "open_clip--EVA02-B-16--merged2b_s8b_b131k--open_clip_pytorch_model.bin"
    dest = cached_path(WeightSource("open_clip", url, name))
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(2)}, dest)
    assert open_clip_weights("EVA02-B-16", "merged2b_s8b_b131k") == str(dest)
    assert open_clip_weights("EVA02-B-16", str(dest)) == str(dest)  # a local file is used as it is
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        open_clip_weights("EVA02-B-16", "nope")
