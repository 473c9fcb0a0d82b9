"""Model code: configuration, RoPE, layers and the EVA-02 ViT (torch only, no I/O)."""

from eva02.model.config import VARIANTS, Eva02Config
from eva02.model.vit import Eva02

__all__ = ["VARIANTS", "Eva02", "Eva02Config"]
