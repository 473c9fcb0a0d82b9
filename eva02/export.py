"""Deployment exports of an Eva02 model: ONNX, TorchScript and torch.export programs, each verifiable.

- 'onnx': torch.onnx's dynamo exporter (needs `onnxscript`), opset 18; run with onnxruntime.
- 'torchscript': `torch.jit.trace`; load with `torch.jit.load`.
- 'exported-program': `torch.export.export` saved with `torch.export.save` (.pt2); load with
  `torch.export.load(path).module()`.
The image size is fixed at export time (position embedding and RoPE tables are constants of the
graph); the batch size can be left dynamic. Files are written through `eva02.fileio.atomic_write` (a
temporary name, then a rename, with the umask's permissions), so an export that fails never leaves a
partial file behind.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eva02.extras import need
from eva02.fileio import atomic_write
from eva02.model import fast
from eva02.model.rope import RopeTables

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
OPSET = 18
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension; exporters need a finite range


def _native_img_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "img_size", None)


def prepare_for_export(model: nn.Module, img_size: int | None = None) -> tuple[nn.Module, int]:
    """An eval-mode model whose native size is `img_size` (a resized copy if needed), and that size."""
    native = _native_img_size(model)
    size = img_size or native
    if size is None:
        raise ValueError("the model has no cfg.img_size; pass img_size (e.g. --img-size 224)")
    if native is not None and size != native:
        if not hasattr(model, "set_img_size"):
            raise ValueError(f"the model runs at {native} px and cannot be resized; export at --img-size {native}")
        model = copy.deepcopy(model)  # bake the resampled position embedding without touching the caller's model
        model.set_img_size(size)
    return model.eval(), size


def example_input(model: nn.Module, img_size: int, batch: int = 2) -> torch.Tensor:
    """A random image batch on the model's device and in its dtype."""
    p = next(model.parameters())
    in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    return torch.randn(batch, in_chans, img_size, img_size, device=p.device, dtype=p.dtype)


