"""Segmentation metrics against a direct numpy confusion matrix, with mmseg's definitions (NaN classes
left out of the means), and the evaluation loop over a loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eva02.engine.seg_eval import confusion_matrix, evaluate_segmentor, seg_metrics


def numpy_confusion(pred: np.ndarray, label: np.ndarray, n: int) -> np.ndarray:
    conf = np.zeros((n, n), np.int64)
    for t, p in zip(label.ravel(), pred.ravel(), strict=True):
        if t != 255:
            conf[t, p] += 1
    return conf


def numpy_metrics(conf: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """mmseg 0.29 `total_area_to_metrics` written out: IoU = I / (P + L - I), Acc = I / L, nanmean."""
    inter = np.diag(conf).astype(float)
    label, pred = conf.sum(1).astype(float), conf.sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (label + pred - inter)
        acc = inter / label
    return np.nanmean(iou) * 100, np.nanmean(acc) * 100, inter.sum() / label.sum() * 100, iou * 100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_metrics_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 7
    label = rng.integers(0, n - 2, (3, 40, 50))  # classes 5 and 6 never labelled
    label[rng.random(label.shape) < 0.2] = 255
    pred = np.where(
        rng.random(label.shape) < 0.6, np.where(label == 255, 0, label), rng.integers(0, n - 1, label.shape)
    )
    # class 6 is never predicted nor labelled: NaN, left out; class 5 is predicted, never labelled: IoU 0
    conf = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), n) for p, t in zip(pred, label, strict=True))
    ref = numpy_confusion(pred, label, n)
    assert np.array_equal(conf.numpy(), ref)
    got = seg_metrics(conf)
    miou, macc, aacc, iou = numpy_metrics(ref)
    assert got["mIoU"] == pytest.approx(miou) and got["mAcc"] == pytest.approx(macc)
    assert got["aAcc"] == pytest.approx(aacc)
    assert got["per_class"][6] is None and got["per_class"][5] == 0.0
    assert got["per_class"][:6] == pytest.approx(list(iou[:6]))


def test_perfect_and_ignored() -> None:
    label = torch.tensor([[0, 1], [255, 2]])
    m = seg_metrics(confusion_matrix(label.clamp(max=2), label, 4))
    assert m["mIoU"] == m["mAcc"] == m["aAcc"] == 100.0 and m["per_class"] == [100.0, 100.0, 100.0, None]
    empty = seg_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["aAcc"])


class _Fixed(torch.nn.Module):
    """Predicts class = the first input channel rounded (upsampled to the label size by predict's caller)."""

    def predict(self, images, size, crop, stride, scales, flip, min_side):
        scores = torch.nn.functional.one_hot(images[:, 0].round().long().clamp(0, 2), 3).permute(0, 3, 1, 2).float()
        return torch.nn.functional.interpolate(scores, size=tuple(size), mode="nearest")


def test_evaluation_skips_padding_keys_and_counts_bad_images() -> None:
    labels = [torch.tensor([[0, 1], [2, 2]]), torch.tensor([[1, 1], [1, 255]])]
    images = [lab.clamp(max=2).float().expand(3, 2, 2).clone() for lab in labels]
    images[1][0] = 0.0  # the second image is predicted all 0
    batches = [
        {"images": [images[0], images[1]], "targets": labels, "index": torch.tensor([0, 1]), "bad": []},
        {"images": [images[1]], "targets": [labels[1]], "index": torch.tensor([2]), "bad": []},  # padding key
        {"images": None, "targets": None, "index": None, "bad": [("x.jpg", "corrupt")]},
    ]
    m = evaluate_segmentor(_Fixed(), batches, torch.device("cpu"), 3, n_total=2)
    ref = numpy_confusion(np.array([[0, 1], [2, 2], [0, 0], [0, 0]]), np.array([[0, 1], [2, 2], [1, 1], [1, 255]]), 3)
    miou, macc, aacc, _ = numpy_metrics(ref)
    assert (m["count"], m["bad"]) == (2, 1)
    assert m["mIoU"] == pytest.approx(miou) and m["aAcc"] == pytest.approx(aacc) and m["mAcc"] == pytest.approx(macc)
