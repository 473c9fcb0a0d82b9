"""Files shipped with the package: `DEMO_IMAGE`, a photo of a tabby cat for trying `eva02 predict`.

The photo is scikit-image's `chelsea` sample image (`skimage.data.chelsea()`, 451x300), saved as JPEG.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEMO_IMAGE = ASSETS_DIR / "demo.jpg"


def demo_image_path() -> Path:
    """Path of the bundled demo photo (a cat; ImageNet-1k class 281 'tabby' or a neighbour)."""
    return DEMO_IMAGE
