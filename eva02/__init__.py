"""EVA-02 vision transformers in PyTorch: models, weights, inference, fine-tuning, pre-training, export.

The public API, imported lazily so that `import eva02` stays cheap:

    from eva02 import get_model, inference_model, list_models
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Eva02": "eva02.model.vit",
    "Eva02Config": "eva02.model.config",
    "VARIANTS": "eva02.model.config",
    "get_model": "eva02.weights.load",
    "load_model": "eva02.weights.load",
    "load_checkpoint": "eva02.weights.load",
    "save_checkpoint": "eva02.weights.load",
    "list_models": "eva02.weights.zoo",
    "inference_model": "eva02.inference",
    "count_flops": "eva02.flops",
    "count_macs": "eva02.flops",
    "count_params": "eva02.flops",
    "get_clip": "eva02.weights.clip",
    "save_clip": "eva02.weights.clip",
    "list_clip_models": "eva02.weights.clip",
    "zero_shot_classifier": "eva02.clip",
    "tokenize": "eva02.clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eva02' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
