"""The Eva02 module: shapes, feature extraction, resolution changes, training switches, errors."""

import pytest
import torch

from eva02.model import VARIANTS, Eva02, Eva02Config


def make(num_classes=10, **kw):
    torch.manual_seed(0)
    return Eva02(VARIANTS["test"].replace(num_classes=num_classes, **kw)).eval()


def test_classifier_and_headless_outputs():
    x = torch.randn(2, 3, 56, 56)
    clf, headless = make(10), make(0)
    assert clf(x).shape == (2, 10)
    assert headless(x).shape == (2, 128)
    assert isinstance(headless.norm, torch.nn.LayerNorm) and isinstance(headless.fc_norm, torch.nn.Identity)
    assert isinstance(clf.norm, torch.nn.Identity) and isinstance(clf.fc_norm, torch.nn.LayerNorm)
    # headless pooled output = mean of the per-token normalised patch tokens
    tokens = headless.forward_features(x)
    torch.testing.assert_close(headless(x), tokens[:, 1:].mean(1))


@pytest.mark.parametrize("num_classes", [0, 10])
def test_extract_feat_out_types(num_classes):
    m = make(num_classes)
    x = torch.randn(2, 3, 56, 70)  # non-square: grid 4 x 5
    raw = m.extract_feat(x, out_type="raw", out_indices=(0, -1))
    assert isinstance(raw, tuple) and len(raw) == 2 and raw[0].shape == (2, 1 + 20, 128)
    assert not torch.allclose(raw[0], raw[1])
    (fm,) = m.extract_feat(x, out_type="featmap")
    assert fm.shape == (2, 128, 4, 5)
    (cls,) = m.extract_feat(x, out_type="cls_token")
    assert cls.shape == (2, 128)
    (avg,) = m.extract_feat(x)
    torch.testing.assert_close(avg, m.forward_head(m.forward_features(x), pre_logits=True))
    # featmap is the normalised last-block tokens laid out row-major
    normed = m.norm(raw[1])
    torch.testing.assert_close(fm[:, :, 1, 2], normed[:, 1 + 1 * 5 + 2])
    with pytest.raises(ValueError, match="out_type"):
        m.extract_feat(x, out_type="bogus")
    with pytest.raises(IndexError):
        m.extract_feat(x, out_indices=(5,))


def test_forward_intermediates():
    m = make(10)
    x = torch.randn(1, 3, 56, 56)
    final, feats = m.forward_intermediates(x, indices=[0, 1])
    assert final.shape == (1, 17, 128) and [f.shape for f in feats] == [(1, 128, 4, 4)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    only = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
    patches, prefix = only[0]
    assert patches.shape == (1, 16, 128) and prefix.shape == (1, 1, 128)
    torch.testing.assert_close(patches, feats[1].flatten(2).transpose(1, 2))


def test_any_resolution_and_set_img_size():
    m = make(10)
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        dyn = m(x)
        again = m(x)  # cached position embedding for the 6x6 grid
    torch.testing.assert_close(dyn, again)
    m.set_img_size(84)
    assert m.pos_embed.shape == (1, 37, 128) and m.cfg.img_size == 84
    with torch.no_grad():
        torch.testing.assert_close(m(x), dyn)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 3, 50, 56))


def test_position_cache_follows_weight_updates():
    m = make(10)
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        before = m(x)
        m.pos_embed.add_(torch.randn_like(m.pos_embed))
        after = m(x)
    assert not torch.allclose(before, after)


