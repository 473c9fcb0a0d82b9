"""Mask R-CNN on the dense EVA-02 backbone (torchvision's detector): the ViTDet heads, the input handling
(training images only normalised, test images resized to the long side, square padding), the p2-p6
backbone maps, gradient checkpointing, the saved config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eva02.model.config import VARIANTS, dense_config
from eva02.model.dense import LayerNorm2d
from eva02.model.detect import DetectorConfig, Eva02MaskRCNN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_detector(masks: bool = True, img: int = 128, seed: int = 0) -> Eva02MaskRCNN:
    torch.manual_seed(seed)
    vit = dense_config(VARIANTS["test"].replace(depth=2), img, window_size=4, global_blocks=(1,))
    cfg = DetectorConfig(vit, num_classes=3, anchor_sizes=(16, 32, 64, 128, 256), masks=masks, out_channels=64,
                         roi_batch_per_image=64)  # fmt: skip
    return Eva02MaskRCNN(cfg)


def _targets():
    m = torch.zeros(2, 128, 128, dtype=torch.uint8)
    m[0, 10:50, 20:60] = 1
    m[1, 60:100, 60:90] = 1
    one = {"boxes": torch.tensor([[20.0, 10, 60, 50], [60, 60, 90, 100]]), "labels": torch.tensor([1, 3]), "masks": m}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 96, 112, dtype=torch.uint8)}  # fmt: skip
    return [torch.rand(3, 128, 128), torch.rand(3, 96, 112)], [one, empty]


def test_vitdet_heads_and_backbone_maps() -> None:
    m = tiny_detector()
    assert isinstance(m.vit.norm, nn.Identity)  # the raw last-block tokens feed the pyramid
    assert m.rpn.head.conv[1] is not None and len(m.rpn.head.conv) == 2  # two 3x3 convolutions
    assert m.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    convs = [b for b in m.roi_heads.box_head if isinstance(b, nn.Sequential)]
    assert len(convs) == 4 and all(isinstance(c[1], LayerNorm2d) for c in convs)
    assert [x.out_features for x in m.roi_heads.box_head if isinstance(x, nn.Linear)] == [1024]
    assert m.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes and the background
    assert m.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert len(m.roi_heads.mask_head) == 4 and isinstance(m.roi_heads.mask_head[0][1], LayerNorm2d)
    feats = m.backbone(torch.zeros(1, 3, 128, 128))
    assert [(k, v.shape[-1]) for k, v in feats.items()] == [("p2", 32), ("p3", 16), ("p4", 8), ("p5", 4), ("p6", 2)]
    assert m.blocks is m.vit.blocks and m.backbone.out_channels == 64
    faster = tiny_detector(masks=False)
    assert faster.roi_heads.mask_head is None and not faster.roi_heads.has_mask()


def test_training_gives_every_loss_and_gradients_everywhere() -> None:
    m = tiny_detector().train()
    images, targets = _targets()
    losses = m(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def test_square_padding_and_test_resize() -> None:
    m = tiny_detector().eval()
    t = m.transform
    batch, _ = t([torch.rand(3, 50, 70)])  # eval: the long side goes to 128, then a 128 square
    assert batch.tensors.shape == (1, 3, 128, 128) and batch.image_sizes == [(91, 128)]
    t.train()
    batch, _ = t([torch.rand(3, 50, 70), torch.rand(3, 128, 100)])  # training: as given, padded
    assert batch.tensors.shape == (2, 3, 128, 128) and batch.image_sizes == [(50, 70), (128, 100)]
    assert batch.tensors[0, :, 50:].abs().sum() == 0  # padded after normalisation, with zeros (ViTDet)
    t.eval()
    with torch.no_grad():
        (out,) = m([torch.rand(3, 200, 150)])
    assert out["masks"].shape[1:] == (1, 200, 150) and (out["boxes"][:, 2] <= 150).all()
    assert len(out["scores"]) <= m.cfg.detections_per_img


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        m = tiny_detector(seed=1).train()
        m.set_grad_checkpointing(ckpt)
        images, targets = _targets()
        torch.manual_seed(0)  # the same samples of anchors and proposals
        sum(m(images, targets).values()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert m.vit.grad_checkpointing
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_config_round_trip_and_checks() -> None:
    cfg = tiny_detector().cfg
    d = cfg.to_dict()
    assert d["task"] == "detect"
    import json

    assert DetectorConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="unknown DetectorConfig keys"):
        DetectorConfig.from_dict({**d, "anchors": 1})
    with pytest.raises(ValueError, match="dense config"):
        DetectorConfig(VARIANTS["test"], num_classes=2)
    with pytest.raises(ValueError, match="multiple of 64"):
        DetectorConfig(cfg.backbone.replace(img_size=112), num_classes=2)
