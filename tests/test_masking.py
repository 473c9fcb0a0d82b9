"""Block-wise mask generator: exact count, block size and aspect bounds, seeded reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eva02.data.masking import BlockMaskGenerator


def test_exact_count_and_shape():
    gen = BlockMaskGenerator(seed=0)
    for _ in range(300):
        mask = gen()
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert int(mask.sum()) == 105


def test_blocks_within_bounds():
    """Each block's sides come from an area in [min_num, budget] and an aspect in [0.3, 1/0.3], rounded."""
    gen = BlockMaskGenerator(seed=1)
    seen = 0
    for _ in range(200):
        mask, blocks = gen.sample()
        covered = np.zeros_like(mask)
        total = 0
        for b in blocks:
            assert 0 <= b.top and b.top + b.h <= 16 and 0 <= b.left and b.left + b.w <= 16
            assert b.h < 16 and b.w < 16
            assert 1 <= b.added <= 105
            # Sides are round(sqrt(area * aspect)) and round(sqrt(area / aspect)): undo the rounding.
            hi_ar = (b.h + 0.5) / max(b.w - 0.5, 1e-9)
            lo_ar = max(b.h - 0.5, 0) / (b.w + 0.5)
            assert hi_ar >= 0.3 - 1e-9 and lo_ar <= 1 / 0.3 + 1e-9, b
            assert (b.h + 0.5) * (b.w + 0.5) >= min(16, 105 - total), b
            covered[b.top : b.top + b.h, b.left : b.left + b.w] = True
            total += b.added
            seen += 1
        assert covered.sum() == total  # blocks account for every patch they report
        assert mask[covered].all() and mask.sum() - total >= 0
        # the first block is drawn with the full budget, so it is never below min_num before rounding
        first = blocks[0]
        assert (first.h + 0.5) * (first.w + 0.5) >= 16
    assert seen > 400


def test_blocks_are_blocky_not_scattered():
    gen = BlockMaskGenerator(seed=2)
    for _ in range(50):
        mask, blocks = gen.sample()
        # most masked patches come from blocks, the top-up only fills a few holes
        assert sum(b.added for b in blocks) >= 90
        # masked patches have masked neighbours (the official blocks are at least 2 wide)
        padded = np.pad(mask, 1)
        neigh = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert (neigh[mask]).mean() > 0.95


def test_seeded_reproducibility():
    a = BlockMaskGenerator(seed=7)
    b = BlockMaskGenerator(seed=7)
    c = BlockMaskGenerator(seed=8)
    ma, mb, mc = a.batch(8), b.batch(8), c.batch(8)
    assert ma.shape == (8, 256) and ma.dtype == torch.bool
    assert torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    # an explicit generator overrides the instance's own state
    r1 = a(np.random.default_rng(3))
    r2 = c(np.random.default_rng(3))
    assert np.array_equal(r1, r2)


def test_other_grid_and_aspect_range():
    gen = BlockMaskGenerator(grid=(8, 12), num_masking=30, min_num=4, max_num=10, min_aspect=0.5, seed=0)
    assert math.isclose(gen.max_aspect, 2.0)
    for _ in range(100):
        mask, blocks = gen.sample()
        assert mask.shape == (8, 12) and mask.sum() == 30
        assert all(b.added <= 10 for b in blocks)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_masking": 300}, "num_masking"),
        ({"min_num": 0}, "min_num"),
        ({"min_num": 20, "max_num": 10}, "min_num"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "aspect"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMaskGenerator(**kwargs)


def test_mask_demo_command(tmp_path, capsys):
    from PIL import Image

    from eva02.cli import main

    rng = np.random.default_rng(0)
    src = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "sub" / "mask.png"
    assert main(["mask-demo", str(src), "--out", str(out), "--seed", "3", "--scale", "1"]) == 0
    assert "masked 105/256 patches" in capsys.readouterr().out
    pic = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert pic.shape == (224, 2 * 224 + 8, 3)
    left, right = pic[:, :224], pic[:, 232:]
    mask = BlockMaskGenerator(seed=3)()
    for i in range(16):
        for j in range(16):
            a = left[i * 14 : (i + 1) * 14, j * 14 : (j + 1) * 14]
            b = right[i * 14 : (i + 1) * 14, j * 14 : (j + 1) * 14]
            if mask[i, j]:
                assert np.abs(b[2:-2, 2:-2] - 128).max() <= 0.2 * 255 + 1  # greyed out
            else:
                assert np.array_equal(a, b)  # untouched
    # bad input: one clear line, exit code 2, nothing written
    bad = tmp_path / "bad.png"
    assert main(["mask-demo", str(src), "--out", str(bad), "--img-size", "100"]) == 2
    assert main(["mask-demo", str(tmp_path / "missing.jpg"), "--out", str(bad)]) == 2
    assert not bad.exists()
    err = capsys.readouterr().err
    assert "--img-size 100 must be a positive multiple" in err and "missing.jpg" in err