def export_model(
    model: nn.Module, fmt: str, out: str | os.PathLike, img_size: int | None = None, dynamic_batch: bool = False
) -> Path:
    """Export `model` (images -> outputs) to `out` in format `fmt`; returns the path written.

    Args:
        fmt: 'onnx', 'torchscript' or 'exported-program'.
        img_size: input resolution of the exported graph (default: the model's own).
        dynamic_batch: leave the batch dimension free (1..4096) instead of fixing it to 2.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / ('model' + SUFFIXES[fmt])}")
    if fmt == "exported-program" and out.suffix != ".pt2":
        raise ValueError(
            f"--out {out}: torch.export programs must be saved as .pt2 files; use {out.with_suffix('.pt2')}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    model, size = prepare_for_export(model, img_size)
    x = example_input(model, size)

    def write(tmp: str) -> None:
        with torch.no_grad():
            if fmt == "onnx":
                _export_onnx(model, x, tmp, dynamic_batch)
            elif fmt == "torchscript":
                _export_torchscript(model, x, tmp)
            else:
                _export_program(model, x, tmp, dynamic_batch)

    atomic_write(out, write, suffix=".tmp" + out.suffix)  # keeps the real suffix: torch.export.save insists on .pt2
    return out


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


class SeparateProjections(fast.Traced):
    """The block form traced for ONNX: q, k, v and SwiGLU's gate and value come from their own products.

    In graph runtimes without views (ONNX), slicing the fused qkv output, splitting it and permuting heads
    are copies; three products on slices of the fused weight (constants, folded at export) write q, k
    and v directly, and two write the gate and the value. Same numbers as the fused layout
    (`tests/test_fast_paths.py`); eager and compiled PyTorch keep the fused form.
    """

    def attention(self, attn: nn.Module, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        B, T, D = x.shape
        w, x = attn.qkv.weight, x.reshape(B * T, D)  # 2-D products: one Gemm each, bias included
        q, k, v = (
            F.linear(x, w[:D], attn.q_bias),
            F.linear(x, w[D : 2 * D]),  # the k bias is zero
            F.linear(x, w[2 * D :], attn.v_bias),
        )
        q, k, v = (t.view(B, T, attn.heads, attn.head_dim) for t in (q, k, v))  # (B, T, h, hd)
        cos, sin = rope.cos[:, None, :], rope.sin[:, None, :]  # (T, 1, hd)
        # The pair swap of the real form as a product with a permutation matrix: exact (one term per
        # output, times 1), and one GEMM in graph runtimes, where `flip` is a strided copy.
        hd = attn.head_dim
        swap = torch.eye(hd, dtype=q.dtype, device=q.device).view(hd // 2, 2, hd).flip(1).reshape(hd, hd)
        q, k = ((t * cos + (t @ swap) * sin).to(t.dtype) for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
        x = F.scaled_dot_product_attention(q, k, v)
        return attn.proj(x.transpose(1, 2).reshape(B * T, D)).view(B, T, D)

    def mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        H, shape = mlp.w12.weight.shape[0] // 2, x.shape
        w, b, x = mlp.w12.weight, mlp.w12.bias, x.reshape(-1, shape[-1])  # 2-D: Gemm with its bias
        h = mlp.norm(F.silu(F.linear(x, w[:H], b[:H])) * F.linear(x, w[H:], b[H:]))
        return mlp.w3(h).view(shape)


@contextlib.contextmanager
def separate_projections(model: nn.Module):
    """Within the block, model calls (of `model` and any other Eva02) run their blocks in the
    `SeparateProjections` form; the model itself is not changed. Yields `model`."""
    with fast.use(SeparateProjections()):
        yield model


def _export_onnx(model: nn.Module, x: torch.Tensor, path: str, dynamic_batch: bool) -> None:
    need("onnxscript", "export", "ONNX export")  # the dynamo exporter's dependency: fail early and clearly
    shapes = {"x": {0: _batch_dim()}} if dynamic_batch else None
    with warnings.catch_warnings(), separate_projections(model):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["output"],
            dynamic_shapes=shapes,
            verbose=False,
        )
    program.save(path)


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: str) -> None:
    # Tracing records shapes as size() ops, so the batch stays free; the image size is baked in,
    # which is what the tracer's warnings about Python booleans (the grid checks) are about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    traced.save(path)


def _export_program(model: nn.Module, x: torch.Tensor, path: str, dynamic_batch: bool) -> None:
    shapes = {"x": {0: _batch_dim()}} if dynamic_batch else None
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    torch.export.save(program, path)


def detect_format(path: str | os.PathLike) -> str:
    """Format of an exported file from its suffix (.onnx, .pt2, anything else: TorchScript)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "exported-program"
    return "torchscript"


def run_exported(path: str | os.PathLike, x: torch.Tensor, fmt: str | None = None) -> torch.Tensor:
    """Run an exported file on `x` with its own runtime (onnxruntime for ONNX); output on the CPU."""
    fmt = fmt or detect_format(path)
    if fmt == "onnx":
        ort = need("onnxruntime", "export", "running an ONNX file")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return torch.from_numpy(sess.run(None, {name: x.detach().cpu().numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location=x.device)
    elif fmt == "exported-program":
        module = torch.export.load(str(path)).module()
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    with torch.no_grad():
        return module(x).cpu()


def verify_export(path: str | os.PathLike, model: nn.Module, x: torch.Tensor, fmt: str | None = None) -> float:
    """Largest absolute difference between the exported file's output and the eager model's on `x`."""
    model, _ = prepare_for_export(model, x.shape[-1])
    with torch.no_grad():
        ref = model(x).cpu()
    got = run_exported(path, x, fmt)
    if got.shape != ref.shape:
        raise ValueError(f"exported output has shape {tuple(got.shape)}, eager has {tuple(ref.shape)}")
    return (got.float() - ref.float()).abs().max().item()