def test_grad_checkpointing_same_gradients():
    m = make(10).train()
    x = torch.randn(2, 3, 56, 56)
    m(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_patch_grad_scale_zero_detaches_patch_embedding():
    m = make(10, patch_grad_scale=0.0).train()
    m(torch.randn(2, 3, 56, 56)).sum().backward()
    assert m.patch_embed.proj.weight.grad is None
    assert m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_drop_path_only_in_training():
    m = make(10, drop_path=0.5)
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
    assert not torch.allclose(a, b)


def test_reset_classifier_turns_headless_into_classifier():
    m = make(0)
    m.reset_classifier(7)
    assert m(torch.randn(1, 3, 56, 56)).shape == (1, 7)
    assert isinstance(m.norm, torch.nn.Identity) and m.cfg.num_classes == 7


def test_meta_device_build_and_param_count():
    with torch.device("meta"):
        m = Eva02(VARIANTS["tiny"].replace(img_size=336, num_classes=1000))
    assert sum(p.numel() for p in m.parameters()) == 5_756_584
    assert "blocks.0.attn.k_bias" not in m.state_dict()
    assert not any("rope" in k for k in m.state_dict())


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        Eva02Config(img_size=225)
    with pytest.raises(ValueError, match="unknown Eva02Config keys"):
        Eva02Config.from_dict({"dim": 192, "dpeth": 3})
    with pytest.raises(ValueError, match="drop_path"):
        Eva02Config(drop_path=1.5)


def test_init_follows_official_scheme():
    torch.manual_seed(0)
    m = Eva02(VARIANTS["tiny"].replace(depth=4, num_classes=1000, img_size=56))
    # head weights are scaled by 0.001 from a std-0.02 truncated normal
    assert m.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)
    # output projections shrink with depth: std 0.02 / sqrt(2 * layer_id)
    s1 = m.blocks[0].attn.proj.weight.std().item()
    s4 = m.blocks[3].attn.proj.weight.std().item()
    assert s1 / s4 == pytest.approx(2.0, rel=0.1)


def test_bf16_autocast_runs_and_stays_close():
    m = make(10)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("sub_ln", [False, True])
def test_bf16_inference_takes_the_in_place_rotation_and_equals_the_real_form(sub_ln):
    """bf16 weights, eager: q and k are rotated in place (through fp32); same logits as the real form."""
    from eva02.model import fast

    m = make(10, sub_ln=sub_ln).to(torch.bfloat16)
    with torch.no_grad():  # peaked attention, so that the output depends on the rotation
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(8)
    x = torch.randn(2, 3, 56, 56).to(torch.bfloat16)
    with torch.inference_mode():
        path = fast.choose(m.prepare_tokens(x), m.blocks)
        assert isinstance(path, fast.Inference) and path.widen
        eager = m(x)
        with fast.use(fast.Traced()):  # the real form, as compilers and exporters get it
            real = m(x)
    torch.testing.assert_close(eager.float(), real.float(), atol=2e-2 * real.float().abs().max().item(), rtol=0)


@pytest.mark.parametrize("sub_ln", [False, True])
def test_bf16_autocast_training_gradients_follow_fp32(sub_ln):
    """bf16 autocast takes the RoPE (widened to fp32) and gate functions in bf16: every gradient follows fp32."""
    m = make(10, sub_ln=sub_ln).train()
    with torch.no_grad():  # peaked attention, so that the gradients depend on the rotation
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(8)
    x, y = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 7])
    grads = []
    for amp in (False, True):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            torch.nn.functional.cross_entropy(m(x), y).backward()
        grads.append({n: p.grad.flatten().float() for n, p in m.named_parameters()})
    ref, low = grads
    for name, g in ref.items():
        assert torch.isfinite(low[name]).all(), name
        if g.abs().max() > 0:
            assert torch.nn.functional.cosine_similarity(g, low[name], dim=0) > 0.98, name


def test_training_after_inference_mode_call():
    m = make(10)
    x = torch.randn(2, 3, 84, 84)  # a non-native grid: both caches get filled under inference_mode
    with torch.inference_mode():
        m(x)
    m.train()
    m(x).sum().backward()  # would fail if a cached table were an inference tensor
    assert m.blocks[0].attn.qkv.weight.grad is not None


