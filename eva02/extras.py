"""Optional dependencies: each optional part of the package names the extra that brings what it needs.

`need('matplotlib', 'plot', 'eva02 plot')` imports and returns the module, or raises `MissingExtra` whose
one-line message gives the install command in both forms (from an index and from a checkout).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# extra -> the distributions it installs (pyproject.toml's [project.optional-dependencies])
EXTRAS = {
    "plot": "matplotlib",
    "bench": "timm",
    "export": "onnx, onnxruntime and onnxscript",
    "mim": "open_clip_torch",
    "clip": "open_clip_torch",
    "ann": "faiss-cpu",
    "det": "pycocotools",
    "data": "webdataset, wids and datasets",
    "serve": "fastapi, uvicorn, python-multipart and prometheus_client",
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which extra brings it."""


def install_hint(extra: str) -> str:
    return f"pip install 'eva02[{extra}]' (in a checkout: pip install -e '.[{extra}]')"


def need(module: str, extra: str, what: str) -> ModuleType:
    """Import `module` for `what`, or raise MissingExtra naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but broken: its own error says more
        pkgs = EXTRAS.get(extra, top)
        raise MissingExtra(f"{what} needs {pkgs}: {install_hint(extra)}", name=top) from None
