"""COCO-format detection data: polygons and RLE masks, crowd regions, bad entries skipped with one warning,
ViTDet's large-scale jitter, the padded batch. Also holds `render_scenes`, the synthetic COCO-format shape
scenes that the detection tests train and evaluate on."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api  # noqa: E402

from eva02.data.coco import CocoDetection, boxes_from_masks, collate, decode_segmentation, large_scale_jitter, unpad  # noqa: E402
from eva02.data.datasets import BadSample  # noqa: E402

SHAPES = ("square", "disc", "triangle")  # category ids 1, 2, 3


def _shape(kind: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> tuple[np.ndarray, list | dict]:
    """(mask, COCO segmentation) of a shape: squares and triangles as polygons, discs as compressed RLE."""
    h, w = size
    if kind == "disc":
        yy, xx = np.mgrid[:h, :w]
        m = (((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= r * r).astype(np.uint8)
        rle = mask_api.encode(np.asfortranarray(m))
        return m, {"size": [h, w], "counts": rle["counts"].decode()}
    if kind == "square":
        pts = [cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r]
    else:
        pts = [cx, cy - r, cx + r, cy + r * 0.8, cx - r, cy + r * 0.8]
    return mask_api.decode(mask_api.merge(mask_api.frPyObjects([pts], h, w))), [pts]


def render_scenes(folder: Path, n: int, size: int = 160, seed: int = 0, name: str = "scenes") -> Path:
    """Write `n` images of 2-3 non-overlapping shapes (square, disc, triangle; random colours on a smooth
    random background) under folder/name/ and their COCO annotations to folder/name.json; returns the json."""
    rng = np.random.default_rng(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        h, w = int(rng.integers(size * 3 // 4, size + 1)), int(rng.integers(size * 3 // 4, size + 1))
        grad = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0, 90, 3) + rng.uniform(60, 160, 3)
        base = grad + rng.normal(0, 8, (h, w, 3))
        canvas = np.clip(np.broadcast_to(base, (h, w, 3)), 0, 255).astype(np.uint8).copy()
        taken = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(2, 4))):
            for _attempt in range(20):
                kind = SHAPES[int(rng.integers(3))]
                r = rng.uniform(0.1, 0.22) * min(h, w)
                cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
                m, segm = _shape(kind, cx, cy, r, (h, w))
                grown = np.zeros_like(taken)
                ys, xs = np.nonzero(m)
                grown[max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4] = True
                if not (grown & taken).any():
                    break
            else:
                continue
            taken |= grown
            canvas[m.astype(bool)] = rng.integers(0, 256, 3)
            x1, y1, x2, y2 = boxes_from_masks(m[None])[0].tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": SHAPES.index(kind) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(m.sum()), "iscrowd": 0,
                         "segmentation": segm})  # fmt: skip
        Image.fromarray(canvas).save(folder / name / f"{i:04d}.png")
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "height": h, "width": w})
    cats = [{"id": k + 1, "name": s} for k, s in enumerate(SHAPES)]
    ann_file = folder / f"{name}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_file


# ------------------------------------------------------------------------------------------ tests
def _tiny_set(tmp_path: Path) -> tuple[Path, dict]:
    """Two 40x48 images: a polygon square, a disc as uncompressed RLE, a crowd region, and bad entries."""
    (tmp_path / "img").mkdir()
    for i in (1, 2):
        Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    disc = np.zeros((40, 48), np.uint8)
    disc[20:30, 30:42] = 1
    flat = disc.ravel(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    square = [4.0, 6.0, 14.0, 6.0, 14.0, 16.0, 4.0, 16.0]
    good = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 6, 10, 10], "iscrowd": 0, "segmentation": [square]},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [30, 20, 12, 10], "iscrowd": 0,
         "segmentation": {"size": [40, 48], "counts": runs}},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 30], "iscrowd": 1,
         "segmentation": {"size": [40, 48], "counts": runs}},
    ]  # fmt: skip
    bad = [
        {"id": 4, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5], "segmentation": [square]},
        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5], "segmentation": [square]},
        {"id": 6, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 2, 3]]},
        {"id": 7, "image_id": 2, "category_id": 9, "bbox": [1, 1, 5, 5],
         "segmentation": {"size": [4, 4], "counts": "x"}},
        {"id": 8, "image_id": 99, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [square]},
    ]  # fmt: skip
    data = {
        "images": [{"id": 1, "file_name": "1.png", "height": 40, "width": 48},
                   {"id": 2, "file_name": "2.png", "height": 40, "width": 48},
                   {"id": 3, "file_name": "gone.png", "height": 40, "width": 48},
                   {"id": 4, "height": 40, "width": 48}],
        "annotations": good + bad + [{"id": 9, "image_id": 3, "category_id": 7, "bbox": [1, 1, 5, 5],
                                      "segmentation": [square]}],
        "categories": [{"id": 9, "name": "disc"}, {"id": 7, "name": "square"}],
    }  # fmt: skip
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, {"disc": disc}


def test_reads_polygons_and_rle_skips_crowds_and_names_bad_entries(tmp_path) -> None:
    ann, ref = _tiny_set(tmp_path)
    with pytest.warns(UserWarning) as caught:
        ds = CocoDetection(tmp_path / "img", ann, train=True, size=48, scale=(1.0, 1.0), hflip=0.0)
    (w,) = [str(c.message) for c in caught]
    assert "skipped 6 bad entries" in w and "\n" not in w
    for text in ("annotation 4 (image 1): unknown category_id 5", "annotation 6 (image 2): a polygon",
                 "annotation 5 (image 1): bbox [1, 1, 0, 5] has no area", "image 4: no file_name"):  # fmt: skip
        assert text in w, text
    assert "and 1 more" in w  # annotation 7 (RLE size) or 8 (no such image): counted, not named
    assert ds.classes == ["square", "disc"] and ds.cat_ids == [7, 9]
    # Image 2 has no usable instance left: training leaves it out; the missing image file stays (read later).
    assert [r.image_id for r in ds.records] == [1, 3] and ds.skipped_empty == 1
    img, target, index = ds[(0, 123)]
    assert img.shape == (3, 40, 48) and img.dtype == torch.uint8 and index == 0
    assert target["labels"].tolist() == [1, 2]  # square (id 7) -> 1, disc (id 9) -> 2; the crowd is left out
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 6, 14, 16], [30, 20, 42, 30]]))
    assert torch.equal(target["masks"][1], torch.from_numpy(ref["disc"]))
    assert target["masks"][0].sum() == 100
    bad = ds[1]
    assert isinstance(bad, BadSample) and "gone.png" in bad.path and "no such file" in bad.reason


def test_evaluation_keeps_every_image_and_a_wrong_size_is_a_bad_sample(tmp_path) -> None:
    ann, _ = _tiny_set(tmp_path)
    data = json.loads(ann.read_text())
    data["images"][1]["width"] = 50  # the file is 48 wide
    ann.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(tmp_path / "img", ann, train=False)
    assert [r.image_id for r in ds.records] == [1, 2, 3]
    img, target, _ = ds[0]
    assert img.shape == (3, 40, 48) and target == {"image_id": 1}
    assert "48x40 but its record says 50x40" in ds[1].reason


def test_bad_annotation_files_are_one_clear_error(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        CocoDetection(tmp_path / "img", bad, train=True)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="not COCO format: no images or categories"):
        CocoDetection(tmp_path / "img", bad, train=True)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(tmp_path / "img", tmp_path / "missing.json", train=True)


def _one_instance(tmp_path: Path):
    ann_file = render_scenes(tmp_path, 1, size=120, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CocoDetection(ann_file.with_suffix(""), ann_file, train=True, size=128)
    rec = ds.records[0]
    img = Image.open(rec.path).convert("RGB")
    masks = np.stack([decode_segmentation(i.segm, rec.height, rec.width) for i in rec.instances])
    return img, rec, masks


def test_jitter_at_scale_one_without_flip_keeps_everything(tmp_path) -> None:
    img, rec, masks = _one_instance(tmp_path)
    s = 128 / max(rec.height, rec.width)  # the image fits the 128 square exactly: no crop
    out, t = large_scale_jitter(img, rec.instances, 128, (1.0, 1.0), 0.0, np.random.default_rng(0))
    assert max(out.size) == 128
    ref = np.stack(
        [np.array(Image.fromarray(m * 255).resize(out.size, Image.Resampling.BILINEAR)) > 127 for m in masks]
    )
    agree = (t["masks"].astype(bool) == ref).mean()
    assert agree > 0.99, agree  # polygons drawn at the new size, RLE resampled: the same shapes
    boxes = np.array([i.bbox for i in rec.instances]) * s
    boxes[:, 2:] += boxes[:, :2]
    np.testing.assert_allclose(t["boxes"], boxes, atol=2.0)
    assert t["labels"].tolist() == [i.label for i in rec.instances]


def test_jitter_flips_and_crops_consistently(tmp_path) -> None:
    img, rec, _ = _one_instance(tmp_path)
    a_img, a = large_scale_jitter(img, rec.instances, 128, (1.0, 1.0), 0.0, np.random.default_rng(0))
    b_img, b = large_scale_jitter(img, rec.instances, 128, (1.0, 1.0), 1.0, np.random.default_rng(0))
    assert np.array_equal(np.array(b_img), np.array(a_img)[:, ::-1])
    assert np.array_equal(b["masks"], a["masks"][:, :, ::-1])
    W = a_img.size[0]
    np.testing.assert_allclose(b["boxes"][:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [W, 0, W, 0], a["boxes"])
    big_img, big = large_scale_jitter(img, rec.instances, 64, (2.0, 2.0), 0.5, np.random.default_rng(5))
    assert big_img.size == (64, 64) and big["masks"].shape[1:] == (64, 64)  # scaled to 128, cropped to 64
    assert (big["boxes"][:, 2:] > big["boxes"][:, :2]).all()  # only instances left visible
    np.testing.assert_array_equal(boxes_from_masks(big["masks"]), big["boxes"])


def test_collate_pads_and_unpad_restores() -> None:
    a, b = torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8), torch.randint(0, 255, (3, 25, 10), dtype=torch.uint8)
    batch = collate([(a, {"x": 1}, 0), BadSample("p.png", "broken"), (b, {"x": 2}, 1)])
    assert batch["images"].shape == (2, 3, 25, 30) and batch["sizes"].tolist() == [[20, 30], [25, 10]]
    assert batch["bad"] == [("p.png", "broken")] and batch["index"].tolist() == [0, 1]
    x, y = unpad(batch)
    torch.testing.assert_close(x, a.float() / 255)
    torch.testing.assert_close(y, b.float() / 255)
    assert collate([BadSample("q", "r")])["images"] is None
