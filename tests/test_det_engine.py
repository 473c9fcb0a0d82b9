"""The detection task in the engine: the det config section and its checks, the backbone init from a
headless model file and from an official EVA-02 detectron2 checkpoint (key table, built here from our
random weights in detectron2's naming), a short run to final.safetensors, and `eva02 test` on it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
from test_det_data import render_scenes  # noqa: E402

from eva02.engine.config import ConfigError, RunConfig, override  # noqa: E402
from eva02.engine.tasks.detect import (  # noqa: E402
    D2_VIT,
    DetectionTask,
    build_detector,
    d2_pyramid_keys,
    detector_config,
    from_detectron2,
    init_backbone,
    load_detector,
)
from eva02.model.config import VARIANTS  # noqa: E402
from eva02.model.vit import Eva02  # noqa: E402
from eva02.weights.convert import from_ours  # noqa: E402
from eva02.weights.load import save_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def det_run(root: Path, **changes) -> RunConfig:
    """A tiny detection run on `root`/scenes (train and validation on the same rendered images)."""
    base = {
        "train.task": "detect", "model.name": "test", "model.img_size": 128, "model.num_classes": 3,
        "model.drop_path": 0.0, "model.patch_grad_scale": 1.0, "det.window_size": 4, "det.global_blocks": (1,),
        "det.anchor_sizes": (16, 32, 64, 128, 256), "det.out_channels": 64, "det.roi_batch_per_image": 64,
        # 100 proposals per image: evaluating the defaults' 1000 took seconds per run
        "det.rpn_pre_nms_top_n": (300, 300), "det.rpn_post_nms_top_n": (100, 100),
        "data.root": str(root), "data.train_split": "scenes", "data.val_split": "scenes",
        "det.train_ann": str(root / "scenes.json"), "det.val_ann": str(root / "scenes.json"),
        "data.batch_size": 2, "data.workers": 0, "optim.global_batch": 0, "optim.layer_decay": 1.0,
        "schedule.epochs": 1, "schedule.warmup_epochs": 0, "train.max_steps": 2, "train.log_every": 1,
    }  # fmt: skip
    return override(RunConfig(), {**base, **changes}, "test")


def test_det_section_and_its_checks(tmp_path) -> None:
    cfg = det_run(tmp_path)
    assert cfg.det.lsj_scale == (0.1, 2.0) and cfg.det.anchor_sizes == (16, 32, 64, 128, 256)
    dc = detector_config(cfg)
    assert (dc.backbone.patch_size, dc.backbone.grid, dc.backbone.cls_token) == (16, 8, False)
    assert dc.backbone.global_blocks == (1,) and dc.num_classes == 3 and dc.mean == cfg.data.mean
    bad = {"det.lsj_scale": "2,1", "det.anchor_sizes": "(8,16)", "model.img_size": "96", "det.nms_thresh": "0"}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            override(cfg, {key: value})
    with pytest.raises(ConfigError, match="model.num_classes=0: expects the number of object classes"):
        override(cfg, {"model.num_classes": "0"})
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def _official_state(model) -> dict[str, torch.Tensor]:
    """The detector's backbone in an official EVA-02 det checkpoint's naming, with RoPE buffers, a class
    slot in the position embedding, and RPN / Cascade head tensors."""
    sd = model.state_dict()
    vit = {k[len("backbone.vit.") :]: v for k, v in sd.items() if k.startswith("backbone.vit.")}
    out = {D2_VIT + k: v for k, v in from_ours(vit, "official", model.cfg.backbone).items()}
    pos = out[D2_VIT + "pos_embed"]
    out[D2_VIT + "pos_embed"] = torch.cat([torch.randn_like(pos[:, :1]), pos], dim=1)  # (1, 1 + N, D)
    out[D2_VIT + "rope_win.freqs_cos"] = torch.randn(16, 32)
    out[D2_VIT + "blocks.0.attn.rope.freqs_cos"] = torch.randn(16, 32)
    out.update({theirs: sd[ours] for theirs, ours in d2_pyramid_keys().items()})
    out["proposal_generator.rpn_head.conv.conv0.weight"] = torch.randn(4, 4, 3, 3)
    out["roi_heads.box_head.0.conv1.weight"] = torch.randn(4, 4, 3, 3)
    out["pixel_mean"] = torch.zeros(3, 1, 1)
    return out


def test_official_det_checkpoints_load_their_backbone(tmp_path) -> None:
    cfg = det_run(tmp_path)
    torch.manual_seed(0)
    src = build_detector(cfg).eval()
    theirs = _official_state(src)
    assert "backbone.simfp_2.4.norm.weight" in theirs and "backbone.net.blocks.1.attn.q_proj.weight" in theirs
    torch.save({"model": theirs, "iteration": 60000}, tmp_path / "eva02_det.pth")
    torch.manual_seed(1)
    dst = build_detector(cfg).eval()
    with pytest.warns(UserWarning, match="3 tensors of its RPN and heads"):
        init = DetectionTask().build_model(override(cfg, {"model.init": str(tmp_path / "eva02_det.pth")}))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        want, got = src.backbone(x), init.backbone(x)
    for level in want:
        torch.testing.assert_close(got[level], want[level], rtol=1e-5, atol=1e-5)
    _, unused = from_detectron2(theirs, dst.cfg)
    assert unused == [
        "pixel_mean",
        "proposal_generator.rpn_head.conv.conv0.weight",
        "roi_heads.box_head.0.conv1.weight",
    ]
    with pytest.raises(ValueError, match="keys of no part.*backbone.bottom_up.x"):
        from_detectron2({**theirs, "backbone.bottom_up.x": torch.zeros(1)}, dst.cfg)
    with pytest.raises(ValueError, match="lacks pyramid tensors: backbone.simfp_3.1.norm.bias"):
        from_detectron2({k: v for k, v in theirs.items() if k != "backbone.simfp_3.1.norm.bias"}, dst.cfg)
    with pytest.raises(ValueError, match="Cascade R-CNN heads"):
        load_detector(cfg, tmp_path / "eva02_det.pth")


def test_init_from_a_headless_model_file_drops_the_class_token(tmp_path) -> None:
    torch.manual_seed(0)
    vit = Eva02(VARIANTS["test"].replace(num_classes=0))  # p14, 56 px, a class token and a final norm
    save_checkpoint(vit, tmp_path / "backbone.safetensors")
    cfg = det_run(tmp_path, **{"model.init": str(tmp_path / "backbone.safetensors")})
    model = build_detector(cfg)
    before = model.backbone.pyramid.state_dict()
    assert init_backbone(cfg, model) == []
    got = model.backbone.vit.state_dict()
    torch.testing.assert_close(got["blocks.1.attn.qkv.weight"], vit.state_dict()["blocks.1.attn.qkv.weight"])
    assert got["pos_embed"].shape == (1, 64, 128) and got["patch_embed.proj.weight"].shape[-1] == 16
    assert all(torch.equal(v, model.backbone.pyramid.state_dict()[k]) for k, v in before.items())  # untouched


def test_a_short_run_and_eva02_test_on_its_final_weights(tmp_path, capsys) -> None:
    from eva02.cli import main
    from eva02.engine.train import train

    render_scenes(tmp_path, 6, size=112, seed=4)
    cfg = det_run(tmp_path, **{"train.grad_checkpointing": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning about the data or the init in this run
        metrics = train(cfg, tmp_path / "run")
    assert metrics["global_step"] == 2 and {"bbox_AP", "segm_AP50", "count"} <= set(metrics)
    assert metrics["count"] == 6 and metrics["bad"] == 0
    final = tmp_path / "run" / "final.safetensors"
    model = load_detector(cfg, final)
    assert model.cfg == detector_config(cfg)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    rc = main(["test", str(tmp_path / "cfg.json"), str(final), "--out", str(tmp_path / "test.json")])
    assert rc == 0
    result = json.loads((tmp_path / "test.json").read_text())
    assert result["bbox_AP"] == pytest.approx(metrics["bbox_AP"], abs=1e-6) and result["count"] == 6


@pytest.mark.parametrize(
    "size,blocks,drop,lr,batch",
    [("base", (2, 5, 8, 11), 0.1, 5e-5, 128), ("large", (5, 11, 17, 23), 0.4, 6e-5, 144)],
)
def test_official_recipe_configs(size, blocks, drop, lr, batch) -> None:
    from eva02.engine.config import load_config
    from eva02.model.detect import IMAGENET_MEAN

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "eva02_det" / f"eva02_{size}_mask_rcnn_coco_1024.py")
    dc = detector_config(cfg)
    assert cfg.train.task == "detect" and cfg.model.init == "pretrained" and "p16" in cfg.model.name
    assert (dc.backbone.img_size, dc.backbone.patch_size, dc.backbone.window_size) == (1024, 16, 16)
    assert dc.backbone.global_blocks == blocks and dc.backbone.drop_path == drop and dc.num_classes == 80
    assert (cfg.optim.lr, cfg.optim.global_batch, cfg.train.max_steps, cfg.det.lsj_scale) == (
        lr,
        batch,
        60000,
        (0.1, 2.0),
    )
    assert dc.mean == IMAGENET_MEAN and cfg.model.patch_grad_scale == 1.0
    assert cfg.schedule.epochs * 117266 // batch >= 60000  # max_steps ends the run, not the epochs


def test_layer_decay_reaches_the_detectors_backbone(tmp_path) -> None:
    """detectron2's get_vit_lr_decay_rate: embeddings at layer 0, block k at k + 1, pyramid and heads on top."""
    from eva02.engine.optim import param_groups

    model = build_detector(det_run(tmp_path))
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, 0.5, len(model.blocks)) for n in g["names"]}
    assert scale["backbone.vit.pos_embed"] == scale["backbone.vit.patch_embed.proj.weight"] == 0.5**3
    assert (
        scale["backbone.vit.blocks.0.attn.qkv.weight"] == 0.5**2 and scale["backbone.vit.blocks.1.mlp.w3.weight"] == 0.5
    )
    assert scale["backbone.pyramid.stages.p2.0.weight"] == scale["roi_heads.box_predictor.cls_score.weight"] == 1.0
