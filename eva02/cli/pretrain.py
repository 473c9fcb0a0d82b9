"""`eva02 mask-demo`: show what masked image modelling hides from the student.

Pre-training itself runs like fine-tuning, through `eva02 train CONFIG` / `tools/train.py` with a
`*_mim_in21k.py` config; this module only adds the picture of a sampled block-wise mask. `--out` is
checked before the image is read: an image extension, never the input image, never an existing file
without `--force`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from eva02.cli import CliError
from eva02.cli.options import add_out
from eva02.fileio import check_output

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

GREY = 128


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mask-demo",
        help="save a picture of a sampled pre-training mask over an image",
        description=(
            "Sample a block-wise MIM mask (the EVA-02 recipe: 105 of 16x16 patches at 224 px) and save the "
            "image next to a copy whose masked patches are greyed out: the student sees the right-hand picture "
            "and predicts the teacher's features of the grey patches."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="an image file")
    add_out(p, "PNG", "output picture (.png or .jpg)", "replace --out if it exists", required=True)
    p.add_argument("--img-size", type=int, default=224, help="crop size in pixels (default 224)")
    p.add_argument("--patch-size", type=int, default=14, help="patch size in pixels (default 14)")
    p.add_argument("--num-masking", type=int, default=None, help="patches to mask (default: 105/256 of the grid)")
    p.add_argument("--min-num", type=int, default=16, help="smallest block area in patches (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the mask (default 0)")
    p.add_argument("--scale", type=int, default=2, help="enlarge the saved picture by this factor (default 2)")
    p.set_defaults(func=run)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (bicubic) and cut the central size x size square."""
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def mask_overlay(img: Image.Image, mask: np.ndarray, strength: float = 0.8) -> Image.Image:
    """`img` with the patches where `mask` (gh, gw) is True blended towards grey, outlined in white."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img.convert("RGB")).astype(np.float32)  # (H, W, 3)
    gh, gw = mask.shape
    ph, pw = a.shape[0] // gh, a.shape[1] // gw
    pix = np.kron(mask, np.ones((ph, pw), dtype=bool))  # (H, W) pixel mask
    a[pix] = a[pix] * (1.0 - strength) + GREY * strength
    # outline every masked patch so the block structure stays readable on grey parts of the photo
    for i, j in zip(*np.nonzero(mask), strict=True):
        y, x = i * ph, j * pw
        a[y, x : x + pw] = a[y + ph - 1, x : x + pw] = 235
        a[y : y + ph, x] = a[y : y + ph, x + pw - 1] = 235
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))


def render(img: Image.Image, mask: np.ndarray, scale: int = 1) -> Image.Image:
    """Side by side: the crop, and the crop with its masked patches greyed out; enlarged by `scale`."""
    from PIL import Image

    size = img.size[0]
    out = Image.new("RGB", (2 * size + 8, size), (255, 255, 255))
    out.paste(img, (0, 0))
    out.paste(mask_overlay(img, mask), (size + 8, 0))
    if scale > 1:
        out = out.resize((out.size[0] * scale, out.size[1] * scale), Image.Resampling.NEAREST)
    return out


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from eva02.data.images import load_image, save_image_atomic
    from eva02.data.masking import BlockMaskGenerator

    if args.img_size <= 0 or args.patch_size <= 0 or args.img_size % args.patch_size:
        raise CliError(
            f"--img-size {args.img_size} must be a positive multiple of --patch-size {args.patch_size}, e.g. 224 and 14"
        )
    if not 1 <= args.scale <= 8:
        raise CliError(f"--scale must be between 1 and 8, got {args.scale}")
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise CliError(f"--out {args.out}: unknown image extension '{Path(args.out).suffix}'; use .png or .jpg")
    check_output(args.out, inputs=[args.image], force=args.force, flag="--out")
    grid = args.img_size // args.patch_size
    n = grid * grid
    num = args.num_masking if args.num_masking is not None else round(n * 105 / 256)
    if not 0 <= num <= n:
        raise CliError(f"--num-masking must be between 0 and {n} for a {grid}x{grid} grid of patches, got {num}")
    if args.min_num < 1:
        raise CliError(f"--min-num must be 1 or more, got {args.min_num}")
    least = min(args.min_num, max(num, 1))  # no block may need more patches than are masked
    gen = BlockMaskGenerator((grid, grid), num_masking=num, min_num=least, max_num=max(num, 1), seed=args.seed)
    mask, blocks = gen.sample()
    img = center_crop(load_image(args.image), args.img_size)
    path = save_image_atomic(render(img, mask, args.scale), args.out)
    print(f"masked {int(mask.sum())}/{n} patches ({grid}x{grid} grid) in {len(blocks)} blocks -> {path}")
    return 0
