"""2-D RoPE: agreement with the official formula, norm preservation, relative-position property."""

import math

import pytest
import torch

from eva02.model.rope import apply_rope, rope_angles, rope_tables, rotate_half_reference


def official_rope(x: torch.Tensor, S: int, head_dim: int, pt_seq_len: int = 16, theta: float = 10000.0):
    """The official VisionRotaryEmbeddingFast written out step by step (patch tokens only)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(S).float() / S * pt_seq_len
    f = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (S, dim)
    f2 = torch.cat([f[:, None, :].expand(S, S, dim), f[None, :, :].expand(S, S, dim)], dim=-1)
    cos, sin = f2.cos().view(S * S, head_dim), f2.sin().view(S * S, head_dim)
    return x * cos + rotate_half_reference(x) * sin


@pytest.mark.parametrize("S", [16, 24, 32, 7])
def test_matches_official_formula(S):
    hd = 64
    x = torch.randn(2, 3, 1 + S * S, hd)
    cos, sin = rope_tables((S, S), hd, ref_grid=16, num_prefix=1)
    ours = apply_rope(x, cos, sin)
    ref = official_rope(x[:, :, 1:], S, hd)
    torch.testing.assert_close(ours[:, :, 1:], ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(ours[:, :, 0], x[:, :, 0]), "the class token must not be rotated"


def test_positions_interpolated_to_reference_grid():
    # At a 24x24 grid the last row sits at 23 * 16 / 24 on the 16-grid scale, not at 23.
    ang = rope_angles((24, 24), 64, ref_grid=16, theta=10000.0)
    last_row = ang[23 * 24, 0].item()  # first frequency is 1
    assert math.isclose(last_row, 23 * 16 / 24, rel_tol=1e-12)
    # columns live in the second half of the head
    assert ang[1, 32].item() == pytest.approx(16 / 24)
    assert ang[1, 0].item() == 0.0


def test_norm_preserved():
    x = torch.randn(4, 1 + 10 * 10, 64, dtype=torch.float64)
    cos, sin = rope_tables((10, 10), 64, dtype=torch.float64)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y[:, 5:], x[:, 5:]), "a real rotation happened"


def test_dot_product_depends_only_on_relative_position():
    hd, S = 64, 16
    cos, sin = rope_tables((S, S), hd, ref_grid=S, num_prefix=0, dtype=torch.float64)
    q = torch.randn(hd, dtype=torch.float64)
    k = torch.randn(hd, dtype=torch.float64)

    def score(pq, pk):
        iq, ik = pq[0] * S + pq[1], pk[0] * S + pk[1]
        rq = apply_rope(q[None], cos[iq : iq + 1], sin[iq : iq + 1])[0]
        rk = apply_rope(k[None], cos[ik : ik + 1], sin[ik : ik + 1])[0]
        return (rq @ rk).item()

    # same offset (2, -3) at two places -> same score; another offset -> different score
    a = score((3, 7), (5, 4))
    b = score((10, 12), (12, 9))
    c = score((10, 12), (13, 9))
    assert a == pytest.approx(b, abs=1e-10)
    assert abs(a - c) > 1e-6


def test_tables_cover_prefix_with_identity():
    cos, sin = rope_tables((4, 5), 32, num_prefix=1)
    assert cos.shape == (1 + 20, 32) and sin.shape == (1 + 20, 32)
    assert torch.all(cos[0] == 1) and torch.all(sin[0] == 0)


def test_in_place_complex_rotation_equals_real_form():
    from eva02.model.rope import rope_complex, rotate_pairs_

    cos, sin = rope_tables((6, 6), 64, num_prefix=1)
    x = torch.randn(2, 3, 37, 64)
    ref = apply_rope(x, cos, sin)
    y = rotate_pairs_(x.clone(), rope_complex(cos, sin))
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(y[:, :, 0], x[:, :, 0]), "the class token's 1 + 0i entry must leave it bit-identical"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_place_rotation_equals_real_form(dtype):
    """Half-precision inference rotates q and k in place through fp32; same numbers as the real form."""
    from eva02.model.rope import rope_complex, rotate_pairs_widened_

    cos, sin = rope_tables((6, 6), 64, num_prefix=1)
    qkv = torch.randn(2, 37, 3, 4, 64).to(dtype)  # (B, T, 3, h, hd): q and k are a strided view
    ref = apply_rope(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])  # computed in fp32, rounded once
    before = qkv.clone()
    out = rotate_pairs_widened_(qkv[:, :, :2], rope_complex(cos, sin)[:, None, None])
    assert out.dtype == dtype and out.data_ptr() == qkv.data_ptr()  # in place, in the caller's dtype
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1e-3)
    assert ((qkv[:, :, :2].float() - ref.float()).abs() <= ulp).all()  # at most one rounding step apart
    assert torch.equal(qkv[:, :, 2], before[:, :, 2]), "v must stay untouched"
    assert torch.equal(qkv[:, 0], before[:, 0]), "the class token's identity rotation keeps it bit-identical"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_rotation_rounds_once(dtype):
    """The training function in half precision: outputs and the qkv gradient are the exact (float64)
    rotation rounded once to the half dtype, as the fp32 product then one rounding gives."""
    from eva02.model.fast import RotateSplit
    from eva02.model.rope import rope_complex

    cos, sin = rope_tables((6, 6), 64, num_prefix=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 37, 3, 4, 64, generator=g).to(dtype)
    grads_out = [torch.randn(2, 4, 37, 64, generator=g).to(dtype) for _ in range(3)]

    exact = qkv.double().requires_grad_()
    q, k = (t.transpose(1, 2) for t in apply_rope(exact[:, :, :2], cos[:, None, None], sin[:, None, None]).unbind(2))
    ref_outs = (q, k, exact[:, :, 2].transpose(1, 2))
    torch.autograd.backward(ref_outs, [t.double() for t in grads_out])

    x = qkv.clone().requires_grad_()
    outs = RotateSplit.apply(x, rope_complex(cos, sin).to(torch.complex64)[:, None], True)
    torch.autograd.backward(outs, grads_out)
    assert x.grad.dtype == dtype and all(o.dtype == dtype for o in outs)
    eps = torch.finfo(dtype).eps
    for ours, ref in [*zip(outs, ref_outs, strict=True), (x.grad, exact.grad)]:
        err = (ours.double() - ref.detach()).abs()
        assert (err <= eps * ref.detach().abs() + 1e-6).all(), err.max().item()


@pytest.mark.parametrize("widen", [False, True])
def test_training_functions_pass_gradcheck(widen):
    """The hand-written backwards of the training forms of RoPE+split and the SwiGLU gate (the widened
    form, used for half precision, computes in float64 here)."""
    from eva02.model.fast import RotateSplit, SiluGate
    from eva02.model.rope import rope_complex, rope_tables

    g = torch.Generator().manual_seed(0)
    T, h, hd = 5, 2, 8  # grid 2x2 plus the class token
    cos, sin = rope_tables((2, 2), hd, ref_grid=2, num_prefix=1, dtype=torch.float64)
    rot = rope_complex(cos, sin)[:, None, :]  # (T, 1, hd/2)
    qkv = torch.randn(2, T, 3, h, hd, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: RotateSplit.apply(t, rot, widen), (qkv,))
    # forward: q and k rotated as the real form does, v unchanged, all head-major (B, h, T, hd)
    q, k, v = RotateSplit.apply(qkv, rot, widen)
    ref = apply_rope(qkv[:, :, :2].detach(), cos[:, None, None, :], sin[:, None, None, :])
    torch.testing.assert_close(q, ref[:, :, 0].transpose(1, 2))
    torch.testing.assert_close(k, ref[:, :, 1].transpose(1, 2))
    assert torch.equal(v, qkv[:, :, 2].detach().transpose(1, 2))
    x12 = torch.randn(3, 4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SiluGate.apply, (x12,))
    gate, value = x12.detach().chunk(2, -1)
    torch.testing.assert_close(SiluGate.apply(x12), torch.nn.functional.silu(gate) * value)


def test_training_gate_saves_only_its_input():
    """The SwiGLU gate keeps w12's output for backward and nothing else (silu is recomputed)."""
    from eva02.model.fast import SiluGate

    x12 = torch.randn(2, 5, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = SiluGate.apply(x12)
    assert len(saved) == 1 and saved[0] is x12
    out.sum().backward()
    gate, value = x12.detach().chunk(2, -1)
    s = torch.sigmoid(gate)
    expected = torch.cat([value * s * (1 + gate * (1 - s)), gate * s], -1)
    torch.testing.assert_close(x12.grad, expected)


def _tiny_model(img: int = 56):
    from eva02.model import VARIANTS, Eva02

    return Eva02(VARIANTS["tiny"].replace(img_size=img, depth=2, num_classes=10))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_rope_tables_stay_fp32_and_exact_when_the_model_is_cast(dtype):
    m = _tiny_model()
    want_cos, want_sin = rope_tables((4, 4), m.cfg.head_dim, m.cfg.ref_grid, m.cfg.rope_theta, num_prefix=1)
    m = m.to(dtype)
    assert m.patch_embed.proj.weight.dtype == dtype, "the model itself was cast"
    assert m.rope_cos.dtype == torch.float32 and m.rope_sin.dtype == torch.float32
    assert torch.equal(m.rope_cos, want_cos) and torch.equal(m.rope_sin, want_sin)
    assert "rope_cos" not in m.state_dict() and "rope_sin" not in m.state_dict()


def test_native_rope_tables_of_an_uninitialised_build_and_after_a_resize():
    from eva02.model import Eva02

    ref = _tiny_model()
    m = Eva02.uninitialized(ref.cfg)  # to_empty: the buffers would otherwise hold garbage
    assert torch.equal(m.rope_cos, ref.rope_cos) and torch.equal(m.rope_sin, ref.rope_sin)
    m.set_img_size(84)  # 6x6 grid
    cos, sin = rope_tables((6, 6), m.cfg.head_dim, m.cfg.ref_grid, m.cfg.rope_theta, num_prefix=1)
    assert torch.equal(m.rope_cos, cos) and torch.equal(m.rope_sin, sin)


def test_compiled_graph_takes_the_native_tables_as_inputs():
    """Built inside the graph, the tables cost sin/cos work in every call (on CUDA, inductor folded it
    into every block's RoPE kernel); at the native grid the graph must only read the buffers."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def trig_ops(gm) -> list[str]:
        names = [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        return [t for t in names if "cos" in t or "sin" in t]

    m = _tiny_model().eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 56, 56)
        torch.testing.assert_close(torch.compile(m, backend=capture)(x), m(x), atol=1e-5, rtol=1e-5)
        assert len(graphs) == 1 and trig_ops(graphs[0]) == []
        torch._dynamo.reset()
        torch.compile(m, backend=capture)(torch.randn(2, 3, 70, 70))  # another grid: built in the graph
        assert trig_ops(graphs[-1])
