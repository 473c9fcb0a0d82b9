"""The one vocabulary of compute precision, shared by the API, the run configs, the CLI and the benchmarks.

`fp32` is full precision; `bf16` and `fp16` are the reduced ones (autocast, or the weights cast to
them where a caller does that). `none`, the word older configs and `--amp none` used for full
precision, is read as `fp32`. Importing this module does not import torch: the CLI builds its parser
from `DTYPES` without it, so the functions that return torch dtypes import it when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FULL = "fp32"
DTYPES = ("fp32", "bf16", "fp16")  # the words, full precision first
ALIASES = {"none": "fp32"}  # older spellings, still read
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical(word: str | None) -> str:
    """The word for `word` (None: full precision; an alias: its word); ValueError for anything else."""
    if word is None:
        return FULL
    found = ALIASES.get(word, word) if isinstance(word, str) else None
    if found not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {word!r}")
    return found


def torch_dtype(word: str | None) -> torch.dtype:
    """The torch dtype `word` names (fp32 -> torch.float32, ...)."""
    import torch  # here, not at the top: see the module docstring

    return getattr(torch, _TORCH_NAMES[canonical(word)])


def autocast_dtype(word: str | None) -> torch.dtype | None:
    """The autocast dtype of `word`: None for full precision (no autocast)."""
    return None if canonical(word) == FULL else torch_dtype(word)


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device_type` ('cpu', 'cuda'); None (full precision) turns autocast off."""
    import torch

    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype is not None)
