"""Exports (ONNX, TorchScript, torch.export) of a small Eva02, checked numerically against eager."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from eva02.cli import main
from eva02.export import export_model, run_exported, verify_export
from eva02.model.config import VARIANTS
from eva02.model.vit import Eva02

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


@pytest.fixture(scope="module")
def model() -> Eva02:
    torch.manual_seed(0)
    m = Eva02(VARIANTS["test"].replace(num_classes=10)).eval()
    with torch.no_grad():  # non-zero biases so a lost q/v bias or head bias would show
        for blk in m.blocks:
            blk.attn.q_bias.normal_(0, 0.1)
            blk.attn.v_bias.normal_(0, 0.1)
        m.head.weight.normal_(0, 0.1)
    return m


# Each export is made once per module (the ONNX and torch.export ones take seconds) and read by every
# test that needs that kind of file.
@pytest.fixture(scope="module")
def onnx_dynamic(model, tmp_path_factory):
    if not HAVE_ORT:
        pytest.skip("onnxruntime and onnxscript are needed for ONNX export")
    return export_model(model, "onnx", tmp_path_factory.mktemp("onnx") / "m.onnx", dynamic_batch=True)


@pytest.fixture(scope="module")
def program_dynamic(model, tmp_path_factory):
    return export_model(model, "exported-program", tmp_path_factory.mktemp("ep") / "m.pt2", dynamic_batch=True)


@pytest.fixture(scope="module")
def program_static(model, tmp_path_factory):
    return export_model(model, "exported-program", tmp_path_factory.mktemp("ep") / "m.pt2")


def _check_batches(path, model, fmt, batches=(1, 3), size=56) -> None:
    """The file run by its own runtime gives the eager model's outputs (shape included) at each batch size."""
    for b in batches:
        x = torch.randn(b, 3, size, size)
        assert verify_export(path, model, x, fmt) < 1e-5  # raises on a shape other than eager's (b, 10)


def test_onnx_dynamic_batch(model, onnx_dynamic):
    path = onnx_dynamic
    import onnx

    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    # q, k, v and SwiGLU's gate and value come from their own products: no Split of fused outputs
    # (a copy in graph runtimes), and the caller's model is left in its eager layout
    ops = [n.op_type for n in proto.graph.node]
    assert "Split" not in ops
    assert not any(m.separate_projections for m in model.modules() if hasattr(m, "separate_projections"))
    _check_batches(path, model, "onnx")


def test_torchscript_dynamic_batch(model, tmp_path):
    path = export_model(model, "torchscript", tmp_path / "m.ts", dynamic_batch=True)
    _check_batches(path, model, "torchscript")


def test_exported_program_dynamic_batch(model, program_dynamic):
    _check_batches(program_dynamic, model, "exported-program")


def test_exported_program_fixed_batch_rejects_other_batch(model, program_static):
    path = program_static
    _check_batches(path, model, "exported-program", batches=(2,))
    with pytest.raises(AssertionError, match="Guard failed"):  # batch 2 is a guard of a static export
        run_exported(path, torch.randn(3, 3, 56, 56))


def test_other_img_size_bakes_resampled_pos_embed(model, tmp_path):
    before = model.pos_embed.detach().clone()
    path = export_model(model, "torchscript", tmp_path / "m70.ts", img_size=70, dynamic_batch=True)
    assert torch.equal(model.pos_embed, before) and model.cfg.img_size == 56  # caller's model untouched
    _check_batches(path, model, "torchscript", batches=(2,), size=70)


def test_verify_detects_a_different_model(model, program_dynamic):
    other = Eva02(model.cfg).eval()
    assert verify_export(program_dynamic, other, torch.randn(2, 3, 56, 56)) > 1e-3