# "aot_eager": the graphs dynamo captures and AOTAutograd splits into forward and backward, run by
# PyTorch's own kernels; "inductor" also generates and compiles C++ for them (tens of seconds on 2 cores
# whenever the model's code has changed since the last run, as its cache is keyed on the code).
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_gradients_equal_eager(backend):
    m = make(10).train()
    x = torch.randn(2, 3, 56, 56)
    m(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    torch.compile(m, backend=backend)(x).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_uninitialized_model_loads_to_identical_outputs():
    src = make(10)
    empty = Eva02.uninitialized(src.cfg).eval()
    assert all(torch.equal(b, torch.zeros_like(b)) for b in (blk.attn.k_bias for blk in empty.blocks))
    empty.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(empty(x), src(x))


def test_compiled_model_does_not_recompile_on_the_second_call():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = make(10)
    compiled = torch.compile(m, backend="aot_eager")  # recompiles are decided by dynamo's guards, whatever the backend
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        first = compiled(x)
        second = compiled(x)
        ref = m(x)
    assert counters["stats"]["unique_graphs"] == 1, "the RoPE/position caches must not invalidate the graph"
    torch.testing.assert_close(first, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, first)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("sub_ln", [False, True])
def test_shared_inference_buffers_change_nothing(sub_ln, chunked, monkeypatch):
    from eva02.model import fast

    # w12 in one product (bit-identical to the reference), or in column chunks of 16 hidden columns per
    # thread (the same sums, blocked differently by the GEMM: equal to rounding)
    monkeypatch.setattr(fast, "GATE_COLUMNS_PER_THREAD", 16 if chunked else 10**9)
    monkeypatch.setattr(fast, "CHUNKED_W12_BYTES", 0)
    same = torch.testing.assert_close if chunked else lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)
    m = make(10, sub_ln=sub_ln)
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        m.reuse_buffers = False
        assert fast.choose(m.prepare_tokens(x), m.blocks, m.reuse_buffers).ws is None
        ref_final, ref_feats = m.forward_intermediates(x, output_fmt="NLC")
        ref_logits = m(x)
    m.reuse_buffers = True
    with torch.inference_mode():
        ws = fast.choose(m.prepare_tokens(x), m.blocks, m.reuse_buffers).ws
        final, feats = m.forward_intermediates(x, output_fmt="NLC")
        logits = m(x)
    assert isinstance(ws, fast.Workspace) and ws.chunks(m.blocks[0].mlp.w12) == chunked
    # the reference's results, and intermediates kept from earlier blocks are not overwritten by later ones
    same(logits, ref_logits)
    same(final, ref_final)
    for a, b in zip(feats, ref_feats, strict=True):
        same(a, b)
    # the buffer is allocated once, as large as the widest output (qkv or w12) of one call, then the
    # qkv and w12 products of every block write into it
    T, c = 1 + (56 // 14) * (42 // 14), m.cfg
    blk = m.blocks[0]
    tokens = torch.randn(2, T, c.dim)
    with torch.no_grad():
        qkv = ws.linear(tokens, blk.attn.qkv.weight, torch.zeros(3 * c.dim))
        w12 = ws.linear(tokens, blk.mlp.w12.weight, blk.mlp.w12.bias)
        assert qkv.data_ptr() == w12.data_ptr()
        assert w12.untyped_storage().nbytes() == 4 * 2 * T * max(3 * c.dim, 2 * c.mlp_hidden)
        torch.testing.assert_close(w12, blk.mlp.w12(tokens))
    # never while autograd records, under autocast, or on other devices
    assert not fast.Workspace.usable(x.requires_grad_())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast.Workspace.usable(x)
    with torch.no_grad():
        assert fast.Workspace.usable(x) and not fast.Workspace.usable(x.to("meta"))


def test_w12_in_chunks_only_where_its_weights_exceed_the_caches():
    """The chunked w12 product is used where the weights are too large for the caches (small: 384 x 2048,
    base: 768 x 4096, large: 1024 x 5460 in fp32), not for tiny (192 x 1024), nor where one chunk covers it."""
    from eva02.model import fast

    ws = fast.Workspace(gate_columns=512)
    sizes = ("tiny", "small", "base", "large")
    w12 = {n: torch.nn.Linear(VARIANTS[n].dim, 2 * VARIANTS[n].mlp_hidden, device="meta") for n in sizes}
    assert [ws.chunks(w12[n]) for n in sizes] == [False, True, True, True]
    assert not fast.Workspace(gate_columns=2048).chunks(w12["base"])  # one chunk: the plain product


def test_concurrent_inference_threads_get_their_own_results():
    from concurrent.futures import ThreadPoolExecutor

    m = make(10)
    xs = [torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.inference_mode():
        expected = [m(x) for x in xs]

    def run(x):
        with torch.inference_mode():
            return [m(x) for _ in range(3)]

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, xs))
    for outs, ref in zip(results, expected, strict=True):
        assert all(torch.equal(o, ref) for o in outs)
