"""Every fast block form against the reference layers, in float64 on random weights.

The forms of `eva02/model/fast.py` (and the ONNX layout of `eva02/export.py`) must compute what
`eva02/model/layers.py` computes: outputs, kept intermediates and every gradient, for the block layouts
of all four sizes (reduced widths and depth, the same layout flags). Also: which form a model call gets.
"""

from __future__ import annotations

import pytest
import torch

from eva02.export import SeparateProjections
from eva02.model import Eva02, Eva02Config, fast
from eva02.model.rope import RopeTables

# Reduced widths with the released sizes' layouts: no sub-LN (tiny, small), sub-LN (base, large);
# head width 8 (divisible by 4 for 2-D RoPE); hidden widths int(dim * 8/3), odd for small and large
# as large's 2730 is, so the packed [gate; value] split is not at a round offset.
LAYOUTS = {
    "tiny": dict(dim=24, heads=3, mlp_hidden=64, sub_ln=False),
    "small": dict(dim=32, heads=4, mlp_hidden=85, sub_ln=False),
    "base": dict(dim=48, heads=6, mlp_hidden=128, sub_ln=True),
    "large": dict(dim=40, heads=5, mlp_hidden=107, sub_ln=True),
}

# (name, form, differentiable): the forms of `fast.choose` with each of their settings.
FORMS = [
    ("inference", lambda: fast.Inference(), False),
    ("inference-workspace", lambda: fast.Inference(ws=fast.Workspace()), False),
    # w12 in chunks of 24 hidden columns: several per layout, the last one narrower
    ("inference-workspace-chunked", lambda: fast.Inference(ws=fast.Workspace(gate_columns=24, chunked_bytes=0)), False),
    ("inference-widened", lambda: fast.Inference(widen=True), False),
    ("training", lambda: fast.Training(), True),
    ("training-widened", lambda: fast.Training(widen=True), True),
    ("traced-real", lambda: fast.Traced(), True),
    ("traced-complex", lambda: fast.Traced(complex_rope=True), True),
    ("traced-in-place-residual", lambda: fast.Traced(inplace_residual=True), False),
    ("onnx-separate-projections", lambda: SeparateProjections(), True),
]
TOL = dict(rtol=1e-9, atol=1e-9)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_model(layout: str, **kw) -> Eva02:
    """A float64 depth-2 classifier whose every parameter is moved well off its init (biases, norms)."""
    cfg = Eva02Config(depth=2, img_size=56, num_classes=5, **LAYOUTS[layout], **kw)
    torch.manual_seed(0)
    m = Eva02(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # large enough for peaked attention: RoPE matters
    return m


def run(m: Eva02, x: torch.Tensor, form, grad: bool, seed: int = 1):
    """Final tokens, block-0 intermediate and logits of one call in `form` (None: the reference), and
    with `grad` the gradients of a random projection of them for the input and every parameter."""
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(grad)
    torch.manual_seed(seed)  # the same drop-path draws for every form
    with torch.set_grad_enabled(grad), fast.use(form):
        final, (first,) = m.forward_intermediates(x, indices=[0], output_fmt="NLC")
        logits = m.forward_head(final)
    outs = [final, first, logits]
    if not grad:
        return outs, []
    weights = [torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(2)) for t in outs]
    sum((t * w).sum() for t, w in zip(outs, weights, strict=True)).backward()
    return [t.detach() for t in outs], [x.grad] + [p.grad for p in m.parameters()]


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 56, 42, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_form_computes_the_reference(layout):
    """Outputs (and, where autograd can record, gradients) of each form equal the reference's, in eval
    and in training mode with drop-path."""
    x = images()
    for train in (False, True):
        m = random_model(layout, drop_path=0.3 if train else 0.0).train(train)
        ref = {grad: run(m, x, None, grad) for grad in (False, True)}
        for name, make, differentiable in FORMS:
            grad = differentiable and train
            outs, grads = run(m, x, make(), grad)
            ref_outs, ref_grads = ref[grad]
            for got, want in zip(outs, ref_outs, strict=True):
                torch.testing.assert_close(got, want, **TOL, msg=lambda s, n=name: f"{layout} {n}: {s}")
            assert len(grads) == len(ref_grads)
            for got, want in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(got, want, **TOL, msg=lambda s, n=name: f"{layout} {n} grad: {s}")