def test_bad_requests_leave_no_file(model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_model(model, "exported-program", tmp_path / "m.ep")

    def boom(*a, **k):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr("eva02.export._export_torchscript", boom)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_model(model, "torchscript", tmp_path / "m.ts")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_checkpoint(model, tmp_path, capsys):
    from eva02.weights.load import save_checkpoint

    ckpt = save_checkpoint(model, tmp_path / "test.safetensors")
    out = tmp_path / "cli.ts"  # the command's path is the same for every format; TorchScript is the quick one
    rc = main(["export", "--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out), "--dynamic-batch"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert text.count("verified batch") == 2
    diffs = [float(line.rsplit("=", 1)[1]) for line in text.splitlines() if line.startswith("verified")]
    assert max(diffs) < 1e-5
    _check_batches(out, model, "torchscript", batches=(4,))


def test_cli_export_errors(tmp_path, capsys):
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "NAME" in capsys.readouterr().err
    rc = main(
        ["export", "--checkpoint", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    )
    assert rc == 2
    assert not (tmp_path / "m.onnx").exists()


def _onnx_compare():
    """benchmarks/onnx_compare.py, loaded by its path."""
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "onnx_compare.py"
    spec = iu.spec_from_file_location("onnx_compare", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_onnx_runtime_comparison_report(onnx_dynamic, monkeypatch):
    """The comparison's timing and ratios, on two sessions of one exported file (no second export)."""
    import numpy as np
    import onnxruntime as ort

    mod = _onnx_compare()

    def sessions(size, threads, folder):
        assert size == "test-56" and threads == 1
        cpu = ["CPUExecutionProvider"]
        sess = {k: ort.InferenceSession(str(onnx_dynamic), providers=cpu) for k in ("ours", "timm")}
        return sess, np.zeros((3, 3, 56, 56), np.float32), 0.0

    monkeypatch.setattr(mod, "sessions", sessions)
    r = mod.compare("test-56", threads=1, rounds=2)
    assert r["batch"] == 3 and r["max_abs_diff"] == 0.0
    assert r["ours"]["img_s"] > 0 and r["timm"]["img_s"] > 0
    assert r["ours"]["latency_ms"] == pytest.approx(3000 / r["ours"]["img_s"])
    assert r["x_timm"] == pytest.approx(r["ours"]["img_s"] / r["timm"]["img_s"])


@pytest.mark.slow  # exports timm's model as well as ours: two ONNX exports
@pytest.mark.skipif(not HAVE_ORT or importlib.util.find_spec("timm") is None, reason="onnxruntime and timm needed")
def test_onnx_runtime_comparison_script():
    r = _onnx_compare().compare("test-56", threads=1, rounds=2)
    assert r["max_abs_diff"] < 1e-4  # the two exports compute the same function
    assert r["ours"]["img_s"] > 0 and r["timm"]["img_s"] > 0
    assert r["x_timm"] == pytest.approx(r["ours"]["img_s"] / r["timm"]["img_s"])


def test_programs_on_pytorch_kernels_keep_the_complex_rope(model, program_static, tmp_path):
    """torch.export programs and TorchScript traces run on PyTorch's kernels, which take the one-pass
    complex RoPE product; ONNX (no complex type) gets real arithmetic."""
    ep = torch.export.load(str(program_static))
    assert any("view_as_complex" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    ts = torch.jit.load(str(export_model(model, "torchscript", tmp_path / "m.ts")))
    assert "view_as_complex" in str(ts.inlined_graph)


def test_onnx_has_no_complex_tensors(onnx_dynamic):
    import onnx

    proto = onnx.load(str(onnx_dynamic))
    assert all(t.data_type != onnx.TensorProto.COMPLEX64 for t in proto.graph.initializer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onnx_layout_computes_the_same_model(model, dtype):
    """The separate-projection layout traced for ONNX, run eagerly: same outputs as the fused layout,
    in fp32 and bf16 (q, k and v stay in the model's dtype)."""
    import copy

    from eva02.export import SeparateProjections, separate_projections
    from eva02.model import fast

    m = copy.deepcopy(model).to(dtype)
    x = torch.randn(2, 3, 56, 56).to(dtype)
    with torch.no_grad():
        ref = m(x)
        with separate_projections(m):  # `fast.use`: every model call takes the layout, traced or not
            assert isinstance(fast.choose(torch.zeros(2, 17, 128, dtype=dtype), m.blocks), SeparateProjections)
            got = m(x)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol * ref.float().abs().max().item(), rtol=0)
