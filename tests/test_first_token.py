"""Only what the output reads: the class-token shortcut of token-pooled towers and the text tower's
end-of-text shortcut, against full forwards in float64.

A token-pooled model (the EVA-02-CLIP image towers) reads one token of its last block, so in inference
that block computes its query, projection and MLP for the class token alone (`fast.FirstToken`). The
text tower's attention is causal, so padding after the batch's last end-of-text token is dropped and
the last block runs at the end-of-text positions alone. Both must give what the whole computation gives.
"""

from __future__ import annotations

import pytest
import torch

from eva02.model import Eva02, Eva02Config, fast
from eva02.model.clip import TextConfig, TextTransformer

# The CLIP towers' layouts at toy width: B/L (inner attention norm, sub-LN SwiGLU, RoPE) and E
# (post-norm, GELU MLP, no RoPE); plus a plain classifier layout pooled by its class token.
LAYOUTS = {
    "clip-bl": dict(attn_norm=True, sub_ln=True, pool="token"),
    "clip-e": dict(post_norm=True, mlp="gelu", rope=False, sub_ln=False, pool="token"),
    "token-pooled-swiglu": dict(sub_ln=False, pool="token"),
}


def tower(layout: str) -> Eva02:
    cfg = Eva02Config(depth=3, img_size=56, patch_size=14, dim=32, heads=4, mlp_hidden=85, num_classes=6,
                      **LAYOUTS[layout])  # fmt: skip
    torch.manual_seed(0)
    m = Eva02(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # peaked attention: every key matters
    return m


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_class_token_shortcut_equals_the_full_forward(layout):
    m = tower(layout)
    x = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    shapes = []
    m.blocks[-1].register_forward_hook(lambda mod, args, out: shapes.append((args[0].shape, out.shape)))
    with torch.no_grad():
        fast_out = m(x)
        full = m.forward_head(m.forward_features(x))  # every block on every token
    assert shapes[0] == (torch.Size([3, 17, 32]), torch.Size([3, 1, 32]))  # the shortcut ran: one token out
    assert shapes[1] == (torch.Size([3, 17, 32]), torch.Size([3, 17, 32]))
    torch.testing.assert_close(fast_out, full, rtol=1e-10, atol=1e-10)


def test_class_token_shortcut_only_in_inference():
    m = tower("clip-bl")
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    shapes = []
    m.blocks[-1].register_forward_hook(lambda mod, args, out: shapes.append(out.shape[1]))
    m(x)  # autograd records: all tokens (hooks and gradients see the whole block)
    with torch.no_grad(), fast.use(None):
        m(x)  # a pinned form (here the reference) applies to every block
    with torch.no_grad():
        m.train()
        m(x)  # training mode (drop path) under no_grad
        m.eval()
        m(x)
    assert shapes == [17, 17, 17, 1]


def test_avg_pooled_classifiers_keep_every_token():
    cfg = Eva02Config(depth=2, img_size=56, patch_size=14, dim=32, heads=4, mlp_hidden=85, num_classes=6)
    m = Eva02(cfg).eval()
    shapes = []
    m.blocks[-1].register_forward_hook(lambda mod, args, out: shapes.append(out.shape[1]))
    with torch.no_grad():
        m(torch.randn(1, 3, 56, 56))
    assert shapes == [17]


def text_tower() -> TextTransformer:
    cfg = TextConfig(context_length=20, vocab_size=64, width=32, heads=4, layers=3, mlp_ratio=2.0)
    torch.manual_seed(0)
    t = TextTransformer(cfg, embed_dim=16).double().eval()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return t


def texts(lengths: list[int], context: int = 20, eot: int = 63) -> torch.Tensor:
    """Token ids as the tokenizer lays them out: start, words, end-of-text (the highest id), zero padding."""
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    for i, n in enumerate(lengths):
        ids[i, : n - 1] = torch.randint(1, eot - 1, (n - 1,), generator=g)
        ids[i, n - 1] = eot
    return ids


@pytest.mark.parametrize("lengths", [[4, 9, 6], [20, 3], [2]])
def test_text_shortcut_equals_every_token_through_every_block(lengths):
    t = text_tower()
    ids = texts(lengths)
    seen = []
    t.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        short = t(ids)
        tokens = t.forward_tokens(ids)  # (B, L, W): the whole context through every block
    assert seen[0] == max(lengths)  # padding after the batch's last end-of-text token was left out
    full = tokens[torch.arange(len(lengths)), ids.argmax(-1)] @ t.proj
    torch.testing.assert_close(short, full, rtol=1e-10, atol=1e-10)
    # and a text's embedding does not depend on the other texts of its batch
    alone = torch.cat([t(ids[i : i + 1]) for i in range(len(lengths))])
    torch.testing.assert_close(short, alone, rtol=1e-10, atol=1e-10)


def test_text_shortcut_gradients_equal_the_full_computation():
    t = text_tower()
    ids = texts([5, 11])
    t(ids).square().sum().backward()
    short = [p.grad.clone() for p in t.parameters()]
    t.zero_grad()
    tokens = t.forward_tokens(ids)
    (tokens[torch.arange(2), ids.argmax(-1)] @ t.proj).square().sum().backward()
    for a, p in zip(short, t.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-10)