@pytest.mark.parametrize("layout", ["tiny", "base"])
def test_training_form_under_gradient_checkpointing(layout):
    """Checkpointed blocks recompute in the same form: gradients equal the plain reference's."""
    m = random_model(layout)
    _, ref = run(m, images(), None, grad=True)
    m.set_grad_checkpointing(True)
    _, got = run(m, images(), fast.Training(), grad=True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_traced_complex_form_builds_the_complex_table_when_absent():
    """Under torch.compile the tables carry no complex twin (`rot` None): the form builds it."""
    m = random_model("small")
    blk = m.blocks[0]
    rope = m.rope_for((4, 3), torch.device("cpu"))
    x = torch.randn(2, 13, m.cfg.dim, dtype=torch.float64)
    with torch.no_grad():
        ref = blk(x, rope)
        got = blk(x, RopeTables(rope.cos, rope.sin, None), fast.Traced(complex_rope=True))
    torch.testing.assert_close(got, ref, **TOL)


def test_choose_picks_one_form_per_call():
    m = random_model("tiny").float()
    with torch.no_grad():
        tokens = m.prepare_tokens(images().float())
        form = fast.choose(tokens, m.blocks)
        assert isinstance(form, fast.Inference) and isinstance(form.ws, fast.Workspace) and not form.widen
        assert fast.choose(tokens, m.blocks, reuse_buffers=False).ws is None
        with torch.autocast("cpu", dtype=torch.bfloat16):  # half-precision products, no shared buffer
            form = fast.choose(tokens, m.blocks)
            assert isinstance(form, fast.Inference) and form.widen and form.ws is None
        form = fast.choose(tokens.bfloat16(), m.blocks)
        assert isinstance(form, fast.Inference) and form.widen
    form = fast.choose(tokens, m.blocks)  # autograd records: parameters need gradients
    assert isinstance(form, fast.Training) and not form.widen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.choose(tokens, m.blocks).widen
    m.requires_grad_(False)  # nothing to record, although autograd is on: the in-place form, no buffer
    form = fast.choose(tokens, m.blocks)
    assert isinstance(form, fast.Inference) and form.ws is None
    assert isinstance(fast.choose(tokens.requires_grad_(), m.blocks), fast.Training)
    # a form forced for the calls inside a `with` block, None for the reference layers
    with fast.use(None):
        assert fast.choose(tokens, m.blocks) is None
    traced = fast.Traced()
    with fast.use(traced):
        assert fast.choose(tokens, m.blocks) is traced
    assert isinstance(fast.choose(tokens, m.blocks), fast.Training)


def test_choose_under_tracing():
    """A TorchScript trace runs on PyTorch's kernels: the complex product, out of place unless no autograd."""
    m = random_model("tiny").float().eval()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, t):
            seen.append(fast.choose(t, m.blocks))
            return t * 1

    t = torch.randn(1, 13, 24)
    with torch.no_grad():
        torch.jit.trace(Probe(), (t,), check_trace=False)
    (form,) = seen
    assert isinstance(form, fast.Traced) and form.complex_rope and form.inplace_residual
    torch.jit.trace(Probe(), (t,), check_trace=False)
    assert isinstance(seen[-1], fast.Traced) and not seen[-1].inplace_residual


def test_block_forms_run_inside_what_wraps_a_block():
    """The form is passed to the block's own call, so its hooks (FSDP, profilers) see every block."""
    m = random_model("tiny").float().eval()
    calls = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: calls.append(type(args[2]).__name__)) for b in m.blocks]
    with torch.no_grad():
        m(images().float())
    for h in hooks:
        h.remove()
    assert calls == ["Inference", "Inference"]
