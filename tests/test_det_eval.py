"""COCO evaluation: detections to the COCO results format and back through pycocotools (GT json in,
results json out, COCOeval's box and mask AP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from test_det_data import render_scenes  # noqa: E402

from eva02.data.coco import decode_segmentation, read_coco  # noqa: E402
from eva02.engine.coco_eval import STATS, coco_metrics, to_coco_results, write_results  # noqa: E402


def _outputs_from_ground_truth(coco: COCO, image_id: int, cat_ids: list[int], shift: float = 0.0) -> dict:
    """What a perfect detector gives for one image (torchvision's output layout), boxes moved by `shift` px."""
    img = coco.imgs[image_id]
    anns = coco.imgToAnns[image_id]
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns]) + shift  # fmt: skip
    masks = np.stack([decode_segmentation(a["segmentation"], img["height"], img["width"]) for a in anns])
    return {
        "boxes": boxes,
        "labels": torch.tensor([cat_ids.index(a["category_id"]) + 1 for a in anns]),
        "scores": torch.linspace(0.9, 0.5, len(anns)),
        "masks": torch.from_numpy(masks).float()[:, None] * 0.9,
    }


def test_results_json_round_trip_through_pycocotools(tmp_path) -> None:
    gt_file = render_scenes(tmp_path, 6, size=96, seed=1)
    gt = read_coco(gt_file)
    cat_ids = sorted(gt.getCatIds())
    results = []
    for iid in gt.getImgIds():
        results += to_coco_results(_outputs_from_ground_truth(gt, iid, cat_ids), iid, cat_ids)
    assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    out = write_results(tmp_path / "results.json", results)
    assert json.loads(out.read_text())[0]["segmentation"]["counts"]  # text counts: plain JSON
    reread = COCO(str(gt_file)).loadRes(str(out))  # pycocotools reads our file back
    assert len(reread.anns) == len(results)
    metrics = coco_metrics(gt, json.loads(out.read_text()), gt.getImgIds(), ("bbox", "segm"))
    assert set(metrics) == {f"{k}_{s}" for k in ("bbox", "segm") for s in STATS}
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert metrics["bbox_APl"] == 0.0  # no large objects in 96 px images: COCOeval's -1 reads as 0


def test_worse_detections_score_lower_and_no_detections_score_zero(tmp_path) -> None:
    gt_file = render_scenes(tmp_path, 6, size=96, seed=2)
    gt = read_coco(gt_file)
    cat_ids = sorted(gt.getCatIds())
    moved = []
    for iid in gt.getImgIds():
        out = _outputs_from_ground_truth(gt, iid, cat_ids, shift=4.0)
        out.pop("masks")
        moved += to_coco_results(out, iid, cat_ids)
    assert "segmentation" not in moved[0]
    m = coco_metrics(gt, moved, gt.getImgIds(), ("bbox", "segm"))
    assert 0 < m["bbox_AP"] < 90 and m["bbox_AP50"] > m["bbox_AP75"]
    assert m["segm_AP"] == 0.0  # box-only results: nothing to score masks on
    assert coco_metrics(gt, [], gt.getImgIds(), ("bbox",)) == {f"bbox_{s}": 0.0 for s in STATS}
