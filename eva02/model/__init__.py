"""Model code: configuration, RoPE, layers and the EVA-02 ViT (torch only, no I/O).

`Eva02` is imported on first use, so reading configs (`VARIANTS`, `Eva02Config`) does not load torch.
"""

from __future__ import annotations

from typing import Any

from eva02.model.config import VARIANTS, Eva02Config

__all__ = ["VARIANTS", "Eva02", "Eva02Config"]


def __getattr__(name: str) -> Any:
    if name == "Eva02":
        from eva02.model.vit import Eva02

        globals()["Eva02"] = Eva02
        return Eva02
    raise AttributeError(f"module 'eva02.model' has no attribute {name!r}")
