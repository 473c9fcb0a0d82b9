"""Files shipped with the package: `DEMO_IMAGE`, a photo of a tabby cat for trying `eva02 predict`.

The photo is scikit-image's `chelsea` sample image (`skimage.data.chelsea()`, 451x300), saved as JPEG.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEMO_IMAGE = ASSETS_DIR / "demo.jpg"
