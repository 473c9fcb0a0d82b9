"""RandAugment's ops on uint8 tensors (`eva02.data.warp`, `fast_transforms.FastRandAugment`) against the
reference's PIL ops (torchvision's RandAugment table on PIL images, bicubic, mean-colour fill): the same geometry
and fill, the shears' pixels within 1 grey level of PIL's (a few in a million), the translations' and the
sharpness' equal, every other op PIL's own; and the reference's random draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.transforms import v2

from eva02.data import warp
from eva02.data.fast_transforms import FastRandAugment
from eva02.data.train_transforms import RandAugmentMstd

FILL = [122, 116, 104]
BICUBIC = v2.InterpolationMode.BICUBIC
REF = v2.RandAugment(fill=FILL)


def reference(img: Image.Image, op: str, magnitude: float) -> np.ndarray:
    return np.asarray(REF._apply_image_or_video_transform(img, op, magnitude, BICUBIC, REF._fill)).astype(int)


def photo(w: int, h: int, name: str = "coffee") -> Image.Image:
    return Image.fromarray(getattr(data, name)()).resize((w, h), Image.BICUBIC)


def hwc(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img))


@pytest.mark.parametrize("op", ["ShearX", "ShearY"])
@pytest.mark.parametrize("size", [(120, 90), (77, 130)])
def test_shears_are_pils_bicubic_warp_within_one_level(op, size) -> None:
    img = photo(*size)
    diffs = []
    for magnitude in (-0.3, -0.2999, -0.123, -0.01, 0.0, 0.004, 0.05, 0.15, 0.27, 0.3):
        got = warp.shear(hwc(img), op, magnitude, tuple(FILL)).numpy().astype(int)
        assert got.shape == (size[1], size[0], 3)
        diffs.append(np.abs(got - reference(img, op, magnitude)).ravel())
    d = np.concatenate(diffs)
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())


@pytest.mark.parametrize("op", ["ShearX", "ShearY"])
def test_shears_keep_pils_geometry_fill_and_flat_areas_exactly(op) -> None:
    """A flat image far from the fill colour: where PIL fills and where it samples, to the pixel, and the
    sampled value unchanged (no truncation of a flat area to one level lower)."""
    img = Image.new("RGB", (64, 48), (200, 30, 250))
    for magnitude in (-0.3, -0.17, 0.0, 0.11, 0.3):
        got = warp.shear(hwc(img), op, magnitude, tuple(FILL)).numpy().astype(int)
        np.testing.assert_array_equal(got, reference(img, op, magnitude))


def test_shear_results_do_not_share_its_scratch_memory() -> None:
    img = hwc(photo(60, 40))
    a = warp.shear(img, "ShearX", 0.2, tuple(FILL))
    kept = a.clone()
    warp.shear(img, "ShearY", -0.3, tuple(FILL))
    warp.shear(a, "ShearX", 0.1, tuple(FILL))  # its own output as input
    torch.testing.assert_close(a, kept, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Rotate"):
        warp.shear_coefficient("Rotate", 0.1)


@pytest.mark.parametrize("op", ["ShearX", "ShearY"])
def test_shears_of_tiny_images(op) -> None:
    rng = np.random.default_rng(0)
    for w, h in [(1, 1), (2, 3), (5, 1), (9, 4)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for magnitude in (-0.3, -0.1, 0.0, 0.2, 0.3):
            got = warp.shear(hwc(img), op, magnitude, tuple(FILL)).numpy().astype(int)
            assert np.abs(got - reference(img, op, magnitude)).max() <= 1, (w, h, magnitude)


@pytest.mark.parametrize("size", [(120, 90), (7, 5), (3, 4), (2, 9)])
def test_sharpness_is_pils_bit_for_bit(size) -> None:
    img = photo(*size, "astronaut")
    for magnitude in (-0.9, -0.45, 0.0, 0.37, 0.9):
        got = warp.sharpness(hwc(img), 1.0 + magnitude).numpy()
        np.testing.assert_array_equal(got, reference(img, "Sharpness", magnitude))
    flipped = warp.sharpness(hwc(img).flip(1).transpose(0, 1), 1.5).numpy()  # any strides
    np.testing.assert_array_equal(flipped, reference(img.transpose(Image.Transpose.ROTATE_90), "Sharpness", 0.5))


@pytest.mark.parametrize("op", ["TranslateX", "TranslateY"])
def test_translations_are_pils_bicubic_warp_bit_for_bit(op) -> None:
    img = photo(120, 90)
    for magnitude in (-130.0, -41.7, -1.0, 0.0, 3.0, 54.9, 89.0, 119.0, 500.0):
        shift = int(magnitude)
        dx, dy = (shift, 0) if op == "TranslateX" else (0, shift)
        got = warp.translate(hwc(img), dx, dy, tuple(FILL)).numpy()
        np.testing.assert_array_equal(got, reference(img, op, magnitude))


def test_every_op_is_the_references_op() -> None:
    """Each op of the table through `FastRandAugment` (made to draw it) against the reference op on PIL."""
    img = photo(96, 72, "astronaut")
    fast = FastRandAugment(fill=FILL, interpolation=BICUBIC)
    for op, (magnitudes_fn, signed) in fast._AUGMENTATION_SPACE.items():
        mags = magnitudes_fn(101, 72, 96)
        for magnitude in [0.0] if mags is None else [float(mags[i]) for i in (0, 47, 90, 100)]:
            for m in (magnitude, -magnitude) if signed else (magnitude,):
                fast.draw = lambda h, w, op=op, m=m: [(op, m)]
                got = fast(hwc(img)).numpy().astype(int)
                d = np.abs(got - reference(img, op, m))
                assert d.max() <= (1 if op.startswith("Shear") else 0), (op, m)
    assert isinstance(fast(hwc(img)), torch.Tensor)


def expected_draws(space: dict, n: int, level: float, mstd: float, height: int, width: int) -> list:
    """timm's rand-m{level}-mstd{mstd}-inc1 on torchvision's table, written out as the torch calls it makes:
    per op, its index, whether it applies (p 0.5), the level's noise, the sign."""
    out = []
    for _ in range(n):
        op = list(space)[int(torch.randint(len(space), ()))]
        if torch.rand(()) >= 0.5:
            continue
        mags, signed = space[op][0](101, height, width), space[op][1]
        if mags is None:
            out.append((op, 0.0))
            continue
        lv = min(10.0, max(0.0, level + float(torch.randn(())) * mstd))
        m = float(mags[round(lv * 10)])
        out.append((op, -m if signed and torch.rand(()) <= 0.5 else m))
    return out


def test_draws_are_the_references_draws() -> None:
    """Same seed, same ops and magnitudes, in the same order, as the reference's `forward` applies them and as
    the recipe's definition draws them; the generator left where they leave it."""
    ref = RandAugmentMstd(2, 9.0, 0.5, interpolation=BICUBIC, fill=FILL)
    applied = []
    ref.apply_op = lambda image, op, magnitude: applied.append((op, magnitude)) or image
    img = photo(50, 40)
    fast = FastRandAugment(2, 9.0, 0.5, interpolation=BICUBIC, fill=FILL)
    seen = set()
    for seed in range(80):
        torch.manual_seed(seed)
        want = expected_draws(fast._AUGMENTATION_SPACE, 2, 9.0, 0.5, 40, 50)
        after = torch.rand(())
        torch.manual_seed(seed)
        applied.clear()
        ref(img)
        assert applied == want and torch.rand(()) == after, seed
        torch.manual_seed(seed)
        assert fast.draw(40, 50) == want and torch.rand(()) == after, seed
        seen.update(op for op, _ in want)
    assert len(seen) >= 12
