"""EVA-02-CLIP on the engine: zero-shot evaluation through `tools/test.py`, fine-tuning initialised from
the zero-shot head through `eva02 train`, our CLIP tower as the MIM teacher, and the config checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")  # the tokenizer (the clip extra)

from eva02.cli import main  # noqa: E402
from eva02.clip import zero_shot_classifier  # noqa: E402
from eva02.engine.config import (  # noqa: E402
    ClipCfg,
    ConfigError,
    DataCfg,
    MimCfg,
    ModelCfg,
    OptimCfg,
    RunConfig,
    ScheduleCfg,
    TrainCfg,
)
from eva02.model.clip import CLIP_VARIANTS, Eva02Clip  # noqa: E402
from eva02.weights.clip import save_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("blue_circle", "green_stripes", "red_square")  # in label order: the sorted folder names


def _image(kind: str, i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    a = rng.integers(0, 40, (64, 64, 3), dtype=np.uint8)
    if kind == "red_square":
        a[16:48, 16:48, 0] = 230
    elif kind == "blue_circle":
        yy, xx = np.mgrid[:64, :64]
        a[(yy - 32) ** 2 + (xx - 32) ** 2 < 300, 2] = 230
    else:
        a[:, ::8, 1] = 230
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    for split, n in (("train", 6), ("val", 3)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _image(c, i + (100 if split == "val" else 0)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.safetensors"
    save_clip(Eva02Clip(CLIP_VARIANTS["test"]), path)
    return path


def _zero_shot_config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "zs.py"
    cfg.write_text(
        "from eva02.engine.config import ClipCfg, DataCfg, ModelCfg, RunConfig, TrainCfg\n"
        "config = RunConfig(\n"
        "    model=ModelCfg(name='EVA02-CLIP-test', num_classes=3, img_size=56),\n"
        f"    data=DataCfg(root={str(data)!r}, val_split='val', batch_size=4, workers=0),\n"
        "    clip=ClipCfg(templates='a photo of a {}.'),\n"
        "    train=TrainCfg(task='zero_shot'),\n"
        ")\n"
    )
    return cfg


def test_zero_shot_evaluation_through_tools_test(tmp_path, data, clip_file) -> None:
    """`tools/test.py CONFIG CKPT` (`eva02 test`): top-1 of the zero-shot classifier of the folder names."""
    from eva02.data.transforms import eval_transform
    from eva02.weights.clip import get_clip
    from eva02.weights.zoo import Preprocess

    cfg = _zero_shot_config(tmp_path, data)
    out = tmp_path / "res.json"
    assert main(["test", str(cfg), str(clip_file), "--out", str(out)]) == 0  # what tools/test.py runs
    got = json.loads(out.read_text())
    # The same number computed directly with the library.
    clip = get_clip(None, pretrained=clip_file)
    head = zero_shot_classifier(clip, [c.replace("_", " ") for c in CLASSES], ["a photo of a {}."])
    tf = eval_transform(Preprocess(img_size=56))
    hits = total = 0
    with torch.no_grad():
        for label, c in enumerate(CLASSES):
            for f in sorted((data / "val" / c).iterdir()):
                x = tf(Image.open(f).convert("RGB"))[None]
                hits += int((clip.encode_image(x, normalize=True) @ head).argmax()) == label
                total += 1
    assert got["top1"] == pytest.approx(100.0 * hits / total)


def test_fine_tuning_starts_from_the_zero_shot_head(tmp_path, data, clip_file) -> None:
    """The classifier built from a CLIP model predicts the zero-shot labels before any step, then trains."""
    from eva02.engine.tasks import task_for
    from eva02.engine.train import train
    from eva02.weights.clip import get_clip

    cfg = RunConfig(
        model=ModelCfg(name="EVA02-CLIP-test", init=str(clip_file), num_classes=3, img_size=56, drop_path=0.0),
        data=DataCfg(root=str(data), val_split="val", batch_size=6, workers=0, randaug_n=0, smoothing=0.0),
        optim=OptimCfg(lr=1e-3, layer_decay=1.0, global_batch=6),
        schedule=ScheduleCfg(epochs=3, warmup_epochs=0.0),
        clip=ClipCfg(templates="a photo of a {}."),
        train=TrainCfg(threads=1, log_every=1),
    )
    task = task_for(cfg)
    model = task.build_model(cfg).eval()
    clip = get_clip(None, pretrained=clip_file)
    head = zero_shot_classifier(clip, [c.replace("_", " ") for c in CLASSES], ["a photo of a {}."])
    x = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        emb = clip.encode_image(x)
        zs = torch.nn.functional.normalize(emb, dim=-1) @ head  # the zero-shot cosines
        logits = model(x)
    # the folded head is the projection then the zero-shot head: the cosines times the embedding's norm,
    # a positive factor per image, so the predictions are the zero-shot ones
    torch.testing.assert_close(logits / emb.norm(dim=-1, keepdim=True), zs, atol=1e-6, rtol=1e-4)
    assert torch.equal(logits.argmax(-1), (emb @ head).argmax(-1))
    out = train(cfg, tmp_path / "run", task=task)
    assert out["global_step"] == 9
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "final.safetensors").is_file()


def test_mim_with_our_clip_tower_as_teacher(tmp_path, data, clip_file) -> None:
    from eva02.engine.tasks import task_for
    from eva02.engine.train import train

    cfg = RunConfig(
        model=ModelCfg(name="test", num_classes=0, img_size=56, patch_grad_scale=0.1),
        data=DataCfg(root=str(data), val_split="", batch_size=2, workers=0, randaug_n=0),
        optim=OptimCfg(lr=1e-3, layer_decay=1.0, betas=(0.9, 0.98), eps=1e-6, clip_grad=3.0, global_batch=2),
        schedule=ScheduleCfg(epochs=1, warmup_epochs=0.0),
        train=TrainCfg(task="mim", threads=1, max_steps=1),
        mim=MimCfg(teacher_kind="eva02_clip", teacher_name=str(clip_file), teacher_pretrained="", teacher_amp="none"),
    )
    task = task_for(cfg)
    out = train(cfg, tmp_path / "run", task=task)
    assert out["global_step"] >= 1
    assert task.teacher.out_dim == CLIP_VARIANTS["test"].embed_dim


def test_config_checks(tmp_path) -> None:
    with pytest.raises(ConfigError, match="EVA-02-CLIP name"):
        RunConfig(model=ModelCfg(name="tiny"), train=TrainCfg(task="zero_shot"))
    with pytest.raises(ConfigError, match="no MIM student"):
        RunConfig(model=ModelCfg(name="EVA02-CLIP-B-16", num_classes=0), train=TrainCfg(task="mim"))
    with pytest.raises(ConfigError, match="clip.templates"):
        RunConfig(clip=ClipCfg(templates="a photo of a cat"))
    RunConfig(model=ModelCfg(name="EVA02-B-16"), train=TrainCfg(task="zero_shot"))  # open_clip's name: an alias


def test_zero_shot_task_has_nothing_to_train(tmp_path, data) -> None:
    from eva02.engine.tasks import task_for

    cfg = RunConfig(model=ModelCfg(name="EVA02-CLIP-test", num_classes=3), train=TrainCfg(task="zero_shot"))
    with pytest.raises(ValueError, match="nothing to train"):
        task_for(cfg).build_datasets(cfg)


def test_shipped_zero_shot_configs_load() -> None:
    from eva02.engine.config import load_config
    from eva02.weights.zoo import find_clip

    files = sorted((ROOT / "configs" / "eva02_clip").glob("*_zeroshot_in1k.py"))
    assert len(files) == 5
    names = set()
    for f in files:
        cfg = load_config(f)
        entry = find_clip(cfg.model.name)
        assert cfg.train.task == "zero_shot" and cfg.clip.class_names == "imagenet"
        assert cfg.model.img_size == entry.cfg.vision.img_size and cfg.model.num_classes == 1000
        names.add(entry.name)
    assert len(names) == 5


def test_shipped_fine_tune_config_loads() -> None:
    from eva02.engine.config import load_config

    cfg = load_config(ROOT / "configs" / "eva02_clip" / "eva02_clip_b16_ft_in1k.py")
    assert cfg.model.name == "EVA02-CLIP-B-16" and cfg.model.init == "pretrained" and cfg.train.task == "classify"
    assert cfg.model.img_size == 224 and cfg.clip.class_names == "imagenet" and cfg.model.num_classes == 1000
